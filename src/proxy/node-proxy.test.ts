/**
 * The node proxy's refusals, decisions and renewals as a peer sees them,
 * against real hosts (test/helpers/mesh-pair.ts). hbone.test.ts covers the
 * happy paths; tcp.test.ts the TCP behaviour; hostile-certs.test.ts every
 * certificate refusal; route-pipeline.test.ts endpoint choice; limits.test.ts
 * the caps.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import http2 from 'node:http2';
import net from 'node:net';
import tls from 'node:tls';
import { once } from 'node:events';
import { X509Certificate } from 'node:crypto';
import { apiAt, dial, fakeAgent, hboneAttempt, listen, readAll, startMesh, WEB_TO_API, type Mesh } from '../../test/helpers/mesh-pair.js';
import { until } from '../../test/helpers/wait.js';
import { sniFor } from './hbone/wire.js';

const cleanups: Array<() => unknown> = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function setup(): Promise<{ mesh: Mesh; app: { port: number } }> {
  const app = await listen((s) => {
    s.on('error', () => undefined);
    s.pipe(s);
  });
  cleanups.push(() => app.server.close());
  const mesh = await startMesh(app.port);
  cleanups.push(() => mesh.close());
  return { mesh, app };
}

/** Sends a line and resolves with the echo, or rejects with the socket's error or close. */
function roundTrip(s: net.Socket, msg: string): Promise<string> {
  return new Promise((resolve, reject) => {
    s.once('data', (d: Buffer) => resolve(d.toString()));
    s.once('error', reject);
    s.once('close', () => reject(new Error('closed')));
    s.write(msg);
  });
}

/** A raw TLS client to an HBONE port with `opts`; resolves once it closed (unserved), with whether its handshake completed and the ALPN it got. */
async function rawTls(port: number, opts: tls.ConnectionOptions): Promise<{ handshake: boolean; alpn?: string | false | null }> {
  const s = tls.connect({ host: '127.0.0.1', port, checkServerIdentity: () => undefined, ...opts });
  s.on('error', () => undefined);
  let alpn: string | false | null | undefined;
  const handshake = await new Promise<boolean>((resolve) => {
    s.once('secureConnect', () => {
      alpn = s.alpnProtocol;
      resolve(true);
    });
    s.once('close', () => resolve(false));
  });
  if (!s.closed) await new Promise((resolve) => s.once('close', resolve));
  return { handshake, alpn };
}

const rejected = (m: Mesh, service: string, reason: string) => m.b.metrics.get('knit_inbound_rejected_total', { service, reason });

test('the HBONE listener refuses what is not HBONE from a mesh service, each with a reason, counted, and keeps serving', async () => {
  const { mesh, app } = await setup();
  const td = mesh.pki.trustDomain;
  const port = mesh.b.proxy.hbonePort;
  const web = await mesh.pki.leaf('web');
  const asWeb = { ca: web.trustBundlePem, cert: web.certChainPem, key: web.keyPem };

  // Plaintext: reset, and not a byte back.
  const plain = await dial(port);
  const plainEnded = readAll(plain);
  plain.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
  assert.deepEqual(await plainEnded, { data: '', error: 'ECONNRESET' }, 'a plaintext client is reset, and gets no byte back');
  await until('plaintext counted', () => rejected(mesh, '', 'not a TLS client') === 1);

  // TLS without SNI: no service named, so no certificate to present.
  assert.deepEqual(await rawTls(port, { ...asWeb, ALPNProtocols: ['h2'] }), { handshake: false, alpn: undefined });
  await until('no SNI counted', () => rejected(mesh, '', 'no SNI: the client did not name the service it calls') === 1);

  // An SNI naming no service of this host.
  assert.deepEqual(await rawTls(port, { ...asWeb, ALPNProtocols: ['h2'], servername: sniFor('nosuch', 'default', td) }), { handshake: false, alpn: undefined });
  await until('unknown service counted', () => rejected(mesh, '', 'no local service of that name (SNI)') === 1);

  // ALPN: offering only something else fails the handshake; offering nothing is refused right after it.
  assert.deepEqual(await rawTls(port, { ...asWeb, ALPNProtocols: ['http/1.1'], servername: sniFor('api', 'default', td) }), { handshake: false, alpn: undefined });
  await until('wrong ALPN counted', () => rejected(mesh, '', 'client did not offer HBONE (ALPN h2)') === 1);
  assert.deepEqual(await rawTls(port, { ...asWeb, servername: sniFor('api', 'default', td) }), { handshake: true, alpn: false });
  await until('no ALPN counted', () => rejected(mesh, 'api', 'client did not negotiate HBONE (ALPN h2)') === 1);

  // A valid identity with no intention: the tunnel is accepted (who it is is proven), each stream is denied (403).
  const db = await mesh.pki.leaf('db');
  const denied = await hboneAttempt(port, { trustDomain: td, ca: db.trustBundlePem, cert: db.certChainPem, key: db.keyPem, authority: `127.0.0.1:${app.port}` });
  assert.deepEqual(denied, { end: 'status', status: 403, reason: 'default (deny)' });
  assert.equal(mesh.b.metrics.get('knit_inbound_connections_total', { service: 'api', source: 'db', decision: 'deny', rule: 'default (deny)' }), 1);

  // Streams that are not a CONNECT to host:port are refused on a good tunnel (400), which keeps serving.
  const s = tls.connect({ host: '127.0.0.1', port, ...asWeb, servername: sniFor('api', 'default', td), ALPNProtocols: ['h2'], checkServerIdentity: () => undefined });
  await once(s, 'secureConnect');
  const session = http2.connect(`https://127.0.0.1:${port}`, { createConnection: () => s });
  session.on('error', () => undefined);
  cleanups.push(() => session.destroy());
  const ask = (headers: http2.OutgoingHttpHeaders) =>
    new Promise<{ status: number; reason: string }>((resolve) => {
      const st = session.request(headers, { endStream: false });
      st.on('error', () => undefined);
      st.once('response', (h) => resolve({ status: Number(h[':status']), reason: String(h['knit-reason'] ?? '') }));
    });
  assert.deepEqual(await ask({ ':method': 'GET', ':path': '/' }), { status: 400, reason: 'not a CONNECT (GET)' });
  assert.deepEqual(await ask({ ':method': 'CONNECT', ':authority': 'api' }), { status: 400, reason: 'malformed :authority api' });
  assert.equal((await ask({ ':method': 'CONNECT', ':authority': `127.0.0.1:${app.port}` })).status, 200);
  assert.equal(rejected(mesh, 'api', 'not a CONNECT (GET)'), 1);

  // And the listener still serves allowed peers, end to end.
  assert.deepEqual(await hboneAttempt(port, { trustDomain: td, ...asWeb, authority: `127.0.0.1:${app.port}` }), { end: 'echoed', data: 'hello' });
  const c = await dial(mesh.upstreamPort);
  assert.equal(await roundTrip(c, 'through a'), 'through a');
  c.destroy();
});

