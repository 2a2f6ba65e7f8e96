/**
 * Hostile peer certificates, made with the openssl CLI and signed with the
 * real CA key, against both sides of the data plane:
 *
 * - inbound: a TLS client presents each certificate to a real InboundProxy;
 *   it must be refused, the application must never see a connection, and
 *   the reason logged and counted must name the problem;
 * - outbound: a real OutboundProxy dials a TLS server presenting each
 *   certificate; the application's connection must be reset, the server must
 *   receive no application byte, and the refusal must count as `identity`
 *   with a reason that names the problem.
 *
 * The good leaf (and the EKU cases that fit the role) must pass, so that a
 * proxy refusing everything fails this suite too.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import { once } from 'node:events';
import { X509Certificate } from 'node:crypto';
import { pino } from 'pino';
import { InboundProxy } from './inbound/inbound.js';
import { PeerIdentityReader } from './tls.js';
import { OutboundProxy } from './outbound/outbound.js';
import { Metrics } from '../log/metrics.js';
import { EVENTS } from '../log/logger.js';
import { compile } from '../policy/intentions.js';
import type { SpiffeId } from '../identity/spiffe.js';
import type { Instance } from '../registry/registry.js';
import { makePki, type TestPki } from '../../test/helpers/pki.js';
import { makeOpensslCerts, HOSTILE_CASES, type HostileCase, type OpensslCerts, type OpensslLeaf } from '../../test/helpers/openssl-certs.js';
import { Recorder } from '../../test/helpers/wait.js';

const TD = 'test.knit';
const ID = (path: string) => `spiffe://${TD}${path}`;
const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

/**
 * What a case must come to: accepted, or refused with a reason (the metric
 * label and log `reason`) and, when OpenSSL refused the chain, OpenSSL's
 * code (the log line's `verifyCode`, also in its message; empty when Node
 * has no name for it and the reason quotes OpenSSL's message instead).
 */
type Expect = 'accept' | RegExp | { reason: RegExp; code: RegExp };

/** What each case must come to on the inbound side (the peer is a client claiming to be `web`). */
const INBOUND: Record<HostileCase | 'no-certificate', Expect> = {
  'no-certificate': /^no client certificate$/,
  good: 'accept',
  'other-ca': { reason: /^client certificate not signed by the trust bundle$/, code: /^(UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)$/ },
  expired: { reason: /^client certificate expired$/, code: /^CERT_HAS_EXPIRED$/ },
  'not-yet-valid': { reason: /^client certificate not yet valid$/, code: /^CERT_NOT_YET_VALID$/ },
  'two-uri-sans': /^peer certificate has 2 URI SANs, an X\.509-SVID has exactly one$/,
  'no-uri-san': /^peer certificate has 0 URI SANs, an X\.509-SVID has exactly one$/,
  'non-spiffe-uri': /^peer URI SAN https:\/\/evil\.example\/web is not a valid SPIFFE ID$/,
  'ca-leaf': /^peer certificate is a CA certificate$/,
  // OpenSSL refuses the non-CA issuer (X509_V_ERR_KEYUSAGE_NO_CERTSIGN, which Node reports as UNSPECIFIED).
  'leaf-signed-by-leaf': { reason: /^client certificate chain (refused by OpenSSL: key usage does not include certificate signing|has an issuer that is not a CA)$/, code: /^(INVALID_CA)?$/ },
  'wrong-trust-domain': new RegExp(`^peer spiffe://other\\.knit/ns/default/svc/web is not in trust domain ${esc(TD)}$`),
  'agent-id': new RegExp(`^peer ${esc(ID('/agent/node-1'))} is not a service identity$`),
  'server-id': new RegExp(`^peer ${esc(ID('/server/s1'))} is not a service identity$`),
  'other-namespace': new RegExp(`^peer ${esc(ID('/ns/other/svc/web'))} is in namespace other, api accepts only namespace default$`),
  'key-cert-sign': /^peer certificate key usage includes keyCertSign, an X\.509-SVID leaf must not$/,
  'crl-sign': /^peer certificate key usage includes cRLSign, an X\.509-SVID leaf must not$/,
  'no-key-usage': /^peer certificate has no key usage extension/,
  'key-agreement-only': /^peer certificate key usage lacks digitalSignature \(has keyAgreement\)$/,
  'rsa-1024': /^peer key is RSA-1024, knit accepts only EC P-256$/,
  'rsa-2048': /^peer key is RSA-2048, knit accepts only EC P-256$/,
  'ec-p384': /^peer key is EC P-384, knit accepts only EC P-256$/,
  'no-eku': 'accept',
  'eku-server-only': { reason: /^client certificate not allowed for client authentication: extended key usage lacks clientAuth$/, code: /^INVALID_PURPOSE$/ },
  'eku-client-only': 'accept',
};

