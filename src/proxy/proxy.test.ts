import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import { once } from 'node:events';
import { X509Certificate } from 'node:crypto';
import { InboundProxy } from './inbound/inbound.js';
import { OutboundProxy } from './outbound/outbound.js';
import { Metrics } from '../log/metrics.js';
import { silentLogger } from '../log/logger.js';
import { compile, type IntentionSet } from '../policy/intentions.js';
import type { SpiffeId } from '../identity/spiffe.js';
import type { Instance } from '../registry/registry.js';
import { makePki, hostileLeaf, type TestPki } from '../../test/helpers/pki.js';
import { until } from '../../test/helpers/wait.js';
import { readAll } from '../../test/helpers/proxy-pair.js';

let pki: TestPki;
let echo: net.Server;
let echoPort: number;
let inbound: InboundProxy;
let inboundPort: number;
let outbound: OutboundProxy;
let outboundPort: number;
const metrics = new Metrics();
const log = process.env.KNIT_TEST_LOG ? (await import("../log/logger.js")).createLogger({ level: "debug" }) : silentLogger();

const policy = (set: IntentionSet) => {
  const ev = compile(set);
  return (src: SpiffeId) => ev.evaluate(src.what.kind === 'service' ? src.what.service : src.uri, 'api');
};
const allowWeb: IntentionSet = { defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'allow' }] };
const endpoint = (port: number): Instance => ({ id: 'n/api', service: 'api', node: 'n', address: '127.0.0.1', port, tags: [], meta: {}, health: 'passing' });

/** Sends a line and resolves with the echo, or rejects with the socket's error or close. */
function roundTrip(s: net.Socket, msg: string): Promise<string> {
  return new Promise((resolve, reject) => {
    s.once('data', (d) => resolve(d.toString()));
    s.once('error', reject);
    s.once('close', () => reject(new Error('closed')));
    s.write(msg);
  });
}
async function dialPlain(port: number): Promise<net.Socket> {
  const s = net.connect(port, '127.0.0.1');
  await once(s, 'connect');
  return s;
}
/**
 * A raw mTLS client. Resolves with how the connection ended: 'echoed' (it
 * was served), 'refused' (the handshake completed, then the server ended the
 * connection without serving it: how knit refuses, after reading the peer's
 * certificate), or `handshake failed: <code>` when the handshake itself did
 * not complete (which is not how knit refuses, so a test expecting
 * 'refused' fails on it).
 */
async function tlsAttempt(opts: tls.ConnectionOptions): Promise<'echoed' | 'refused' | `handshake failed: ${string}`> {
  const s = tls.connect({ host: '127.0.0.1', port: inboundPort, checkServerIdentity: () => undefined, ...opts });
  try {
    await new Promise<void>((resolve, reject) => {
      s.once('secureConnect', resolve);
      s.once('error', reject);
      s.once('close', () => reject(new Error('closed before the handshake completed')));
    });
  } catch (e) {
    s.destroy();
    return `handshake failed: ${(e as Error & { code?: string }).code ?? (e as Error).message}`;
  }
  s.on('error', () => undefined);
  try {
    return (await roundTrip(s, 'hi')) === 'hi' ? 'echoed' : 'refused';
  } catch {
    return 'refused';
  } finally {
    s.destroy();
  }
}

before(async () => {
  pki = await makePki();
  echo = net.createServer((s) => {
    s.on('error', () => undefined);
    s.pipe(s);
  });
  echo.listen(0, '127.0.0.1');
  await once(echo, 'listening');
  echoPort = (echo.address() as net.AddressInfo).port;
  inbound = new InboundProxy({
    service: 'api', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: 0,
    targetHost: '127.0.0.1', targetPort: echoPort, tls: await pki.leaf('api'), authorize: policy(allowWeb), log, metrics,
  });
  inboundPort = await inbound.start();
  outbound = new OutboundProxy({
    source: 'web', destination: 'api', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: 0,
    tls: await pki.leaf('web'), log, metrics,
  });
  outboundPort = await outbound.start();
  outbound.setEndpoints([endpoint(inboundPort)]);
});

after(async () => {
  await outbound.close();
  await inbound.close();
  echo.close();
});

test('web reaches api through the outbound and inbound proxies over mTLS', async () => {
  const s = await dialPlain(outboundPort);
  assert.equal(await roundTrip(s, 'ping'), 'ping');
  assert.equal(metrics.get('knit_inbound_connections_total', { service: 'api', source: 'web', decision: 'allow', rule: 'intention web -> api (allow)' }), 1);
  s.destroy();
});

