/**
 * The data plane behaves like TCP, end to end through a real outbound +
 * inbound pair over mTLS: half-close, resets passed on as resets, Nagle
 * off, keepalive on, idle connections closed.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { startPair, listen, dial, readAll, type Pair } from '../../test/helpers/proxy-pair.js';
import { until } from '../../test/helpers/wait.js';

const cleanups: Array<() => Promise<void> | void> = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** An application that reads the whole request, and only after its EOF replies and closes: like a server behind `nc -N`. */
async function replyAfterEof() {
  const seen: string[] = [];
  const app = await listen(
    (s) => {
      s.on('error', () => undefined);
      const chunks: Buffer[] = [];
      s.on('data', (d: Buffer) => chunks.push(d));
      s.on('end', () => {
        const req = Buffer.concat(chunks).toString();
        seen.push(req);
        s.end(`got ${req.length} bytes: ${req}`);
      });
    },
    { allowHalfOpen: true },
  );
  cleanups.push(() => void app.server.close());
  return { ...app, seen };
}

async function pair(appPort: number, extra: Parameters<typeof startPair>[1] = {}): Promise<Pair> {
  const p = await startPair(appPort, extra);
  cleanups.push(() => p.close());
  return p;
}

test('half-close: a client that shuts down its write side after its request gets the reply, as it does directly', async () => {
  const app = await replyAfterEof();
  const p = await pair(app.port);
  for (const [how, port] of [['direct', app.port], ['through knit', p.outboundPort]] as const) {
    const s = await dial(port, { allowHalfOpen: true });
    const reply = readAll(s);
    const closed = once(s, 'close');
    s.end('GET / HTTP/1.0\r\n\r\n'); // write, then shutdown(SHUT_WR), like `nc -N`
    assert.deepEqual(await reply, { data: 'got 18 bytes: GET / HTTP/1.0\r\n\r\n' }, how);
    await closed;
  }
  await until('both proxies let go of the connection once both directions ended', () => p.outbound.connections === 0 && p.inbound.connections === 0);
});

test('half-close the other way: the application ends first and still receives what the client sends afterwards', async () => {
  let received: Promise<string> | undefined;
  const app = await listen(
    (s) => {
      s.on('error', () => undefined);
      s.end('hello, then my side is done');
      received = readAll(s).then((r) => r.data);
    },
    { allowHalfOpen: true },
  );
  cleanups.push(() => void app.server.close());
  const p = await pair(app.port);
  const s = await dial(p.outboundPort, { allowHalfOpen: true });
  const closed = once(s, 'close');
  const greeting = await new Promise<string>((resolve) => {
    const chunks: Buffer[] = [];
    s.on('data', (d: Buffer) => chunks.push(d));
    s.once('end', () => resolve(Buffer.concat(chunks).toString()));
  });
  assert.equal(greeting, 'hello, then my side is done');
  assert.equal(p.outbound.connections, 1, 'one direction ended: the connection stays open');
  s.end('late words from the client');
  await until('app accepted', () => received !== undefined);
  assert.equal(await received, 'late words from the client');
  await closed;
});

test('a full close only when both directions ended: the reply may take its time after the client\'s EOF', async () => {
  let release: (() => void) | undefined;
  const app = await listen(
    (s) => {
      s.on('error', () => undefined);
      s.resume();
      s.on('end', () => (release = () => s.end('late reply')));
    },
    { allowHalfOpen: true },
  );
  cleanups.push(() => void app.server.close());
  const p = await pair(app.port);
  const s = await dial(p.outboundPort, { allowHalfOpen: true });
  const reply = readAll(s);
  s.end('request');
  await until('app saw the EOF', () => release !== undefined);
  assert.equal(p.outbound.connections, 1);
  assert.equal(p.inbound.connections, 1);
  release!();
  assert.deepEqual(await reply, { data: 'late reply' });
  await until('closed on both proxies', () => p.outbound.connections === 0 && p.inbound.connections === 0);
});

test('a reset by the application reaches the client as a reset, not as an orderly end', async () => {
  const app = await listen((s) => {
    s.on('error', () => undefined);
    // Acknowledge first, then reset on the next message: the RST does not trail fresh data (see reset() in forward/splice.ts).
    s.write('ack');
    s.once('data', () => s.once('data', () => s.resetAndDestroy()));
  });
  cleanups.push(() => void app.server.close());
  const p = await pair(app.port);
  const s = await dial(p.outboundPort);
  const ended = readAll(s);
  s.write('one');
  await until('ack', () => s.bytesRead >= 3);
  s.write('two');
  assert.deepEqual(await ended, { data: 'ack', error: 'ECONNRESET' });
});

