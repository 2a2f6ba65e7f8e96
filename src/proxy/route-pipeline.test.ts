/**
 * Endpoint choice in the node proxy's outbound pipeline with real sockets
 * (accept -> route -> HBONE dial): endpoints are other hosts' agents. A
 * failure is skipped within the same application connection, repeat
 * offenders are ejected so that new connections stop paying the connect
 * timeout, concurrent connections spread over the endpoints, an agent that
 * proves the wrong identity is skipped, and never are all endpoints
 * ejected. (route.test.ts tests the Router's bookkeeping alone.)
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { EVENTS } from '../log/logger.js';
import { until } from '../../test/helpers/wait.js';
import { apiAt, fakeAgent, listen, readAll, startApiHost, startMesh, type Mesh } from '../../test/helpers/mesh-pair.js';
import type { NodeProxyOptions } from './node-proxy.js';

const cleanups: Array<() => unknown> = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** An echo application. */
async function echoApp() {
  const app = await listen((s) => {
    s.on('error', () => undefined);
    s.pipe(s);
  });
  cleanups.push(() => app.server.close());
  return app;
}

/** Host a (web, upstream to api) and host b (api in front of an echo app), host a tuned by `a`. */
async function mesh(a: Partial<NodeProxyOptions> = {}): Promise<{ mesh: Mesh; app: { port: number } }> {
  const app = await echoApp();
  const m = await startMesh(app.port, { a });
  cleanups.push(() => m.close());
  return { mesh: m, app };
}

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

const count = (m: Mesh, name: string, labels: Record<string, string> = {}) => m.a.metrics.get(name, { service: 'web', upstream: 'api', ...labels });

test('a black-holed and a refusing agent are skipped within each connection, then ejected: no connection fails, later ones do not wait the connect timeout', async () => {
  const connectTimeoutMs = 400;
  const { mesh: m } = await mesh({ connectTimeoutMs, outlier: { consecutiveFailures: 2, baseEjectionMs: 60_000 } });
  const hole = await blackHole();
  const refused = await closedPort();
  m.upstream.setEndpoints([apiAt(hole.port), apiAt(refused), m.api]);
  const results: Array<{ echo?: string; error?: string; ms: number }> = [];
  for (let i = 0; i < 12; i++) results.push(await exchange(m.upstreamPort, `m${i}`));
  assert.deepEqual(results.map((r) => r.echo), results.map((_, i) => `m${i}`), `every application connection succeeded: ${JSON.stringify(results)}`);
  // Round-robin meets each bad endpoint at most once per connection; two failures in a row eject it.
  assert.equal(count(m, 'knit_outbound_endpoint_failures_total', { reason: 'timeout' }), 2);
  assert.equal(count(m, 'knit_outbound_endpoint_failures_total', { reason: 'refused' }), 2);
  assert.equal(m.a.metrics.get('knit_hbone_dials_total', { result: 'timeout' }), 2);
  assert.equal(m.a.metrics.get('knit_hbone_dials_total', { result: 'refused' }), 2);
  assert.equal(count(m, 'knit_outbound_ejections_total'), 2);
  assert.equal(hole.accepted(), 2, 'the black hole saw no connection after its ejection');
  const ejected = m.upstream.router.states().filter((s) => s.ejectedUntil !== undefined).map((s) => s.key);
  assert.deepEqual(ejected.sort(), [`127.0.0.1:${hole.port}`, `127.0.0.1:${refused}`].sort());
  // After both ejections (by the 4th connection at the latest), none waits on the black hole.
  for (const r of results.slice(4)) assert.ok(r.ms < connectTimeoutMs / 2, `a connection after the ejections took ${r.ms.toFixed(0)} ms`);
  assert.equal(count(m, 'knit_outbound_connections_total', { result: 'ok' }), 12);
  assert.equal(m.a.lines.filter((l) => l.event === EVENTS.endpointEjected).length, 2, 'each ejection is logged');
  assert.equal(m.a.proxy.tunnels().length, 1, 'one tunnel, to host b, carried all twelve');
});

test('concurrent connections do not all land on the same failing agent, and those that do share one dial', async () => {
  const { mesh: m } = await mesh({ connectTimeoutMs: 400, outlier: { consecutiveFailures: 100 } });
  const hole = await blackHole();
  // Two good endpoints: host b, and host c with api in front of another echo app.
  const app2 = await echoApp();
  const c = await startApiHost(m, 'c', app2.port);
  cleanups.push(() => c.host.proxy.close());
  m.upstream.setEndpoints([apiAt(hole.port), m.api, c.api]);
  const results = await Promise.all(Array.from({ length: 6 }, (_, i) => exchange(m.upstreamPort, `c${i}`)));
  assert.deepEqual(results.map((r) => r.echo).sort(), ['c0', 'c1', 'c2', 'c3', 'c4', 'c5']);
  // Round-robin from one start: of six connections begun together, one in three begins at the black hole...
  assert.equal(count(m, 'knit_outbound_endpoint_failures_total', { reason: 'timeout' }), 2);
  // ...and the two wait on the same dial (one dial per tunnel key at a time), which times out once.
  assert.equal(hole.accepted(), 1);
  assert.equal(m.a.metrics.get('knit_hbone_dials_total', { result: 'timeout' }), 1);
});