test('an intention change to deny closes the open connection and refuses the next', async () => {
  const s = await dialPlain(outboundPort);
  assert.equal(await roundTrip(s, 'before'), 'before');
  await until('connection tracked', () => inbound.connections === 1);
  const ended = new Promise<string>((resolve) => {
    s.once('error', (e: Error & { code?: string }) => resolve(e.code ?? e.message));
    s.once('end', () => resolve('end'));
  });
  inbound.setAuthorize(policy({ defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'deny' }] }));
  // Closed in order (a FIN passed on by the outbound proxy), not left open.
  assert.equal(await ended, 'end', 'the open connection is closed');
  await until('closed connection untracked', () => inbound.connections === 0);
  const denied = () => metrics.get('knit_inbound_connections_total', { service: 'api', source: 'web', decision: 'deny', rule: 'intention web -> api (deny)' });
  const before = denied();
  const again = await dialPlain(outboundPort);
  // A new connection is refused: an L4 "no" is a reset, passed on by the outbound proxy to the application.
  await assert.rejects(roundTrip(again, 'after'), { code: 'ECONNRESET' });
  assert.equal(denied(), before + 1, 'the new connection was denied by the new intention');
  assert.equal(metrics.get('knit_inbound_closed_by_policy_total', { service: 'api', rule: 'intention web -> api (deny)' }), 1);
  inbound.setAuthorize(policy(allowWeb));
});

test('refused: no client cert, another CA, an expired cert, another service without intention, plaintext', async () => {
  const rejected = (reason: string) => metrics.get('knit_inbound_rejected_total', { service: 'api', reason });
  const ca = pki.ca.rootPem;

  assert.equal(await tlsAttempt({ ca }), 'refused');
  await until('no-cert counted', () => rejected('no client certificate') === 1);

  const other = await (await makePki(pki.trustDomain)).leaf('web');
  assert.equal(await tlsAttempt({ ca, cert: other.certChainPem, key: other.keyPem }), 'refused');
  await until('other-CA counted', () => rejected('client certificate not signed by the trust bundle') === 1);

  const expired = await pki.leaf('web', { now: new Date(Date.now() - 3 * 24 * 3600e3) });
  assert.equal(await tlsAttempt({ ca, cert: expired.certChainPem, key: expired.keyPem }), 'refused');
  await until('expired counted', () => rejected('client certificate expired') === 1);

  const db = await pki.leaf('db');
  assert.equal(await tlsAttempt({ ca, cert: db.certChainPem, key: db.keyPem }), 'refused');
  assert.equal(metrics.get('knit_inbound_connections_total', { service: 'api', source: 'db', decision: 'deny', rule: 'default (deny)' }), 1);

  const plain = await dialPlain(inboundPort);
  plain.on('error', () => undefined);
  const plainEnded = readAll(plain);
  plain.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
  assert.deepEqual(await plainEnded, { data: '', error: 'ECONNRESET' }, 'a plaintext client is reset, and gets no byte back');
  await until('plaintext counted', () => rejected('not a TLS client') === 1);

  // The listener still serves allowed peers afterwards.
  const web = await pki.leaf('web');
  assert.equal(await tlsAttempt({ ca, cert: web.certChainPem, key: web.keyPem }), 'echoed');
});

test('hostile certificates from the trusted CA are refused, each with its reason, and the listener keeps serving', async () => {
  const ca = pki.ca.rootPem;
  const rejected = (reason: string) => metrics.get('knit_inbound_rejected_total', { service: 'api', reason });
  const web = `spiffe://${pki.trustDomain}/ns/default/svc/web`;
  const cases: Array<[string[], string, { ca?: boolean }?]> = [
    [[web, `spiffe://${pki.trustDomain}/ns/default/svc/db`], 'peer certificate has 2 URI SANs, an X.509-SVID has exactly one'],
    [[], 'peer certificate has 0 URI SANs, an X.509-SVID has exactly one'],
    [['https://evil.example/web'], 'peer URI SAN https://evil.example/web is not a valid SPIFFE ID'],
    [[`spiffe://${pki.trustDomain}/agent/node-1`], `peer spiffe://${pki.trustDomain}/agent/node-1 is not a service identity`],
    [['spiffe://other.knit/ns/default/svc/web'], `peer spiffe://other.knit/ns/default/svc/web is not in trust domain ${pki.trustDomain}`],
    [[web], 'peer certificate is a CA certificate', { ca: true }],
  ];
  for (const [uris, reason, opts] of cases) {
    const h = await hostileLeaf(pki, uris, opts);
    assert.equal(await tlsAttempt({ ca, cert: h.cert, key: h.key }), 'refused', reason);
    await until(reason, () => rejected(reason) === 1);
  }
  const good = await pki.leaf('web');
  assert.equal(await tlsAttempt({ ca, cert: good.certChainPem, key: good.keyPem }), 'echoed');
});