test('a reset by the client reaches the application as a reset', async () => {
  let appEnded: Promise<{ data: string; error?: string }> | undefined;
  const app = await listen((s) => {
    s.on('error', () => undefined);
    appEnded = readAll(s);
    s.write('ready');
  });
  cleanups.push(() => void app.server.close());
  const p = await pair(app.port);
  const s = await dial(p.outboundPort);
  s.on('error', () => undefined);
  const ready = once(s, 'data');
  s.write('hi');
  await ready;
  await until('app accepted', () => appEnded !== undefined);
  s.resetAndDestroy();
  assert.deepEqual(await appEnded, { data: 'hi', error: 'ECONNRESET' });
});

test('a 4 MB exchange both ways through the pair arrives intact, with half-close', async () => {
  const size = 4 * 1024 * 1024;
  const app = await listen(
    (s) => {
      s.on('error', () => undefined);
      const h = createHash('sha256');
      s.on('data', (d: Buffer) => h.update(d));
      s.on('end', () => {
        const digest = h.digest('hex');
        // Reply with as much again, then the digest of what came in.
        s.write(Buffer.alloc(size, 7));
        s.end(`\n${digest}`);
      });
    },
    { allowHalfOpen: true },
  );
  cleanups.push(() => void app.server.close());
  const p = await pair(app.port);
  const payload = Buffer.alloc(size);
  for (let i = 0; i < size; i++) payload[i] = (i * 31) & 0xff;
  const s = await dial(p.outboundPort, { allowHalfOpen: true });
  const chunks: Buffer[] = [];
  s.on('data', (d: Buffer) => chunks.push(d));
  const done = once(s, 'end');
  s.end(payload);
  await done;
  const all = Buffer.concat(chunks);
  assert.equal(all.length, size + 65);
  assert.ok(all.subarray(0, size).every((b) => b === 7));
  assert.equal(all.subarray(size + 1).toString(), createHash('sha256').update(payload).digest('hex'));
});

/**
 * `rounds` request/response exchanges of small writes, each the first on a
 * new connection through `port`: a request written as two small writes (a
 * header, then a body), the reply awaited before the next. Resolves with
 * the elapsed ms.
 *
 * Why the first exchange of each connection: that is where a proxy's Nagle
 * shows. The outbound's first application bytes follow the TLS handshake's
 * last flight, still unacknowledged, so with Nagle on they wait for that
 * ACK, which the peer delays by Linux's minimum delayed-ACK time, 40 ms
 * (TCP_DELACK_MIN). Later exchanges on an established connection mostly
 * escape it (Linux's quick-ACK heuristics), so a ping-pong on one warm
 * connection measures almost nothing.
 */
async function pingPong(port: number, rounds: number): Promise<number> {
  const t0 = performance.now();
  for (let i = 0; i < rounds; i++) {
    const s = await dial(port);
    const got = once(s, 'data');
    s.write('len4');
    s.write(`p${String(i).padStart(3, '0')}`);
    await got;
    s.destroy();
  }
  return performance.now() - t0;
}

/** An application answering each 8-byte message (header + body) with one small write. */
async function pongApp() {
  const app = await listen((s) => {
    s.setNoDelay(true);
    s.on('error', () => undefined);
    let buffered = 0;
    s.on('data', (d: Buffer) => {
      buffered += d.length;
      while (buffered >= 8) {
        buffered -= 8;
        s.write('pong');
      }
    });
  });
  cleanups.push(() => void app.server.close());
  return app;
}

test('Nagle is off on every socket knit copies between: 20 small request/response exchanges are not held ~40 ms each by a delayed ACK', async () => {
  const app = await pongApp();
  const p = await pair(app.port);
  await pingPong(p.outboundPort, 2); // warm up: JIT, first handshakes
  const ms = await pingPong(p.outboundPort, 20);
  // A real timing bound, on purpose (see pingPong): with Nagle on any hop, each exchange waits ~40 ms for a
  // delayed ACK, 20 of them >= 800 ms (measured here: ~900 ms). With TCP_NODELAY on every socket knit copies
  // between, the 20 take ~60-80 ms, mostly TLS handshakes; 400 ms (half of 20 x 40 ms) leaves room for a
  // loaded machine and still fails if a hop keeps Nagle.
  assert.ok(ms < 400, `20 exchanges took ${ms.toFixed(1)} ms`);
});

test('noDelay: false keeps Nagle for bulk-only services (and still carries traffic)', async () => {
  const app = await pongApp();
  const p = await pair(app.port, { inbound: { tcp: { noDelay: false } }, outbound: { tcp: { noDelay: false } } });
  const ms = await pingPong(p.outboundPort, 5);
  assert.ok(ms > 0);
});