test('an intention change to deny closes the open connection with a reset, counts it, and refuses the next', async () => {
  const { mesh } = await setup();
  const s = await dial(mesh.upstreamPort);
  assert.equal(await roundTrip(s, 'before'), 'before');
  await until('the flow is open on both hosts', () => mesh.a.proxy.flows.size === 1 && mesh.b.proxy.flows.size === 1);
  const ended = readAll(s);
  mesh.setIntentions({ defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'deny' }] });
  // The node proxy resets a denied flow both ways (node-proxy.ts): an application reading until EOF must not
  // take what it got for a complete answer. (The per-service proxies it replaced closed them in order.)
  assert.deepEqual(await ended, { data: '', error: 'ECONNRESET' });
  await until('untracked on both hosts', () => mesh.a.proxy.flows.size === 0 && mesh.b.proxy.flows.size === 0);
  assert.equal(mesh.b.metrics.get('knit_inbound_closed_by_policy_total', { service: 'api', rule: 'intention web -> api (deny)' }), 1);
  assert.equal(mesh.b.metrics.get('knit_tcp_connections_closed_total', { reporter: 'destination', source_service: 'web', destination_service: 'api', end: 'policy' }), 1);
  // A new connection is refused: its stream is denied (403) and host a resets the application's connection.
  const again = await dial(mesh.upstreamPort);
  await assert.rejects(roundTrip(again, 'after'), { code: 'ECONNRESET' });
  assert.equal(mesh.b.metrics.get('knit_inbound_connections_total', { service: 'api', source: 'web', decision: 'deny', rule: 'intention web -> api (deny)' }), 1);
  assert.equal(mesh.a.metrics.get('knit_outbound_connections_total', { service: 'web', upstream: 'api', result: 'denied' }), 1);
  // Allowed again: served again, on the same tunnel.
  mesh.setIntentions(WEB_TO_API);
  const third = await dial(mesh.upstreamPort);
  assert.equal(await roundTrip(third, 'allowed'), 'allowed');
  third.destroy();
  assert.equal(mesh.a.metrics.get('knit_hbone_dials_total', { result: 'ok' }), 1);
});

const fingerprint = (pem: string) => new X509Certificate(pem).fingerprint256;

test('renewals: a renewed leaf is served to new clients and presented on new tunnels, while open connections keep flowing', async () => {
  const { mesh, app } = await setup();
  const td = mesh.pki.trustDomain;
  const s = await dial(mesh.upstreamPort);
  assert.equal(await roundTrip(s, 'old'), 'old');
  const apiLeaf = await mesh.pki.leaf('api');
  const webLeaf = await mesh.pki.leaf('web');
  mesh.b.proxy.setServiceTls('api', apiLeaf);
  mesh.a.proxy.setServiceTls('web', webLeaf);
  assert.equal(await roundTrip(s, 'still'), 'still', 'the connection opened before the renewals still works');
  const t = await dial(mesh.upstreamPort);
  assert.equal(await roundTrip(t, 'new'), 'new');
  s.destroy();
  t.destroy();

  // Host b serves api's renewed leaf to a new client...
  const web = await mesh.pki.leaf('web');
  const c = tls.connect({ host: '127.0.0.1', port: mesh.b.proxy.hbonePort, ca: web.trustBundlePem, cert: web.certChainPem, key: web.keyPem, servername: sniFor('api', 'default', td), ALPNProtocols: ['h2'], checkServerIdentity: () => undefined });
  await once(c, 'secureConnect');
  assert.equal(c.getPeerX509Certificate()?.fingerprint256, fingerprint(apiLeaf.certChainPem), 'host b serves the renewed leaf');
  c.destroy();
  // ...and host a presents web's renewed leaf on a new tunnel.
  const agent = await fakeAgent({ cert: apiLeaf.certChainPem, key: apiLeaf.keyPem });
  cleanups.push(() => agent.close());
  mesh.upstream.setEndpoints([apiAt(agent.port, app.port)]);
  const u = await dial(mesh.upstreamPort);
  assert.equal(await roundTrip(u, 'x'), 'x');
  u.destroy();
  assert.deepEqual(agent.clientCerts, [fingerprint(webLeaf.certChainPem)], 'host a presents the renewed leaf');
});
