/**
 * Connection caps and logging under floods, against real proxies: over a
 * cap a connection is refused at once, counted, and logged at a bounded
 * rate; a port scan is counted connection by connection but costs only a
 * handful of log lines.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { ConnectionLimit, isOverLimit, tcpOptions, DEFAULT_TCP } from './limits.js';
import { startPair, listen, type Pair } from '../../test/helpers/proxy-pair.js';
import { RateLimitedLog } from '../log/ratelimit.js';
import { EVENTS } from '../log/logger.js';
import { until } from '../../test/helpers/wait.js';
import type { Metrics } from '../log/metrics.js';

const cleanups: Array<() => unknown> = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** The sum of a counter over every label set matching `where`, read from the exposition text. */
function total(metrics: Metrics, name: string, where: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of metrics.render().split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (Object.entries(where).every(([k, v]) => line.includes(`${k}="${v}"`))) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

test('ConnectionLimit: a slot is taken at every level or none, and released once', () => {
  const host = new ConnectionLimit('host', 3);
  const a = host.child('listener', 2);
  const b = host.child('listener', 2);
  const l1 = a.acquire();
  const l2 = a.acquire();
  assert.deepEqual(a.acquire(), { scope: 'listener', max: 2 });
  const l3 = b.acquire();
  assert.deepEqual(b.acquire(), { scope: 'host', max: 3 }, 'the host is full although b is not');
  assert.equal(host.open, 3);
  assert.ok(!isOverLimit(l1) && !isOverLimit(l2) && !isOverLimit(l3));
  if (isOverLimit(l1)) return;
  l1.release();
  l1.release();
  assert.equal(host.open, 2, 'a second release is a no-op');
  assert.equal(a.open, 1);
  assert.ok(!isOverLimit(b.acquire()));
  assert.throws(() => new ConnectionLimit('listener', 0), RangeError);
});

test('tcpOptions fills in the defaults and refuses nonsense', () => {
  assert.deepEqual(tcpOptions(), DEFAULT_TCP);
  assert.deepEqual(tcpOptions({ noDelay: false, idleTimeoutMs: undefined }), { ...DEFAULT_TCP, noDelay: false });
  assert.throws(() => tcpOptions({ keepAliveMs: -1 }), RangeError);
  assert.throws(() => tcpOptions({ idleTimeoutMs: Number.NaN }), RangeError);
});

async function echoApp() {
  const app = await listen((s) => {
    s.on('error', () => undefined);
    s.pipe(s);
  });
  cleanups.push(() => app.server.close());
  return app;
}

async function pair(appPort: number, extra: Parameters<typeof startPair>[1]): Promise<Pair> {
  const p = await startPair(appPort, extra);
  cleanups.push(() => p.close());
  return p;
}

/** One exchange through `port`: resolves with the echo of 'ok', or how the connection failed. */
async function echoOnce(port: number): Promise<string> {
  const s = net.connect({ port, host: '127.0.0.1', noDelay: true });
  const r = await new Promise<string>((resolve) => {
    s.once('data', (d: Buffer) => resolve(d.toString()));
    s.once('error', (e: Error & { code?: string }) => resolve(e.code ?? e.message));
    s.once('end', () => resolve('end'));
    s.write('ok');
  });
  s.destroy();
  return r;
}

/** Opens a plain TCP connection and resolves with how it ended (error code or 'end'), never rejecting. */
function attempt(port: number, write?: string): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', (e: Error & { code?: string }) => resolve(e.code ?? e.message));
    s.on('end', () => resolve('end'));
    if (write) s.write(write);
    s.resume();
  });
}

test('over the listener cap, inbound connections are refused at once, each counted, logged at a bounded rate', async () => {
  const app = await echoApp();
  const p = await pair(app.port, { inbound: { maxConnections: 5 } });
  // Five connections that never finish their handshake hold the five slots.
  const holders: net.Socket[] = [];
  for (let i = 0; i < 5; i++) {
    const s = net.connect(p.inboundPort, '127.0.0.1');
    s.on('error', () => undefined);
    await once(s, 'connect');
    holders.push(s);
  }
  cleanups.push(() => holders.forEach((s) => s.destroy()));
  const t0 = Date.now();
  const ends = await Promise.all(Array.from({ length: 200 }, () => attempt(p.inboundPort)));
  assert.ok(ends.every((e) => e === 'ECONNRESET'), `every one refused with a reset: ${[...new Set(ends)].join()}`);
  assert.ok(Date.now() - t0 < 3000, 'at once, not after a handshake timeout');
  assert.equal(p.metrics.get('knit_inbound_over_limit_total', { service: 'api', limit: 'listener' }), 200);
  const logged = p.lines.filter((l) => l.event === EVENTS.connOverLimit);
  assert.ok(logged.length <= 5, `at most a burst of lines (${logged.length})`);
  // Slots come back when connections close: the pair serves again.
  for (const s of holders) s.destroy();
  await until('a slot is free again and the pair serves', async () => (await echoOnce(p.outboundPort)) === 'ok');
});