test('an agent that fails its identity check is skipped for the next endpoint within the same connection, and hears nothing', async () => {
  const { mesh: m } = await mesh({ random: () => 0 });
  const db = await m.pki.leaf('db');
  const impostor = await fakeAgent({ cert: db.certChainPem, key: db.keyPem });
  cleanups.push(() => impostor.close());
  // Round-robin starts at the impostor (random 0), and comes back to it on every other pick.
  m.upstream.setEndpoints([apiAt(impostor.port), m.api]);
  for (let i = 0; i < 4; i++) assert.equal((await exchange(m.upstreamPort, `i${i}`)).echo, `i${i}`);
  assert.equal(count(m, 'knit_outbound_endpoint_failures_total', { reason: 'identity' }), 4, 'the impostor was tried by every connection, and refused');
  const why = `server is spiffe://${m.pki.trustDomain}/ns/default/svc/db, expected spiffe://${m.pki.trustDomain}/ns/default/svc/api`;
  assert.equal(count(m, 'knit_outbound_rejected_total', { reason: why }), 4);
  assert.equal(m.a.metrics.get('knit_hbone_dials_total', { result: 'identity' }), 4);
  assert.equal(count(m, 'knit_outbound_connections_total', { result: 'ok' }), 4);
  await impostor.closed();
  assert.equal(impostor.bytes(), 0, 'the impostor received no byte after its handshakes');
});

test('never all ejected: when every endpoint is ejected the least recently failed is still tried, and recovers', async () => {
  const { mesh: m, app } = await mesh({ outlier: { consecutiveFailures: 1, baseEjectionMs: 60_000 } });
  // A port that refuses now and will serve later: take a free port, close it, and listen on it again later.
  const refusing = await closedPort();
  m.upstream.setEndpoints([apiAt(refusing)]);
  const first = await exchange(m.upstreamPort, 'x');
  assert.equal(first.error, 'ECONNRESET', 'refused: the application connection is reset at once');
  assert.notEqual(m.upstream.router.states()[0]?.ejectedUntil, undefined, 'and the endpoint is ejected');
  const attemptsBefore = count(m, 'knit_outbound_endpoint_failures_total', { reason: 'refused' });
  assert.equal((await exchange(m.upstreamPort, 'y')).error, 'ECONNRESET');
  assert.equal(count(m, 'knit_outbound_endpoint_failures_total', { reason: 'refused' }), attemptsBefore + 1, 'the ejected endpoint was tried anyway: it is the only one');
  assert.equal(count(m, 'knit_outbound_connections_total', { result: 'connect_error' }), 2);
  // The agent comes back on the same port: the next connection reaches it despite the ejection.
  const back = await startApiHost(m, 'c', app.port, { hbonePort: refusing, apiPort: refusing });
  cleanups.push(() => back.host.proxy.close());
  assert.equal((await exchange(m.upstreamPort, 'z')).echo, 'z');
  assert.equal(m.upstream.router.states()[0]?.ejections, 0, 'a success restores it');
  await until('restoration logged', () => m.a.lines.some((l) => l.event === EVENTS.endpointRestored));
});

test('no endpoint at all fails fast with a reset', async () => {
  const { mesh: m } = await mesh();
  m.upstream.setEndpoints([]);
  const t0 = Date.now();
  const r = await exchange(m.upstreamPort, 'x');
  assert.equal(r.error, 'ECONNRESET');
  assert.ok(Date.now() - t0 < 1000);
  assert.equal(count(m, 'knit_outbound_connections_total', { result: 'no_endpoint' }), 1);
});

test('an endpoint registered without an HBONE port is skipped, not dialled', async () => {
  const { mesh: m } = await mesh();
  m.upstream.setEndpoints([{ ...apiAt(1), hbonePort: undefined }, m.api]);
  for (let i = 0; i < 3; i++) assert.equal((await exchange(m.upstreamPort, `h${i}`)).echo, `h${i}`);
  m.upstream.setEndpoints([{ ...apiAt(1), hbonePort: undefined }]);
  const r = await exchange(m.upstreamPort, 'x');
  assert.equal(r.error, 'ECONNRESET');
  assert.equal(count(m, 'knit_outbound_connections_total', { result: 'connect_error' }), 1);
});