/** What each case must come to on the outbound side (the peer is a server that must be `api`). */
const OUTBOUND: Record<HostileCase, Expect> = {
  good: 'accept',
  'other-ca': { reason: /^server certificate not signed by the trust bundle$/, code: /^(UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)$/ },
  expired: { reason: /^server certificate expired$/, code: /^CERT_HAS_EXPIRED$/ },
  'not-yet-valid': { reason: /^server certificate not yet valid$/, code: /^CERT_NOT_YET_VALID$/ },
  'two-uri-sans': /^peer certificate has 2 URI SANs, an X\.509-SVID has exactly one$/,
  'no-uri-san': /^peer certificate has 0 URI SANs, an X\.509-SVID has exactly one$/,
  'non-spiffe-uri': /^peer URI SAN https:\/\/evil\.example\/api is not a valid SPIFFE ID$/,
  'ca-leaf': /^peer certificate is a CA certificate$/,
  'leaf-signed-by-leaf': { reason: /^server certificate chain (refused by OpenSSL: key usage does not include certificate signing|has an issuer that is not a CA)$/, code: /^(INVALID_CA)?$/ },
  'wrong-trust-domain': new RegExp(`^peer spiffe://other\\.knit/ns/default/svc/api is not in trust domain ${esc(TD)}$`),
  'agent-id': new RegExp(`^server is ${esc(ID('/agent/node-1'))}, expected ${esc(ID('/ns/default/svc/api'))}$`),
  'server-id': new RegExp(`^server is ${esc(ID('/server/s1'))}, expected ${esc(ID('/ns/default/svc/api'))}$`),
  'other-namespace': new RegExp(`^server is ${esc(ID('/ns/other/svc/api'))}, expected ${esc(ID('/ns/default/svc/api'))}$`),
  'key-cert-sign': /^peer certificate key usage includes keyCertSign, an X\.509-SVID leaf must not$/,
  'crl-sign': /^peer certificate key usage includes cRLSign, an X\.509-SVID leaf must not$/,
  'no-key-usage': /^peer certificate has no key usage extension/,
  'key-agreement-only': /^peer certificate key usage lacks digitalSignature \(has keyAgreement\)$/,
  'rsa-1024': /^peer key is RSA-1024, knit accepts only EC P-256$/,
  'rsa-2048': /^peer key is RSA-2048, knit accepts only EC P-256$/,
  'ec-p384': /^peer key is EC P-384, knit accepts only EC P-256$/,
  'no-eku': 'accept',
  'eku-server-only': 'accept',
  'eku-client-only': { reason: /^server certificate not allowed for server authentication: extended key usage lacks serverAuth$/, code: /^INVALID_PURPOSE$/ },
};

/** Asserts a refusal's log line against what the case expects. */
function assertRefusal(line: LogLine, expect: Exclude<Expect, 'accept'>): void {
  const { reason, code } = expect instanceof RegExp ? { reason: expect, code: undefined } : expect;
  assert.match(line.reason ?? '', reason);
  assert.doesNotMatch(line.msg ?? '', /UNSPECIFIED/, 'a reason, not UNSPECIFIED');
  if (code) {
    assert.match(line.verifyCode ?? '', code, 'OpenSSL\'s code is logged');
    assert.ok(line.openssl, 'OpenSSL\'s message is logged');
    if (line.verifyCode) assert.ok(line.msg?.includes(`(OpenSSL ${line.verifyCode}: ${line.openssl})`), `the message carries OpenSSL's code: ${line.msg}`);
  } else {
    assert.equal(line.verifyCode, undefined, 'refused by knit, past OpenSSL');
    assert.equal(line.openssl, undefined, 'refused by knit, past OpenSSL');
  }
}

