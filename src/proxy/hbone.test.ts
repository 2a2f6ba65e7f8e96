/**
 * The node proxy end to end on one machine: two hosts' proxies with real
 * certificates and real HBONE tunnels between them.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import http2 from 'node:http2';
import tls from 'node:tls';
import net from 'node:net';
import { once } from 'node:events';
import { createHash } from 'node:crypto';
import { startMesh, listen, dial, readAll, WEB_TO_API, type Mesh } from '../../test/helpers/mesh-pair.js';
import { until } from '../../test/helpers/wait.js';
import { sniFor } from './hbone/wire.js';

/** An HTTP app that answers every request with its path, and counts connections. */
async function httpApp(): Promise<{ port: number; connections: () => number; close: () => void }> {
  let n = 0;
  const server = http.createServer((req, res) => res.end(`hello ${req.url}`));
  server.on('connection', () => n++);
  server.keepAliveTimeout = 60_000;
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { port: (server.address() as net.AddressInfo).port, connections: () => n, close: () => server.close() };
}

const get = (port: number, path = '/', agent: http.Agent | false = false): Promise<string> =>
  new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port, path, agent }, (res) => {
      let b = '';
      res.on('data', (c: Buffer) => (b += c.toString()));
      res.on('end', () => resolve(b));
      res.on('error', reject);
    }).on('error', reject);
  });

const metric = (m: Mesh['a'], name: string, labels: Record<string, string> = {}): number => m.metrics.get(name, labels);

const cleanups: Array<() => Promise<void> | void> = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function setup(opts: Parameters<typeof startMesh>[1] = {}) {
  const app = await httpApp();
  const mesh = await startMesh(app.port, opts);
  cleanups.push(() => app.close(), () => mesh.close());
  return { app, mesh };
}

test('an application connection to another host rides an HBONE tunnel, decided at the destination with the rule named', async () => {
  const { mesh } = await setup();
  assert.equal(await get(mesh.upstreamPort, '/one'), 'hello /one');
  assert.equal(metric(mesh.b, 'knit_inbound_connections_total', { decision: 'allow', rule: 'intention web -> api (allow)', service: 'api', source: 'web' }), 1);
  assert.equal(mesh.a.proxy.tunnels().length, 1);
  assert.deepEqual(mesh.a.proxy.tunnels()[0]!.key.source.endsWith('/svc/web'), true);
  // Flows: an open keep-alive connection shows on both sides with both identities.
  const keep = new http.Agent({ keepAlive: true, maxSockets: 1 });
  await get(mesh.upstreamPort, '/two', keep);
  const inbound = mesh.b.proxy.flows.list().map((f) => f.view());
  assert.equal(inbound.length, 1);
  assert.match(inbound[0]!.source.id ?? '', /\/ns\/default\/svc\/web$/);
  assert.equal(inbound[0]!.rule, 'intention web -> api (allow)');
  assert.equal(mesh.a.proxy.flows.list()[0]?.view().side, 'outbound');
  keep.destroy();
});

test('many application connections share one tunnel: one TLS handshake per key, not per connection', async () => {
  const { mesh, app } = await setup();
  for (let i = 0; i < 30; i++) assert.equal(await get(mesh.upstreamPort, `/${i}`), `hello /${i}`);
  await Promise.all(Array.from({ length: 40 }, (_, i) => get(mesh.upstreamPort, `/c${i}`)));
  assert.equal(metric(mesh.a, 'knit_hbone_dials_total', { result: 'ok' }), 1, 'one handshake');
  assert.equal(mesh.a.proxy.tunnels().length, 1);
  assert.equal(mesh.a.proxy.tunnels()[0]!.carried, 70);
  assert.equal(app.connections(), 70, 'each application connection is its own connection to the app');
});