/** `ss` lines (with timers) of established TCP sockets on 127.0.0.1 matching a filter. */
function ssTimers(filter: string): string[] {
  const out = execFileSync('ss', ['-tnoH', 'state', 'established', filter], { encoding: 'utf8' });
  return out.split('\n').filter((l) => l.trim());
}

test('TCP keepalive is on for the mesh and application sockets, with the configured idle time', async (t) => {
  try {
    execFileSync('ss', ['-V']);
  } catch {
    t.skip('ss (iproute2) is not installed: npm test installs it');
    return;
  }
  const app = await listen((s) => {
    s.on('error', () => undefined);
    s.pipe(s);
  });
  cleanups.push(() => void app.server.close());
  const p = await pair(app.port, { inbound: { tcp: { keepAliveMs: 7_000 } }, outbound: { tcp: { keepAliveMs: 7_000 } } });
  const s = await dial(p.outboundPort);
  s.write('x');
  await once(s, 'data');
  // The four sockets knit holds: the application's connection to the outbound, the mesh connection at both
  // ends, and the inbound's connection to the application. Each shows a keepalive timer of at most 7 s.
  const filters = {
    'outbound <- app': `sport = :${p.outboundPort}`,
    'outbound -> mesh': `dport = :${p.inboundPort}`,
    'inbound <- mesh': `sport = :${p.inboundPort}`,
    'inbound -> app': `dport = :${app.port}`,
  };
  for (const [which, filter] of Object.entries(filters)) {
    // ss shows one timer per socket: a retransmission or delayed-ACK timer hides the keepalive one while
    // data is in flight, so look again until the socket is quiet.
    const line = await until(`${which} shows a keepalive timer`, () => {
      const lines = ssTimers(filter);
      assert.equal(lines.length, 1, `${which}: ${lines.join(' | ')}`);
      return /timer:\(keepalive,/.test(lines[0]!) ? lines[0] : undefined;
    });
    const m = /timer:\(keepalive,(\d+(?:\.\d+)?)(ms|sec|min)/.exec(line)!;
    const secs = Number(m[1]) * (m[2] === 'ms' ? 0.001 : m[2] === 'min' ? 60 : 1);
    assert.ok(secs > 0 && secs <= 7, `${which} probes after at most 7 s (${m[1]}${m[2]})`);
  }
  s.destroy();
});

test('an idle connection is closed after the idle timeout: a peer that vanished without a RST does not hold its descriptors', async () => {
  let appSide: Promise<{ data: string; error?: string }> | undefined;
  const app = await listen((s) => {
    s.on('error', () => undefined);
    appSide = readAll(s);
    s.write('hi');
  });
  cleanups.push(() => void app.server.close());
  const idle = { tcp: { idleTimeoutMs: 300 } };
  const p = await pair(app.port, { inbound: idle, outbound: idle });
  // The client says nothing after its first exchange and never closes: to the proxies it is exactly a
  // peer whose host vanished (no FIN, no RST ever comes).
  const s = await dial(p.outboundPort);
  s.on('error', () => undefined);
  const closed = once(s, 'close');
  await once(s, 'data');
  await until('tracked', () => p.outbound.connections === 1 && p.inbound.connections === 1);
  const t0 = Date.now();
  await until('both proxies closed the idle connection', () => p.outbound.connections === 0 && p.inbound.connections === 0, 5000);
  assert.ok(Date.now() - t0 >= 200, 'not before the idle timeout');
  await until('app accepted', () => appSide !== undefined);
  await appSide; // the application saw its connection closed
  await closed;
  assert.equal(p.metrics.get('knit_outbound_idle_closed_total', { service: 'web', upstream: 'api' }) + p.metrics.get('knit_inbound_idle_closed_total', { service: 'api' }) >= 1, true);
});

test('a connection that keeps talking is not closed by the idle timeout', async () => {
  const app = await listen((s) => {
    s.on('error', () => undefined);
    s.pipe(s);
  });
  cleanups.push(() => void app.server.close());
  const idle = { tcp: { idleTimeoutMs: 300 } };
  const p = await pair(app.port, { inbound: idle, outbound: idle });
  const s = await dial(p.outboundPort);
  const closed = once(s, 'close');
  let rounds = 0;
  const t0 = Date.now();
  // Traffic every ~100 ms for 1 s: three times the idle timeout, never idle for one.
  while (Date.now() - t0 < 1000) {
    const got = once(s, 'data');
    s.write('.');
    await got;
    rounds++;
    await until('100 ms passed', () => Date.now() - t0 >= rounds * 100, 1000, 20);
  }
  assert.equal(p.outbound.connections, 1, 'still open');
  s.destroy();
  await closed;
});