interface LogLine {
  event?: string;
  reason?: string;
  result?: string;
  msg?: string;
  verifyCode?: string;
  openssl?: string;
  [k: string]: unknown;
}

let pki: TestPki;
let webCerts: OpensslCerts;
let apiCerts: OpensslCerts;
const metrics = new Metrics();
const logs = new Recorder<LogLine>();
const log = pino({ level: 'debug', base: undefined }, { write: (line: string) => logs.push(JSON.parse(line) as LogLine) });

/** The local application behind the inbound: an echo server that counts the connections it sees. */
let app: net.Server;
let appPort: number;
let appConnections = 0;
let inbound: InboundProxy;
let inboundPort: number;
let outbound: OutboundProxy;
let outboundPort: number;

const allowWeb = () => {
  const ev = compile({ defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'allow' }] });
  return (src: SpiffeId) => ev.evaluate(src.what.kind === 'service' ? src.what.service : src.uri, 'api');
};
const endpoint = (port: number): Instance => ({ id: `n/api-${port}`, service: 'api', node: 'n', address: '127.0.0.1', port, tags: [], meta: {}, health: 'passing' });
const inboundRejected = (reason: string) => metrics.get('knit_inbound_rejected_total', { service: 'api', reason });
const outboundResult = (result: string) => metrics.get('knit_outbound_connections_total', { service: 'web', upstream: 'api', result });
const outboundRejected = (reason: string) => metrics.get('knit_outbound_rejected_total', { service: 'web', upstream: 'api', reason });

/** A TLS client presenting `leaf` (or nothing) to `port`; resolves with how the connection ended. */
async function presentAsClient(port: number, leaf: OpensslLeaf | undefined): Promise<'echoed' | 'closed'> {
  const s = tls.connect({ host: '127.0.0.1', port, ca: pki.ca.rootPem, cert: leaf?.certChainPem, key: leaf?.keyPem, checkServerIdentity: () => undefined });
  s.on('error', () => undefined);
  try {
    await once(s, 'secureConnect');
    const echoed = new Promise<string>((resolve, reject) => {
      s.once('data', (d: Buffer) => resolve(d.toString()));
      s.once('close', () => reject(new Error('closed')));
    });
    s.write('hello');
    return (await echoed) === 'hello' ? 'echoed' : 'closed';
  } catch {
    return 'closed';
  } finally {
    s.destroy();
  }
}

/** The refusal logged after log index `from` by the inbound. */
const inboundRefusal = (from: number) => logs.next('inbound refusal', (l) => l.event === EVENTS.connRejected && l.service === 'api' && l.upstream === undefined, 5000, from);

before(async () => {
  pki = await makePki(TD);
  const { certPem, keyPem } = pki.ca.material();
  [webCerts, apiCerts] = await Promise.all([
    makeOpensslCerts({ caCertPem: certPem, caKeyPem: keyPem, trustDomain: TD, service: 'web' }),
    makeOpensslCerts({ caCertPem: certPem, caKeyPem: keyPem, trustDomain: TD, service: 'api' }),
  ]);
  app = net.createServer((s) => {
    appConnections++;
    s.pipe(s);
  });
  app.listen(0, '127.0.0.1');
  await once(app, 'listening');
  appPort = (app.address() as net.AddressInfo).port;
  inbound = new InboundProxy({
    service: 'api', trustDomain: TD, listenHost: '127.0.0.1', listenPort: 0,
    targetHost: '127.0.0.1', targetPort: appPort, tls: await pki.leaf('api'), authorize: allowWeb(), log, metrics,
  });
  inboundPort = await inbound.start();
  outbound = new OutboundProxy({ source: 'web', destination: 'api', trustDomain: TD, listenHost: '127.0.0.1', listenPort: 0, tls: await pki.leaf('web'), log, metrics });
  outboundPort = await outbound.start();
});

after(async () => {
  await outbound?.close();
  await inbound?.close();
  app?.close();
  await webCerts?.cleanup();
  await apiCerts?.cleanup();
});

