import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { splice, reset, tcpUnder } from './splice.js';

const sockets: net.Socket[] = [];
after(() => sockets.forEach((s) => s.destroy()));

/** Two connected plain TCP pairs: `outer` <-> `a` and `b` <-> `inner`; the test splices a <-> b. */
async function pairs() {
  const accepted: net.Socket[] = [];
  const srv = net.createServer({ allowHalfOpen: true }, (s) => accepted.push(s));
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const port = (srv.address() as net.AddressInfo).port;
  const outer = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
  const inner = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
  await Promise.all([once(outer, 'connect'), once(inner, 'connect')]);
  while (accepted.length < 2) await once(srv, 'connection');
  srv.close();
  for (const s of [outer, inner, ...accepted]) {
    s.on('error', () => undefined);
    sockets.push(s);
  }
  // accepted[0] is outer's peer (connected first), accepted[1] inner's.
  return { outer, a: accepted[0]!, b: accepted[1]!, inner };
}

const collect = (s: net.Socket) =>
  new Promise<string>((resolve) => {
    let d = '';
    s.on('data', (x: Buffer) => (d += x.toString()));
    s.once('end', () => resolve(d));
  });

test('each direction ends by itself; the splice resolves "closed" once both did', async () => {
  const { outer, a, b, inner } = await pairs();
  const done = splice(a, b);
  const atInner = collect(inner);
  outer.end('request');
  assert.equal(await atInner, 'request', 'the end reached the inner side');
  const atOuter = collect(outer);
  inner.end('reply after EOF');
  assert.equal(await atOuter, 'reply after EOF');
  assert.deepEqual(await done, { end: 'closed' });
});

test('an error on one side resets the other', async () => {
  const { outer, a, b, inner } = await pairs();
  const done = splice(a, b);
  const innerErr = new Promise<string>((r) => inner.once('error', (e: Error & { code?: string }) => r(e.code ?? '')));
  outer.resetAndDestroy();
  assert.equal(await innerErr, 'ECONNRESET');
  const r = await done;
  assert.equal(r.end, 'reset');
  assert.equal(r.by, 'a');
});

test('an idle pair is closed after the idle timeout', async () => {
  const { outer, a, b, inner } = await pairs();
  // Reading, as real peers are (socket timers are unref'd: something must hold the event loop).
  outer.resume();
  inner.resume();
  const done = splice(a, b, { idleTimeoutMs: 100 });
  const ended = Promise.all([once(outer, 'end'), once(inner, 'end')]);
  assert.deepEqual(await done, { end: 'idle_timeout' });
  await ended; // both peers were told
  outer.destroy();
  inner.destroy();
});

test('reset() sends a RST on a plain socket; tcpUnder() is undefined for it', async () => {
  const { outer, a } = await pairs();
  assert.equal(tcpUnder(a), undefined);
  const err = new Promise<string>((r) => outer.once('error', (e: Error & { code?: string }) => r(e.code ?? '')));
  reset(a);
  assert.equal(await err, 'ECONNRESET');
});

test('an aborted pair is closed in order on both sides, without a reset', async () => {
  const { outer, a, b, inner } = await pairs();
  const ac = new AbortController();
  const done = splice(a, b, { signal: ac.signal });
  const ended = Promise.all([once(outer, 'end'), once(inner, 'end')]);
  ac.abort();
  assert.deepEqual(await done, { end: 'aborted' });
  await ended;
});

test('regression: reset() of a socket whose end() is still being sent no longer leaks its handle and spins the event loop', async () => {
  // libuv refuses a reset while a shutdown is pending (EINVAL); Node 20 then kept the handle open, unread,
  // and the process spun at full CPU for good. Seen when a flow was closed (intentions changed, agent
  // stopping) in the same tick as knit passed on the peer's end to the application.
  const { outer, a } = await pairs();
  const errors: string[] = [];
  a.on('error', (e: Error & { code?: string }) => errors.push(e.code ?? e.message));
  const closed = once(a, 'close');
  const outerEnded = new Promise<string>((r) => {
    outer.once('end', () => r('end'));
    outer.once('error', (e: Error & { code?: string }) => r(e.code ?? ''));
  });
  outer.resume();
  a.end('last words');
  reset(a);
  await closed;
  assert.deepEqual(errors, [], 'no EINVAL from a refused reset');
  assert.ok(['end', 'ECONNRESET'].includes(await outerEnded), 'the far side learns the connection ended');
});