test('outbound refuses a server that proves another identity, and fails fast with no endpoint', async () => {
  const impostor = new InboundProxy({
    service: 'db', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: 0, targetHost: '127.0.0.1', targetPort: echoPort,
    tls: await pki.leaf('db'), authorize: () => ({ allow: true, reason: 'default', rule: 'default (allow)' }), log, metrics,
  });
  const port = await impostor.start();
  outbound.setEndpoints([endpoint(port)]);
  const s = await dialPlain(outboundPort);
  await assert.rejects(roundTrip(s, 'x'), { code: 'ECONNRESET' });
  assert.equal(metrics.get('knit_outbound_connections_total', { service: 'web', upstream: 'api', result: 'identity' }), 1);
  const why = `server is spiffe://${pki.trustDomain}/ns/default/svc/db, expected spiffe://${pki.trustDomain}/ns/default/svc/api`;
  assert.equal(metrics.get('knit_outbound_rejected_total', { service: 'web', upstream: 'api', reason: why }), 1);
  await impostor.close();

  outbound.setEndpoints([]);
  const t0 = Date.now();
  const n = net.connect(outboundPort, '127.0.0.1');
  const [err] = (await once(n, 'error')) as Error[];
  assert.match(String(err), /ECONNRESET/);
  assert.ok(Date.now() - t0 < 1000, 'fails fast');
  outbound.setEndpoints([endpoint(inboundPort)]);
});

test('a dead endpoint is skipped for a live one', async () => {
  const dead = net.createServer();
  dead.listen(0, '127.0.0.1');
  await once(dead, 'listening');
  const deadPort = (dead.address() as net.AddressInfo).port;
  dead.close();
  const refused = () => metrics.get('knit_outbound_endpoint_failures_total', { service: 'web', upstream: 'api', reason: 'refused' });
  const before = refused();
  outbound.setEndpoints([endpoint(deadPort), endpoint(inboundPort)]);
  for (let i = 0; i < 4; i++) {
    const s = await dialPlain(outboundPort);
    assert.equal(await roundTrip(s, `r${i}`), `r${i}`);
    s.destroy();
  }
  // Round-robin over two endpoints: the dead one was tried (and skipped) at least once in four connections.
  assert.ok(refused() > before, 'the dead endpoint was tried and its refusal counted');
  outbound.setEndpoints([endpoint(inboundPort)]);
});

/** A TLS echo server presenting `leaf` that records the certificates its clients present and whether sessions resumed. */
async function recordingServer(leaf: { certChainPem: string; keyPem: string }) {
  const clientCerts: string[] = [];
  let resumed = 0;
  let handshakes = 0;
  const open = new Set<tls.TLSSocket>();
  const srv = tls.createServer({ cert: leaf.certChainPem, key: leaf.keyPem, ca: pki.ca.rootPem, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.3' }, (s) => {
    handshakes++;
    if (s.isSessionReused()) resumed++;
    else clientCerts.push(s.getPeerX509Certificate()?.fingerprint256 ?? 'none');
    open.add(s);
    s.on('error', () => undefined);
    s.on('close', () => open.delete(s));
    s.pipe(s);
  });
  srv.on('tlsClientError', () => undefined);
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  return {
    port: (srv.address() as net.AddressInfo).port,
    clientCerts,
    handshakes: () => handshakes,
    resumed: () => resumed,
    close() {
      for (const s of open) s.destroy();
      srv.close();
    },
  };
}

const fingerprint = (pem: string) => new X509Certificate(pem).fingerprint256;

test('a renewed certificate is served to new connections while old ones stay open', async () => {
  const s = await dialPlain(outboundPort);
  assert.equal(await roundTrip(s, 'old'), 'old');
  const apiLeaf = await pki.leaf('api');
  const webLeaf = await pki.leaf('web');
  inbound.setTls(apiLeaf);
  outbound.setTls(webLeaf);
  const t = await dialPlain(outboundPort);
  assert.equal(await roundTrip(t, 'new'), 'new');
  assert.equal(await roundTrip(s, 'still'), 'still', 'the connection opened before the renewal still works');
  s.destroy();
  t.destroy();

  // The inbound serves the renewed leaf to a new client...
  const web = await pki.leaf('web');
  const c = tls.connect({ host: '127.0.0.1', port: inboundPort, ca: pki.ca.rootPem, cert: web.certChainPem, key: web.keyPem, checkServerIdentity: () => undefined });
  await once(c, 'secureConnect');
  assert.equal(c.getPeerX509Certificate()?.fingerprint256, fingerprint(apiLeaf.certChainPem), 'the inbound serves the renewed leaf');
  c.destroy();
  // ...and the outbound presents its renewed leaf on new connections.
  const srv = await recordingServer(await pki.leaf('api'));
  try {
    outbound.setEndpoints([endpoint(srv.port)]);
    const u = await dialPlain(outboundPort);
    assert.equal(await roundTrip(u, 'x'), 'x');
    u.destroy();
    assert.deepEqual(srv.clientCerts, [fingerprint(webLeaf.certChainPem)], 'the outbound presents the renewed leaf');
  } finally {
    srv.close();
    outbound.setEndpoints([endpoint(inboundPort)]);
  }
});