test('a host-wide limit shared by the proxies caps them together', async () => {
  const app = await echoApp();
  const host = new ConnectionLimit('host', 3);
  const p = await pair(app.port, { inbound: { hostLimit: host }, outbound: { hostLimit: host } });
  // One application connection through the pair takes two host slots: the outbound's and the inbound's.
  const first = net.connect({ port: p.outboundPort, host: '127.0.0.1', noDelay: true });
  first.on('error', () => undefined);
  first.write('a');
  await once(first, 'data');
  assert.equal(host.open, 2);
  // The next takes the last slot at the outbound, and its mesh connection is refused at the inbound (host full):
  // the application sees a reset, and the refusal is counted under limit="host".
  assert.equal(await attempt(p.outboundPort, 'b'), 'ECONNRESET');
  assert.equal(p.metrics.get('knit_inbound_over_limit_total', { service: 'api', limit: 'host' }), 1);
  first.destroy();
  await until('slots released', () => host.open === 0);
});

test('a port scan of 10k connections is counted connection by connection but logs a handful of lines', async (t) => {
  const app = await echoApp();
  const p = await pair(app.port, {});
  const N = 10_000;
  let next = 0;
  // What a scanner does: connect and close at once, send garbage, or reset; 100 at a time.
  async function worker(): Promise<void> {
    while (next < N) {
      const k = next++;
      const s = net.connect(p.inboundPort, '127.0.0.1');
      s.on('error', () => undefined);
      const closed = new Promise((r) => s.once('close', r));
      await new Promise((r) => s.once('connect', r).once('error', r));
      if (k % 3 === 0) s.destroy();
      else if (k % 3 === 1) s.end('GET / HTTP/1.1\r\n\r\n');
      else s.resetAndDestroy();
      await closed;
    }
  }
  await Promise.all(Array.from({ length: 100 }, worker));
  await until('every connection counted', () => total(p.metrics, 'knit_inbound_rejected_total', { service: 'api' }) === N, 30_000);
  const rejectedLines = p.lines.filter((l) => l.event === EVENTS.connRejected).length;
  const isSummary = (l: (typeof p.lines)[number]) => l.event === EVENTS.logSuppressed && l.suppressedEvent === EVENTS.connRejected;
  const summaries = p.lines.filter(isSummary).length;
  // Two kinds of refusal (closed during the handshake, not a TLS client): a burst of 5 lines each per 10 s
  // window (the scan takes a few seconds: allow three windows), plus one summary per kind and window.
  assert.ok(rejectedLines <= 2 * 5 * 3, `${rejectedLines} refusal lines for ${N} refusals`);
  await p.inbound.close();
  const after = p.lines.filter(isSummary);
  assert.ok(after.length >= 1 && after.length <= summaries + 3 * 3, 'the suppressed lines are summarized');
  const suppressed = after.reduce((n, l) => n + Number(l.suppressed ?? 0), 0);
  assert.equal(rejectedLines + suppressed, N, 'every refusal is either logged or counted in a summary');
  t.diagnostic(`${N} refusals: ${rejectedLines} refusal lines and ${after.length} summary lines`);
});

test('a shared RateLimitedLog spreads one budget over several proxies', async () => {
  const app = await echoApp();
  const p = await pair(app.port, {});
  const shared = new RateLimitedLog(p.log, { burst: 2 });
  const q = await pair(app.port, { inbound: { logLimit: shared }, outbound: { logLimit: shared } });
  for (let i = 0; i < 10; i++) assert.equal(await attempt(q.inboundPort, 'plaintext\r\n'), 'ECONNRESET');
  assert.equal(q.metrics.get('knit_inbound_rejected_total', { service: 'api', reason: 'not a TLS client' }), 10);
  const plain = p.lines.filter((l) => l.event === EVENTS.connRejected && l.reason === 'not a TLS client');
  assert.equal(plain.length, 2, 'the shared limiter wrote into the logger it was given, two lines');
});