test('inbound: every hostile client certificate is refused with a reason naming the problem; good ones reach the app', async (t) => {
  for (const name of ['no-certificate', ...HOSTILE_CASES] as const) {
    const expect = INBOUND[name];
    await t.test(name, async () => {
      const from = logs.values.length;
      const seen = appConnections;
      const leaf = name === 'no-certificate' ? undefined : webCerts.leaves[name];
      const got = await presentAsClient(inboundPort, leaf);
      if (expect === 'accept') {
        assert.equal(got, 'echoed', `${name} must be accepted`);
        assert.equal(appConnections, seen + 1, 'the app saw the connection');
        return;
      }
      assert.equal(got, 'closed', `${name} must be refused`);
      const line = await inboundRefusal(from);
      assertRefusal(line, expect);
      assert.ok(inboundRejected(line.reason!) >= 1, `knit_inbound_rejected_total{reason="${line.reason}"} counted`);
      assert.equal(appConnections, seen, 'the app never saw a connection');
      assert.equal(logs.values.slice(from).filter((l) => l.event === EVENTS.connAccepted).length, 0, 'nothing accepted');
    });
  }
});

test('inbound: a namespace other than default accepts its own services and refuses default ones', async () => {
  const other = new InboundProxy({
    service: 'api', trustDomain: TD, namespace: 'other', listenHost: '127.0.0.1', listenPort: 0,
    targetHost: '127.0.0.1', targetPort: appPort, tls: await pki.leaf('api'), authorize: allowWeb(), log, metrics,
  });
  const port = await other.start();
  try {
    assert.equal(await presentAsClient(port, webCerts.leaves['other-namespace']), 'echoed');
    const from = logs.values.length;
    assert.equal(await presentAsClient(port, webCerts.leaves.good), 'closed');
    const line = await inboundRefusal(from);
    assert.equal(line.reason, `peer ${ID('/ns/default/svc/web')} is in namespace default, api accepts only namespace other`);
  } finally {
    await other.close();
  }
});

/** A TLS server presenting `leaf`, recording what it receives. */
async function hostileServer(leaf: OpensslLeaf): Promise<{ port: number; bytes: () => number; handshakes: () => number; resumed: () => number; closed: () => Promise<void>; close: () => void }> {
  let bytes = 0;
  let handshakes = 0;
  let resumed = 0;
  const open = new Set<tls.TLSSocket>();
  const srv = tls.createServer({ cert: leaf.certChainPem, key: leaf.keyPem, minVersion: 'TLSv1.3' }, (s) => {
    handshakes++;
    if (s.isSessionReused()) resumed++;
    open.add(s);
    s.on('error', () => undefined);
    s.on('data', (d: Buffer) => {
      bytes += d.length;
      s.write(d);
    });
    s.on('close', () => open.delete(s));
  });
  srv.on('tlsClientError', () => undefined);
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  return {
    port: (srv.address() as net.AddressInfo).port,
    bytes: () => bytes,
    handshakes: () => handshakes,
    resumed: () => resumed,
    // Resolves once every connection the server accepted has closed.
    closed: async () => {
      for (const s of [...open]) if (!s.destroyed) await once(s, 'close');
    },
    close: () => {
      for (const s of open) s.destroy();
      srv.close();
    },
  };
}

/** The application's side of the outbound: sends at once, resolves with the echo or how the connection ended. */
async function appThroughOutbound(msg: string): Promise<{ echo?: string; error?: string }> {
  const s = net.connect(outboundPort, '127.0.0.1');
  s.write(msg);
  return new Promise((resolve) => {
    s.once('data', (d: Buffer) => {
      resolve({ echo: d.toString() });
      s.destroy();
    });
    s.once('error', (e: Error & { code?: string }) => resolve({ error: e.code ?? e.message }));
    s.once('close', () => resolve({ error: 'closed' }));
  });
}