test('a burst of simultaneous connections to a cold key dials once per 100 streams, never two at a time', async () => {
  // Connections that stay open, so that streams pile up: the app answers only once all have arrived.
  let waiting: net.Socket[] = [];
  const burst = 250;
  const hold = await listen((s) => {
    waiting.push(s);
    if (waiting.length === burst) for (const w of waiting) w.end('ok');
  });
  cleanups.push(() => void hold.server.close());
  const { mesh } = await setup({ apiPort: hold.port });
  mesh.b.proxy.setService('b/api', { name: 'api', port: hold.port, target: { host: '127.0.0.1', port: hold.port } });
  const socks = await Promise.all(Array.from({ length: burst }, () => dial(mesh.upstreamPort)));
  for (const s of socks) s.write('x');
  const got = await Promise.all(socks.map((s) => readAll(s)));
  assert.ok(got.every((g) => g.data === 'ok'), JSON.stringify(got.filter((g) => g.data !== 'ok').slice(0, 3)));
  assert.equal(metric(mesh.a, 'knit_hbone_dials_total', { result: 'ok' }), 3, '250 streams at 100 per tunnel: three tunnels, three dials');
  waiting = [];
});

test('an intention change closes the denied flows at once; allowed flows between the same two hosts keep flowing', async () => {
  const { mesh, app } = await setup();
  // A second service on b, with its own tunnel from web: the same two agents, the same HBONE listener.
  mesh.b.proxy.setService('b/admin', { name: 'admin', port: app.port + 0, target: { host: '127.0.0.1', port: app.port } });
  // (admin is registered on a port of its own: give it a distinct one by a second app)
  const app2 = await httpApp();
  cleanups.push(() => app2.close());
  mesh.b.proxy.setService('b/admin', { name: 'admin', port: app2.port, target: { host: '127.0.0.1', port: app2.port } });
  mesh.b.proxy.setServiceTls('admin', await mesh.pki.leaf('admin'));
  const adminUp = await mesh.a.proxy.addUpstream({ source: 'web', destination: 'admin', listenHost: '127.0.0.1', listenPort: 0 });
  adminUp.setEndpoints([{ ...mesh.api, id: 'b/admin', service: 'admin', port: app2.port }]);
  mesh.setIntentions({ defaultAction: 'deny', intentions: [...WEB_TO_API.intentions, { source: 'web', destination: 'admin', action: 'allow' }] });
  const keepApi = new http.Agent({ keepAlive: true, maxSockets: 4 });
  const keepAdmin = new http.Agent({ keepAlive: true, maxSockets: 4 });
  await Promise.all([0, 1, 2].map((i) => get(mesh.upstreamPort, `/api${i}`, keepApi)));
  await Promise.all([0, 1, 2].map((i) => get(adminUp.port, `/admin${i}`, keepAdmin)));
  const adminSockets = Object.values(keepAdmin.freeSockets).flat();
  assert.equal(adminSockets.length, 3);
  const closed = adminSockets.map((s) => new Promise((r) => s!.once('close', r)));
  mesh.setIntentions({ defaultAction: 'deny', intentions: [...WEB_TO_API.intentions, { source: 'web', destination: 'admin', action: 'deny' }] });
  await Promise.all(closed);
  assert.equal(metric(mesh.b, 'knit_inbound_closed_by_policy_total', { service: 'admin', rule: 'intention web -> admin (deny)' }), 3);
  // The api connections were not touched, and still carry requests.
  assert.equal(Object.values(keepApi.freeSockets).flat().length, 3);
  assert.equal(await get(mesh.upstreamPort, '/after', keepApi), 'hello /after');
  await assert.rejects(get(adminUp.port, '/denied'), /ECONNRESET|socket hang up/);
  keepApi.destroy();
  keepAdmin.destroy();
});

