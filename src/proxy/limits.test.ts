/**
 * Connection caps and logging under floods, against a real node proxy's
 * two listeners (an upstream listener and the HBONE listener): over a cap a
 * connection is refused at once, counted, and logged at a bounded rate; a
 * port scan is counted connection by connection but costs only a handful
 * of log lines.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { ConnectionLimit, isOverLimit, tcpOptions, DEFAULT_TCP } from './limits.js';
import { startMesh, listen, type Mesh, type LogLine } from '../../test/helpers/mesh-pair.js';
import { RateLimitedLog } from '../log/ratelimit.js';
import { EVENTS } from '../log/logger.js';
import { until } from '../../test/helpers/wait.js';
import type { Metrics } from '../log/metrics.js';
import type { NodeProxyOptions } from './node-proxy.js';

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

/** The distinct values of `label` among a counter's label sets matching `where`. */
function labelValues(metrics: Metrics, name: string, label: string, where: Record<string, string> = {}): string[] {
  const out = new Set<string>();
  for (const line of metrics.render().split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    if (!Object.entries(where).every(([k, v]) => line.includes(`${k}="${v}"`))) continue;
    const m = new RegExp(`${label}="((?:[^"\\\\]|\\\\.)*)"`).exec(line);
    if (m) out.add(m[1]!);
  }
  return [...out];
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

async function mesh(appPort: number, opts: { a?: Partial<NodeProxyOptions>; b?: Partial<NodeProxyOptions> } = {}): Promise<Mesh> {
  const m = await startMesh(appPort, opts);
  cleanups.push(() => m.close());
  return m;
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

/** Connections to `port` that stay open (and, at an HBONE port, never start their handshake). */
async function hold(port: number, n: number, opts: { echo?: boolean } = {}): Promise<net.Socket[]> {
  const held: net.Socket[] = [];
  for (let i = 0; i < n; i++) {
    const s = net.connect({ port, host: '127.0.0.1', noDelay: true });
    s.on('error', () => undefined);
    await once(s, 'connect');
    if (opts.echo) {
      s.write('x');
      await once(s, 'data');
    }
    held.push(s);
  }
  cleanups.push(() => held.forEach((s) => s.destroy()));
  return held;
}

test('over an upstream listener\'s cap, application connections are refused at once, each counted, logged at a bounded rate', async () => {
  const app = await echoApp();
  const m = await mesh(app.port);
  const up = await m.a.proxy.addUpstream({ source: 'web', destination: 'api', listenHost: '127.0.0.1', listenPort: 0, maxConnections: 5 });
  up.setEndpoints([m.api]);
  // Five open connections (through the mesh to the app) hold the five slots.
  const holders = await hold(up.port, 5, { echo: true });
  const t0 = Date.now();
  const ends = await Promise.all(Array.from({ length: 200 }, () => attempt(up.port)));
  assert.ok(ends.every((e) => e === 'ECONNRESET'), `every one refused with a reset: ${[...new Set(ends)].join()}`);
  assert.ok(Date.now() - t0 < 3000, 'at once');
  assert.equal(m.a.metrics.get('knit_outbound_connections_total', { service: 'web', upstream: 'api', result: 'over_limit' }), 200);
  const logged = m.a.lines.filter((l) => l.event === EVENTS.connOverLimit);
  assert.ok(logged.length >= 1 && logged.length <= 5, `at most a burst of lines (${logged.length})`);
  assert.equal(logged[0]?.reason, 'listener connection limit (5) reached');
  // Slots come back when connections close: the listener serves again.
  for (const s of holders) s.destroy();
  await until('a slot is free again and the upstream serves', async () => (await echoOnce(up.port)) === 'ok');
});

test('over the host cap, HBONE connections are refused before TLS, at once, each counted, logged at a bounded rate', async () => {
  const app = await echoApp();
  const m = await mesh(app.port, { b: { hostLimit: new ConnectionLimit('host', 5) } });
  // Five connections that never start their handshake hold the five slots.
  const holders = await hold(m.b.proxy.hbonePort, 5);
  const t0 = Date.now();
  const ends = await Promise.all(Array.from({ length: 200 }, () => attempt(m.b.proxy.hbonePort)));
  assert.ok(ends.every((e) => e === 'ECONNRESET'), `every one refused with a reset: ${[...new Set(ends)].join()}`);
  assert.ok(Date.now() - t0 < 3000, 'at once, not after a handshake timeout');
  assert.equal(m.b.metrics.get('knit_inbound_rejected_total', { service: '', reason: 'host connection limit (5) reached' }), 200);
  const logged = m.b.lines.filter((l) => l.event === EVENTS.connRejected && l.reason === 'host connection limit (5) reached');
  assert.ok(logged.length >= 1 && logged.length <= 5, `at most a burst of lines (${logged.length})`);
  // Slots come back when connections close: the mesh serves again.
  for (const s of holders) s.destroy();
  await until('a slot is free again and the mesh serves', async () => (await echoOnce(m.upstreamPort)) === 'ok');
});

test('a host limit caps every listener of the host together', async () => {
  const app = await echoApp();
  const host = new ConnectionLimit('host', 3);
  const m = await mesh(app.port, { a: { hostLimit: host } });
  const second = await m.a.proxy.addUpstream({ source: 'web', destination: 'api', listenHost: '127.0.0.1', listenPort: 0 });
  second.setEndpoints([m.api]);
  await hold(m.upstreamPort, 2, { echo: true });
  await hold(second.port, 1, { echo: true });
  assert.equal(host.open, 3);
  // Both listeners are under their own cap, but the host is full.
  assert.equal(await attempt(second.port, 'b'), 'ECONNRESET');
  assert.equal(await attempt(m.upstreamPort, 'c'), 'ECONNRESET');
  assert.equal(m.a.metrics.get('knit_outbound_connections_total', { service: 'web', upstream: 'api', result: 'over_limit' }), 2);
  assert.ok(m.a.lines.some((l) => l.event === EVENTS.connOverLimit && l.reason === 'host connection limit (3) reached'));
});

test('regression: streams over an HBONE tunnel, and same-host hand-offs, were not counted against the host connection limit', async () => {
  // One tunnel is one TCP connection at the destination but carries up to 100 application connections,
  // each a socket to the local application: they were held against no limit at all.
  const app = await echoApp();
  const bHost = new ConnectionLimit('host', 2);
  const m = await mesh(app.port, { b: { hostLimit: bHost } });
  const [first] = await hold(m.upstreamPort, 1, { echo: true });
  assert.equal(bHost.open, 2, 'on b: the tunnel\'s connection and the stream\'s connection to the application');
  // A second application connection rides the same tunnel; its stream is refused: b is full.
  assert.equal(await attempt(m.upstreamPort, 'x'), 'ECONNRESET');
  assert.equal(m.b.metrics.get('knit_inbound_rejected_total', { service: 'api', reason: 'host connection limit (2) reached' }), 1);
  assert.equal(m.a.metrics.get('knit_outbound_connections_total', { service: 'web', upstream: 'api', result: 'refused' }), 1);
  assert.equal(m.a.proxy.tunnels().length, 1, 'on the same tunnel, which stays up');
  first!.destroy();
  await until('the stream\'s slot is released', () => bHost.open === 1);
  assert.equal(await echoOnce(m.upstreamPort), 'ok', 'served again');

  // The same-host path: the application's connection to the upstream and knit's to the local app, two slots.
  const aHost = new ConnectionLimit('host', 3);
  const local = await mesh(app.port, { a: { hostLimit: aHost } });
  local.a.proxy.setService('a/api', { name: 'api', port: app.port, target: { host: '127.0.0.1', port: app.port } });
  local.upstream.setEndpoints([{ ...local.api, id: 'a/api', node: 'a' }]);
  await hold(local.upstreamPort, 1, { echo: true });
  assert.equal(aHost.open, 2);
  // The next takes the third slot at the upstream, and its hand-off to the application finds the host full.
  assert.equal(await attempt(local.upstreamPort, 'y'), 'ECONNRESET');
  assert.equal(local.a.metrics.get('knit_outbound_connections_total', { service: 'web', upstream: 'api', result: 'over_limit' }), 1);
  await until('released', () => aHost.open === 2);
});

/** What a scanner does to `port`: `n` connections, 100 at a time, each closed at once, sent garbage, or reset. */
async function scan(port: number, n: number): Promise<void> {
  let next = 0;
  async function worker(): Promise<void> {
    while (next < n) {
      const k = next++;
      const s = net.connect(port, '127.0.0.1');
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
}

/**
 * Asserts that `lines` logged `event` at a bounded rate (a burst of 5 per
 * kind and 10 s window: the scan takes a few seconds, allow three windows)
 * and that, once flushed, every one of `n` refusals was either logged or
 * counted in a summary line.
 */
function assertBoundedLog(lines: LogLine[], event: string, kinds: number, n: number, flushedFrom: number): { logged: number; summaries: number } {
  const logged = lines.filter((l) => l.event === event).length;
  assert.ok(logged <= kinds * 5 * 3, `${logged} lines for ${n} refusals of ${kinds} kinds`);
  const summaries = lines.filter((l) => l.event === EVENTS.logSuppressed && l.suppressedEvent === event);
  assert.ok(summaries.length >= 1 && summaries.length <= kinds * 3, `the suppressed lines are summarized (${summaries.length} summaries)`);
  assert.ok(lines.length > flushedFrom, 'the flush on close wrote the last summaries');
  const suppressed = summaries.reduce((k, l) => k + Number(l.suppressed ?? 0), 0);
  assert.equal(logged + suppressed, n, 'every refusal is either logged or counted in a summary');
  return { logged, summaries: summaries.length };
}

test('a port scan of 10k connections at the HBONE port is counted connection by connection but logs a handful of lines', async (t) => {
  const app = await echoApp();
  const m = await mesh(app.port);
  const N = 10_000;
  await scan(m.b.proxy.hbonePort, N);
  await until('every connection counted', () => total(m.b.metrics, 'knit_inbound_rejected_total') === N, 30_000);
  // Refused during the handshake, before SNI names a service.
  const kinds = labelValues(m.b.metrics, 'knit_inbound_rejected_total', 'reason');
  assert.ok(kinds.length >= 1 && kinds.length <= 3, `a few kinds of refusal: ${kinds.join(' | ')}`);
  assert.equal(total(m.b.metrics, 'knit_inbound_rejected_total', { service: '' }), N);
  const before = m.b.lines.length;
  await m.b.proxy.close();
  const r = assertBoundedLog(m.b.lines, EVENTS.connRejected, kinds.length, N, before);
  t.diagnostic(`${N} refusals (${kinds.join(', ')}): ${r.logged} refusal lines and ${r.summaries} summary lines`);
});

test('a scan of 10k connections at an upstream whose destination has no endpoint is counted connection by connection but logs a handful of lines', async (t) => {
  const app = await echoApp();
  const m = await mesh(app.port);
  m.upstream.setEndpoints([]);
  const N = 10_000;
  await scan(m.upstreamPort, N);
  const failed = () => m.a.metrics.get('knit_outbound_connections_total', { service: 'web', upstream: 'api', result: 'no_endpoint' });
  await until('every connection counted', () => failed() === N, 30_000);
  const before = m.a.lines.length;
  await m.a.proxy.close();
  const r = assertBoundedLog(m.a.lines, EVENTS.connFailed, 1, N, before);
  t.diagnostic(`${N} failures: ${r.logged} lines and ${r.summaries} summary lines`);
});

test('a shared RateLimitedLog spreads one budget over several node proxies', async () => {
  const app = await echoApp();
  const p = await mesh(app.port);
  const shared = new RateLimitedLog(p.b.log, { burst: 2 });
  const q = await mesh(app.port, { b: { logLimit: shared } });
  for (let i = 0; i < 10; i++) assert.equal(await attempt(q.b.proxy.hbonePort, 'plaintext\r\n'), 'ECONNRESET');
  assert.equal(q.b.metrics.get('knit_inbound_rejected_total', { service: '', reason: 'not a TLS client' }), 10);
  const plain = p.b.lines.filter((l) => l.event === EVENTS.connRejected && l.reason === 'not a TLS client');
  assert.equal(plain.length, 2, 'the shared limiter wrote into the logger it was given, two lines');
  assert.equal(q.b.lines.filter((l) => l.event === EVENTS.connRejected).length, 0, "and none into q's own");
});