test('outbound: every hostile server certificate is an identity refusal, no application byte is sent; good ones carry traffic', async (t) => {
  for (const name of HOSTILE_CASES) {
    const expect = OUTBOUND[name];
    await t.test(name, async () => {
      const srv = await hostileServer(apiCerts.leaves[name]);
      outbound.setEndpoints([endpoint(srv.port)]);
      try {
        const from = logs.values.length;
        const ok = outboundResult('ok');
        const identity = outboundResult('identity');
        const connectErrors = outboundResult('connect_error');
        const got = await appThroughOutbound('ping');
        if (expect === 'accept') {
          assert.deepEqual(got, { echo: 'ping' }, `${name} must be accepted`);
          assert.equal(outboundResult('ok'), ok + 1);
          return;
        }
        assert.equal(got.error, 'ECONNRESET', `${name}: the app's connection is reset (got ${JSON.stringify(got)})`);
        const line = await logs.next('outbound refusal', (l) => l.event === EVENTS.connRejected && l.upstream === 'api', 5000, from);
        assertRefusal(line, expect);
        assert.equal(line.result, 'identity');
        assert.equal(line.endpoint, `127.0.0.1:${srv.port}`);
        assert.equal(outboundResult('identity'), identity + 1, 'counted as identity');
        assert.equal(outboundResult('connect_error'), connectErrors, 'not counted as connect_error');
        assert.ok(outboundRejected(line.reason!) >= 1, `knit_outbound_rejected_total{reason="${line.reason}"} counted`);
        await srv.closed();
        assert.equal(srv.bytes(), 0, 'the hostile server received no application byte');
      } finally {
        srv.close();
      }
    });
  }
});

test('outbound: sessions to a good server resume, and still carry traffic', async () => {
  const srv = await hostileServer(apiCerts.leaves.good);
  outbound.setEndpoints([endpoint(srv.port)]);
  try {
    for (let i = 0; i < 4; i++) assert.deepEqual(await appThroughOutbound(`r${i}`), { echo: `r${i}` });
    assert.equal(srv.handshakes(), 4);
    assert.ok(srv.resumed() >= 1, `some handshakes resumed (${srv.resumed()} of 4)`);
  } finally {
    srv.close();
  }
});

/** Just enough of a TLSSocket for PeerIdentityReader, counting how often the certificate's DER is read (once per parse). */
function fakeSocket(pem: string): { socket: tls.TLSSocket; rawReads: () => number } {
  const real = new X509Certificate(pem);
  let reads = 0;
  const cert = {
    fingerprint256: real.fingerprint256,
    get raw() {
      reads++;
      return real.raw;
    },
  };
  return { socket: { getPeerX509Certificate: () => cert } as unknown as tls.TLSSocket, rawReads: () => reads };
}

test('PeerIdentityReader checks the EKU for the role itself, not only through OpenSSL', () => {
  const peers = new PeerIdentityReader();
  const serverOnly = fakeSocket(webCerts.leaves['eku-server-only'].certChainPem).socket;
  assert.deepEqual(peers.read(serverOnly, TD, 'client'), { ok: false, reason: 'peer certificate extended key usage lacks clientAuth (has serverAuth), it may not act as a client' });
  assert.equal(peers.read(serverOnly, TD, 'server').ok, true);
  const clientOnly = fakeSocket(apiCerts.leaves['eku-client-only'].certChainPem).socket;
  assert.deepEqual(peers.read(clientOnly, TD, 'server'), { ok: false, reason: 'peer certificate extended key usage lacks serverAuth (has clientAuth), it may not act as a server' });
  const noEku = fakeSocket(webCerts.leaves['no-eku'].certChainPem).socket;
  assert.equal(peers.read(noEku, TD, 'client').ok, true);
  assert.equal(peers.read(noEku, TD, 'server').ok, true);
});

test('PeerIdentityReader parses each certificate once, whatever the connections, roles and trust domains', () => {
  const peers = new PeerIdentityReader();
  const good = fakeSocket(webCerts.leaves.good.certChainPem);
  const bad = fakeSocket(webCerts.leaves['key-cert-sign'].certChainPem);
  for (let i = 0; i < 5; i++) {
    assert.equal(peers.read(good.socket, TD, i % 2 ? 'client' : 'server').ok, true);
    assert.equal(peers.read(bad.socket, TD, 'client').ok, false);
  }
  assert.equal(peers.read(good.socket, 'other.knit').ok, false);
  assert.equal(good.rawReads(), 1);
  assert.equal(bad.rawReads(), 1);
});