test('a stream whose :authority names a service other than the one the tunnel proved is refused and counted', async () => {
  const { mesh, app } = await setup();
  const app2 = await httpApp();
  cleanups.push(() => app2.close());
  mesh.b.proxy.setService('b/db', { name: 'db', port: app2.port, target: { host: '127.0.0.1', port: app2.port } });
  mesh.b.proxy.setServiceTls('db', await mesh.pki.leaf('db'));
  // A hand-made HBONE client: web's certificate, a tunnel to api (SNI), a stream that names db's port.
  const web = await mesh.pki.leaf('web');
  const socket = tls.connect({
    host: '127.0.0.1', port: mesh.b.proxy.hbonePort, cert: web.certChainPem, key: web.keyPem, ca: web.trustBundlePem,
    servername: sniFor('api', 'default', mesh.pki.trustDomain), ALPNProtocols: ['h2'], checkServerIdentity: () => undefined,
  });
  await once(socket, 'secureConnect');
  const session = http2.connect(`https://127.0.0.1:${mesh.b.proxy.hbonePort}`, { createConnection: () => socket });
  const ask = (authority: string) => new Promise<{ status: number; reason: string }>((resolve) => {
    const s = session.request({ ':method': 'CONNECT', ':authority': authority });
    s.on('response', (h) => resolve({ status: Number(h[':status']), reason: String(h['knit-reason'] ?? '') }));
    s.on('error', () => undefined);
  });
  const wrong = await ask(`127.0.0.1:${app2.port}`);
  assert.equal(wrong.status, 421);
  assert.match(wrong.reason, /names db, not api \(the tunnel proved api\)/);
  assert.equal((await ask(`127.0.0.1:${app.port}`)).status, 200, 'the same tunnel to the service it proved is served');
  assert.equal((await ask('127.0.0.1:1')).status, 421);
  assert.ok(metric(mesh.b, 'knit_inbound_rejected_total', { service: 'api', reason: `:authority 127.0.0.1:${app2.port} names db, not api (the tunnel proved api)` }) >= 1);
  session.destroy();
});

test('half-close and reset cross the tunnel like TCP', async () => {
  // An app that answers only after the client's end (nc -N style).
  const eof = await listen((s) => {
    let got = '';
    s.on('data', (d: Buffer) => (got += d.toString()));
    s.on('end', () => s.end(`got ${got}`));
  }, { allowHalfOpen: true });
  cleanups.push(() => void eof.server.close());
  const { mesh } = await setup({ apiPort: eof.port });
  mesh.b.proxy.setService('b/api', { name: 'api', port: eof.port, target: { host: '127.0.0.1', port: eof.port } });
  const s = await dial(mesh.upstreamPort, { allowHalfOpen: true });
  const all = readAll(s);
  s.end('question');
  assert.deepEqual(await all, { data: 'got question', error: undefined });

  // The app resets: the client sees a reset, not an orderly end.
  const rst = await listen((sock) => sock.once('data', () => sock.resetAndDestroy()));
  cleanups.push(() => void rst.server.close());
  mesh.b.proxy.setService('b/api', { name: 'api', port: eof.port, target: { host: '127.0.0.1', port: rst.port } });
  const s2 = await dial(mesh.upstreamPort);
  const r2 = readAll(s2);
  s2.write('x');
  assert.equal((await r2).error, 'ECONNRESET');
});

test('a renewed certificate: open streams keep flowing, new connections use a new tunnel with the new certificate', async () => {
  const { mesh } = await setup();
  const keep = new http.Agent({ keepAlive: true, maxSockets: 1 });
  assert.equal(await get(mesh.upstreamPort, '/before', keep), 'hello /before');
  mesh.a.proxy.setServiceTls('web', await mesh.pki.leaf('web'));
  assert.equal(await get(mesh.upstreamPort, '/same-connection', keep), 'hello /same-connection', 'the open stream was not torn down');
  assert.equal(await get(mesh.upstreamPort, '/new'), 'hello /new');
  assert.equal(metric(mesh.a, 'knit_hbone_dials_total', { result: 'ok' }), 2, 'a second tunnel for the new certificate');
  keep.destroy();
  await until('the retired tunnel closes with its last stream', () => mesh.a.proxy.tunnels().every((t) => !t.retiring), 5000, 20);
});

test('a tunnel ends when a certificate it was made with expires', async () => {
  const { mesh } = await setup();
  // web's leaf: valid for 10 s, issued 6 s ago (4 s left: on a loaded machine making the leaf and dialling
  // take a good part of a second, and the tunnel must still be seen open before it ends).
  mesh.a.proxy.setServiceTls('web', await mesh.pki.leaf('web', { now: new Date(Date.now() - 6_000), ttlMs: 10_000 }));
  const s = await dial(mesh.upstreamPort);
  const r = readAll(s);
  s.write('GET / HTTP/1.1\r\nhost: x\r\n\r\n');
  await until('a tunnel', () => mesh.a.proxy.tunnels().length === 1, 2500, 10);
  // The deadline is a second before the certificate's own expiry (about 3 s from now; see EXPIRY_LEAD_MS in
  // hbone/pool.ts), so that the client, not the server, ends the tunnel: the stream is reset then.
  assert.equal((await r).error, 'ECONNRESET');
  assert.equal(mesh.a.proxy.tunnels().length, 0);
  assert.equal(metric(mesh.a, 'knit_hbone_tunnels_total', { event: 'close', reason: 'certificate expired' }), 1);
});

