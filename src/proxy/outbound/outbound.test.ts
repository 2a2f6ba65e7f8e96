/**
 * Endpoint choice in the outbound proxy with real sockets: failures are
 * skipped within the same application connection, repeat offenders are
 * ejected so that new connections stop paying the connect timeout,
 * concurrent connections spread over the endpoints, and never all
 * endpoints are ejected.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { InboundProxy } from '../inbound/inbound.js';
import { OutboundProxy } from './outbound.js';
import { makePki, type TestPki } from '../../../test/helpers/pki.js';
import { until } from '../../../test/helpers/wait.js';
import { captureLog, endpoint, listen, readAll } from '../../../test/helpers/proxy-pair.js';
import { Metrics } from '../../log/metrics.js';
import { EVENTS } from '../../log/logger.js';

let pki: TestPki;
let app: { server: net.Server; port: number };
let good: InboundProxy;
let goodPort: number;
const metrics = new Metrics();
const { log, lines } = captureLog();
const cleanups: Array<() => unknown> = [];

/** A TCP listener that accepts and then never says a word: TLS handshakes to it hang (a black hole). */
async function blackHole() {
  const held: net.Socket[] = [];
  const srv = await listen((s) => {
    s.on('error', () => undefined);
    held.push(s);
  });
  cleanups.push(() => {
    for (const s of held) s.destroy();
    srv.server.close();
  });
  return { port: srv.port, accepted: () => held.length };
}

/** A port nothing listens on: connections to it are refused. */
async function closedPort(): Promise<number> {
  const srv = await listen(() => undefined);
  await new Promise<void>((r) => srv.server.close(() => r()));
  return srv.port;
}

async function outbound(extra: Partial<ConstructorParameters<typeof OutboundProxy>[0]> = {}) {
  const o = new OutboundProxy({
    source: 'web', destination: 'api', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: 0, tls: await pki.leaf('web'), log, metrics,
    ...extra,
  });
  const port = await o.start();
  cleanups.push(() => o.close());
  return { o, port };
}

/** One application connection: sends `msg`, resolves with the echo (or how it failed) and how long it took. */
async function exchange(port: number, msg: string): Promise<{ echo?: string; error?: string; ms: number }> {
  const t0 = performance.now();
  // Not `dial`: a connection refused at once may be reset before its connect completes.
  const s = net.connect({ port, host: '127.0.0.1', noDelay: true });
  const got = new Promise<{ echo?: string; error?: string }>((resolve) => {
    s.once('data', (d: Buffer) => resolve({ echo: d.toString() }));
    void readAll(s).then((r) => resolve({ error: r.error ?? 'closed' }));
  });
  s.write(msg);
  const r = await got;
  s.destroy();
  return { ...r, ms: performance.now() - t0 };
}

const count = (name: string, labels: Record<string, string> = {}) => metrics.get(name, { service: 'web', upstream: 'api', ...labels });

before(async () => {
  pki = await makePki();
  app = await listen((s) => {
    s.on('error', () => undefined);
    s.pipe(s);
  });
  good = new InboundProxy({
    service: 'api', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: 0, targetHost: '127.0.0.1', targetPort: app.port,
    tls: await pki.leaf('api'), authorize: () => ({ allow: true, reason: 'default', rule: 'default (allow)' }), log, metrics,
  });
  goodPort = await good.start();
});

after(async () => {
  for (const c of cleanups.reverse()) await c();
  await good.close();
  app.server.close();
});

test('a black-holed and a refusing endpoint are skipped within each connection, then ejected: no connection fails, later ones do not wait the connect timeout', async () => {
  const hole = await blackHole();
  const refused = await closedPort();
  const connectTimeoutMs = 400;
  const { o, port } = await outbound({ connectTimeoutMs, outlier: { consecutiveFailures: 2, baseEjectionMs: 60_000 } });
  o.setEndpoints([endpoint(hole.port), endpoint(refused), endpoint(goodPort)]);
  const results: Array<{ echo?: string; error?: string; ms: number }> = [];
  for (let i = 0; i < 12; i++) results.push(await exchange(port, `m${i}`));
  assert.deepEqual(results.map((r) => r.echo), results.map((_, i) => `m${i}`), `every application connection succeeded: ${JSON.stringify(results)}`);
  // Round-robin meets each bad endpoint at most once per connection; two failures in a row eject it.
  assert.equal(count('knit_outbound_endpoint_failures_total', { reason: 'timeout' }), 2);
  assert.equal(count('knit_outbound_endpoint_failures_total', { reason: 'refused' }), 2);
  assert.equal(count('knit_outbound_ejections_total'), 2);
  assert.equal(hole.accepted(), 2, 'the black hole saw no connection after its ejection');
  const ejected = o.endpointStates.filter((s) => s.ejectedUntil !== undefined).map((s) => s.key);
  assert.deepEqual(ejected.sort(), [`127.0.0.1:${hole.port}`, `127.0.0.1:${refused}`].sort());
  // After both ejections (by the 4th connection at the latest), none waits on the black hole.
  for (const r of results.slice(4)) assert.ok(r.ms < connectTimeoutMs / 2, `a connection after the ejections took ${r.ms.toFixed(0)} ms`);
  assert.equal(count('knit_outbound_connections_total', { result: 'ok' }), 12);
  const ejectLines = lines.filter((l) => l.event === EVENTS.endpointEjected);
  assert.equal(ejectLines.length, 2, 'each ejection is logged');
  o.setEndpoints([]);
});