/**
 * A TCP relay in front of `target` that holds each connection's bytes
 * (both ways) until the test releases or resets it: a handshake can be
 * stopped halfway while the test changes things around it.
 */
async function gate(target: number) {
  const held: Array<{ release: () => void; reset: () => void }> = [];
  const srv = net.createServer((client) => {
    client.pause();
    client.on('error', () => undefined);
    let up: net.Socket | undefined;
    held.push({
      release: () => {
        up = net.connect(target, '127.0.0.1');
        up.on('error', () => client.destroy());
        client.pipe(up).pipe(client);
        client.resume();
      },
      reset: () => client.resetAndDestroy(),
    });
  });
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  return { port: (srv.address() as net.AddressInfo).port, held, close: () => srv.close() };
}

test('a resumed connection keeps the identity its ticket proved, whatever a concurrent failure or a renewal does to the cache meanwhile', async () => {
  // Regression: the peer identity of a resumed session was looked up by endpoint key after the handshake; a
  // concurrent failure to the same endpoint, or a renewal, had emptied that entry, and a valid resumed
  // connection was refused as "server presented no certificate".
  const srv = await recordingServer(await pki.leaf('api'));
  const g = await gate(srv.port);
  try {
    outbound.setEndpoints([endpoint(g.port)]);
    // A full handshake through the gate leaves a ticket for the gate's endpoint.
    const first = dialPlain(outboundPort);
    await until('first connection reaches the gate', () => g.held.length === 1);
    g.held[0]!.release();
    const f = await first;
    assert.equal(await roundTrip(f, 'full'), 'full');
    await until('ticket stored', () => outbound.sessionCount === 1);

    // A: its dial takes the ticket and stops at the gate, mid-handshake.
    const a = await dialPlain(outboundPort);
    await until('A reaches the gate', () => g.held.length === 2);
    // B: a concurrent connection to the same endpoint fails, which drops the endpoint's ticket...
    const b = await dialPlain(outboundPort);
    await until('B reaches the gate', () => g.held.length === 3);
    const bEnded = readAll(b);
    g.held[2]!.reset();
    assert.equal((await bEnded).error, 'ECONNRESET', 'B failed (its only endpoint reset it)');
    assert.equal(outbound.sessionCount, 0, 'the failure dropped the ticket');
    // ...and a renewal clears the cache while A's handshake is still in flight.
    outbound.setTls(await pki.leaf('web'));

    // A resumes with the ticket and identity it captured before its handshake, and is served.
    g.held[1]!.release();
    assert.equal(await roundTrip(a, 'resumed'), 'resumed');
    assert.equal(srv.resumed(), 1, 'A resumed its session');
    assert.equal(outbound.sessionCount, 0, 'a ticket from a dial begun before the renewal is not stored');
    for (const s of [f, a]) s.destroy();
  } finally {
    g.close();
    srv.close();
    outbound.setEndpoints([endpoint(inboundPort)]);
  }
});

test('the session cache drops endpoints that left the endpoint set', async () => {
  const srv = await recordingServer(await pki.leaf('api'));
  try {
    outbound.setEndpoints([endpoint(srv.port)]);
    const s = await dialPlain(outboundPort);
    assert.equal(await roundTrip(s, 'one'), 'one');
    s.destroy();
    await until('ticket stored', () => outbound.sessionCount === 1);
    outbound.setEndpoints([endpoint(inboundPort)]);
    assert.equal(outbound.sessionCount, 0, 'the departed endpoint\'s ticket is dropped');
    // When it comes back, it gets a full handshake: nothing stale is resumed.
    outbound.setEndpoints([endpoint(srv.port)]);
    const t = await dialPlain(outboundPort);
    assert.equal(await roundTrip(t, 'two'), 'two');
    t.destroy();
    assert.equal(srv.handshakes(), 2);
    assert.equal(srv.resumed(), 0);
  } finally {
    srv.close();
    outbound.setEndpoints([endpoint(inboundPort)]);
  }
});