test('the same-host path: no TLS, no tunnel, but decided, counted and closed on deny like a remote one', async () => {
  const { mesh, app } = await setup();
  // api now also runs on host a: the upstream's endpoint is local.
  mesh.a.proxy.setService('a/api', { name: 'api', port: app.port, target: { host: '127.0.0.1', port: app.port } });
  mesh.a.proxy.setServiceTls('api', await mesh.pki.leaf('api'));
  mesh.upstream.setEndpoints([{ ...mesh.api, id: 'a/api', node: 'a' }]);
  const keep = new http.Agent({ keepAlive: true, maxSockets: 1 });
  assert.equal(await get(mesh.upstreamPort, '/local', keep), 'hello /local');
  assert.equal(mesh.a.proxy.tunnels().length, 0, 'no tunnel');
  assert.equal(metric(mesh.a, 'knit_inbound_connections_total', { decision: 'allow', rule: 'intention web -> api (allow)', service: 'api', source: 'web' }), 1);
  assert.equal(mesh.a.proxy.flows.list()[0]?.view().side, 'local');
  const sock = Object.values(keep.freeSockets).flat()[0]!;
  const closed = new Promise((r) => sock.once('close', r));
  mesh.setIntentions({ defaultAction: 'deny', intentions: [] });
  await closed;
  assert.equal(metric(mesh.a, 'knit_inbound_closed_by_policy_total', { service: 'api', rule: 'default (deny)' }), 1);
  await assert.rejects(get(mesh.upstreamPort, '/denied'), /ECONNRESET|socket hang up/);
  assert.equal(metric(mesh.a, 'knit_inbound_connections_total', { decision: 'deny', rule: 'default (deny)', service: 'api', source: 'web' }), 1);
  keep.destroy();
});

test('a client that stops reading holds the sender back (flow control, no unbounded buffer); every byte arrives once it reads', async (t) => {
  // The app sends 64 MiB as fast as the mesh takes it, counting what its socket accepted.
  const TOTAL = 64 << 20;
  const block = Buffer.alloc(1 << 20);
  for (let i = 0; i < block.length; i++) block[i] = (i * 31 + 7) & 0xff;
  let accepted = 0;
  let sending: net.Socket | undefined;
  const { server, port } = await listen((s) => {
    sending = s;
    let sent = 0;
    const more = (): void => {
      while (sent < TOTAL) {
        sent += block.length;
        const ok = s.write(block, () => (accepted += block.length));
        if (!ok) return void s.once('drain', more);
      }
      s.end();
    };
    more();
  });
  const mesh = await startMesh(port);
  cleanups.push(() => void server.close(), () => mesh.close());
  const client = await dial(mesh.upstreamPort);
  client.pause();
  // Nobody reads: the app's writes stall once the kernel buffers, both agents' bounded buffers and
  // the HTTP/2 windows (4 MiB per stream) are full.
  let last = -1;
  await until('the sender stalls', async () => {
    await new Promise((r) => setTimeout(r, 300));
    const stalled = accepted === last && accepted > 0;
    last = accepted;
    return stalled;
  }, 20_000, 0);
  t.diagnostic(`with no reader the app got ${(accepted / 2 ** 20).toFixed(0)} MiB into the mesh before it stalled`);
  assert.ok(accepted < 24 << 20, `with no reader the app got ${accepted >> 20} MiB of 64 into the mesh: something buffers without bound`);
  // Reading again: every byte, in order.
  const hash = createHash('sha256');
  let got = 0;
  client.on('data', (d: Buffer) => {
    hash.update(d);
    got += d.length;
  });
  client.resume();
  await once(client, 'end');
  const want = createHash('sha256');
  for (let i = 0; i < TOTAL / block.length; i++) want.update(block);
  assert.equal(got, TOTAL);
  assert.equal(hash.digest('hex'), want.digest('hex'));
  client.destroy();
  sending?.destroy();
});