test('concurrent connections do not all land on the same failing endpoint', async () => {
  const hole = await blackHole();
  const { o, port } = await outbound({ connectTimeoutMs: 400, outlier: { consecutiveFailures: 100 } });
  // Two good endpoints: a second inbound in front of the same application.
  const second = new InboundProxy({
    service: 'api', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: 0, targetHost: '127.0.0.1', targetPort: app.port,
    tls: await pki.leaf('api'), authorize: () => ({ allow: true, reason: 'default', rule: 'default (allow)' }), log, metrics,
  });
  const secondPort = await second.start();
  cleanups.push(() => second.close());
  o.setEndpoints([endpoint(hole.port), endpoint(goodPort), endpoint(secondPort)]);
  const results = await Promise.all(Array.from({ length: 6 }, (_, i) => exchange(port, `c${i}`)));
  assert.deepEqual(results.map((r) => r.echo).sort(), ['c0', 'c1', 'c2', 'c3', 'c4', 'c5']);
  // Round-robin from one start: of six connections begun together, one in three begins at the black hole.
  assert.equal(hole.accepted(), 2);
});

test('a server that fails its identity check is skipped for the next endpoint within the same connection', async () => {
  const impostor = new InboundProxy({
    service: 'db', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: 0, targetHost: '127.0.0.1', targetPort: app.port,
    tls: await pki.leaf('db'), authorize: () => ({ allow: true, reason: 'default', rule: 'default (allow)' }), log, metrics,
  });
  const impostorPort = await impostor.start();
  cleanups.push(() => impostor.close());
  const { o, port } = await outbound({ random: () => 0 });
  // Round-robin starts at the impostor (random 0), so the first connection meets it first.
  o.setEndpoints([endpoint(impostorPort), endpoint(goodPort)]);
  const identityBefore = count('knit_outbound_endpoint_failures_total', { reason: 'identity' });
  for (let i = 0; i < 4; i++) assert.equal((await exchange(port, `i${i}`)).echo, `i${i}`);
  assert.ok(count('knit_outbound_endpoint_failures_total', { reason: 'identity' }) > identityBefore, 'the impostor was tried and refused');
  const why = `server is spiffe://${pki.trustDomain}/ns/default/svc/db, expected spiffe://${pki.trustDomain}/ns/default/svc/api`;
  assert.ok(count('knit_outbound_rejected_total', { reason: why }) >= 1);
});

test('never all ejected: when every endpoint is ejected the least recently failed is still tried, and recovers', async () => {
  // A port that refuses now and will serve later: take a free port, close it, and listen on it again later.
  const refusing = await closedPort();
  const { o, port } = await outbound({ outlier: { consecutiveFailures: 1, baseEjectionMs: 60_000 } });
  o.setEndpoints([endpoint(refusing)]);
  const first = await exchange(port, 'x');
  assert.equal(first.error, 'ECONNRESET', 'refused: the application connection is reset at once');
  assert.equal(o.endpointStates[0]?.ejectedUntil !== undefined, true, 'and the endpoint is ejected');
  const attemptsBefore = count('knit_outbound_endpoint_failures_total', { reason: 'refused' });
  assert.equal((await exchange(port, 'y')).error, 'ECONNRESET');
  assert.equal(count('knit_outbound_endpoint_failures_total', { reason: 'refused' }), attemptsBefore + 1, 'the ejected endpoint was tried anyway: it is the only one');
  // The instance comes back on the same port: the next connection reaches it despite the ejection.
  const back = new InboundProxy({
    service: 'api', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: refusing, targetHost: '127.0.0.1', targetPort: app.port,
    tls: await pki.leaf('api'), authorize: () => ({ allow: true, reason: 'default', rule: 'default (allow)' }), log, metrics,
  });
  await back.start();
  cleanups.push(() => back.close());
  assert.equal((await exchange(port, 'z')).echo, 'z');
  assert.equal(o.endpointStates[0]?.ejections, 0, 'a success restores it');
  await until('restoration logged', () => lines.some((l) => l.event === EVENTS.endpointRestored));
});

test('no endpoint at all fails fast with a reset', async () => {
  const { port } = await outbound();
  const t0 = Date.now();
  const r = await exchange(port, 'x');
  assert.equal(r.error, 'ECONNRESET');
  assert.ok(Date.now() - t0 < 1000);
  assert.ok(count('knit_outbound_connections_total', { result: 'no_endpoint' }) >= 1);
});
