/**
 * Hostile peer certificates, made with the openssl CLI and signed with the
 * real CA key, against both sides of the node proxy:
 *
 * - inbound: a TLS client presents each certificate to host b's HBONE
 *   listener, asking for `api` by SNI with ALPN h2; it must be refused, the
 *   application must never see a connection, and the reason logged and
 *   counted (`knit_inbound_rejected_total{reason,service}`) must name the
 *   problem;
 * - outbound: host a dials, as api's agent, a fake HBONE server presenting
 *   each certificate; the application's connection must be reset, the
 *   server must receive no byte after the TLS handshake (knit checks the
 *   server's identity before it starts HTTP/2: no preface, no CONNECT),
 *   and the refusal must count in `knit_hbone_dials_total{result="identity"}`
 *   and `knit_outbound_rejected_total{reason}` with a reason that names the
 *   problem.
 *
 * The good leaf (and the EKU cases that fit the role) must pass, so that a
 * proxy refusing everything fails this suite too.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import type tls from 'node:tls';
import { X509Certificate } from 'node:crypto';
import { PeerIdentityReader } from '../identity/peer.js';
import { EVENTS } from '../log/logger.js';
import { makePki, type TestPki } from '../../test/helpers/pki.js';
import { makeOpensslCerts, HOSTILE_CASES, type HostileCase, type OpensslCerts, type OpensslLeaf } from '../../test/helpers/openssl-certs.js';
import { startMesh, listen, apiAt, captureLog, fakeAgent, hboneAttempt, type Mesh, type LogLine as MeshLogLine, type HboneOutcome } from '../../test/helpers/mesh-pair.js';
import { until } from '../../test/helpers/wait.js';
import { NodeProxy } from './node-proxy.js';
import { Metrics } from '../log/metrics.js';
import { compile } from '../policy/intentions.js';

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

/** What each case must come to on the inbound side (the peer is a client claiming to be `web`, asking for `api`). */
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
  'other-namespace': new RegExp(`^peer ${esc(ID('/ns/other/svc/web'))} is in namespace other, this mesh accepts only namespace default$`),
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

/** What each case must come to on the outbound side (the peer is an agent that must prove `api`). */
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

/** A refusal's log line: its reason and, when OpenSSL refused the chain, OpenSSL's code and message. */
type RefusalLine = MeshLogLine & { verifyCode?: string; openssl?: string };

/** Asserts a refusal's log line against what the case expects. */
function assertRefusal(l: MeshLogLine, expect: Exclude<Expect, 'accept'>): void {
  const line = l as RefusalLine;
  const { reason, code } = expect instanceof RegExp ? { reason: expect, code: undefined } : expect;
  assert.match(line.reason ?? '', reason);
  assert.doesNotMatch(line.msg, /UNSPECIFIED/, 'a reason, not UNSPECIFIED');
  if (code) {
    assert.match(line.verifyCode ?? '', code, 'OpenSSL\'s code is logged');
    assert.ok(line.openssl, 'OpenSSL\'s message is logged');
    if (line.verifyCode) assert.ok(line.msg.includes(`(OpenSSL ${line.verifyCode}: ${line.openssl})`), `the message carries OpenSSL's code: ${line.msg}`);
  } else {
    assert.equal(line.verifyCode, undefined, 'refused by knit, past OpenSSL');
    assert.equal(line.openssl, undefined, 'refused by knit, past OpenSSL');
  }
}


let pki: TestPki;
let webCerts: OpensslCerts;
let apiCerts: OpensslCerts;
let mesh: Mesh;

/** The local application behind api on host b: an echo server that counts the connections it sees. */
let app: { server: net.Server; port: number };
let appConnections = 0;

const inboundRejected = (reason: string) => mesh.b.metrics.get('knit_inbound_rejected_total', { service: 'api', reason });
const outboundResult = (result: string) => mesh.a.metrics.get('knit_outbound_connections_total', { service: 'web', upstream: 'api', result });
const outboundRejected = (reason: string) => mesh.a.metrics.get('knit_outbound_rejected_total', { service: 'web', upstream: 'api', reason });
const dials = (result: string) => mesh.a.metrics.get('knit_hbone_dials_total', { result });

/** The first line after index `from` of `lines` that matches, waiting for it. */
async function nextLine(lines: MeshLogLine[], from: number, what: string, pred: (l: MeshLogLine) => boolean): Promise<MeshLogLine> {
  return until(what, () => lines.slice(from).find(pred), 5000);
}

/** A client presenting `leaf` (or nothing) to an HBONE port, asking for api and sending 'hello' on one stream. */
function presentAsClient(port: number, leaf: OpensslLeaf | undefined, namespace = 'default'): Promise<HboneOutcome> {
  return hboneAttempt(port, { trustDomain: TD, ca: [pki.ca.rootPem], cert: leaf?.certChainPem, key: leaf?.keyPem, namespace, authority: `127.0.0.1:${app.port}` });
}

before(async () => {
  pki = await makePki(TD);
  const { certPem, keyPem } = pki.ca.material();
  [webCerts, apiCerts] = await Promise.all([
    makeOpensslCerts({ caCertPem: certPem, caKeyPem: keyPem, trustDomain: TD, service: 'web' }),
    makeOpensslCerts({ caCertPem: certPem, caKeyPem: keyPem, trustDomain: TD, service: 'api' }),
  ]);
  app = await listen((s) => {
    appConnections++;
    s.on('error', () => undefined);
    s.pipe(s);
  });
  mesh = await startMesh(app.port, { pki });
});

after(async () => {
  await mesh?.close();
  app?.server.close();
  await webCerts?.cleanup();
  await apiCerts?.cleanup();
});

test('inbound: every hostile client certificate is refused with a reason naming the problem; good ones reach the app', async (t) => {
  for (const name of ['no-certificate', ...HOSTILE_CASES] as const) {
    const expect = INBOUND[name];
    await t.test(name, async () => {
      const lines = mesh.b.lines;
      const from = lines.length;
      const seen = appConnections;
      const leaf = name === 'no-certificate' ? undefined : webCerts.leaves[name];
      const got = await presentAsClient(mesh.b.proxy.hbonePort, leaf);
      if (expect === 'accept') {
        assert.deepEqual(got, { end: 'echoed', data: 'hello' }, `${name} must be accepted`);
        assert.equal(appConnections, seen + 1, 'the app saw the connection');
        return;
      }
      // Refused after the handshake (knit reads the certificate first), before any stream.
      assert.deepEqual(got, { end: 'closed', handshake: true }, `${name} must be refused`);
      const line = await nextLine(lines, from, 'inbound refusal', (l) => l.event === EVENTS.connRejected && l.service === 'api');
      assertRefusal(line, expect);
      assert.ok(inboundRejected(line.reason!) >= 1, `knit_inbound_rejected_total{reason="${line.reason}",service="api"} counted`);
      assert.equal(appConnections, seen, 'the app never saw a connection');
      assert.equal(lines.slice(from).filter((l) => l.event === EVENTS.connAccepted).length, 0, 'nothing accepted');
    });
  }
});

test('inbound: a node proxy of a namespace other than default accepts its own services and refuses default ones', async () => {
  const { log, lines } = captureLog();
  const metrics = new Metrics();
  const ev = compile({ defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'allow' }] });
  const other = new NodeProxy({ node: 'o', trustDomain: TD, namespace: 'other', listenHost: '127.0.0.1', hbonePort: 0, advertise: '127.0.0.1', policy: () => ev, log, metrics });
  const port = await other.start();
  try {
    other.setService('o/api', { name: 'api', port: app.port, target: { host: '127.0.0.1', port: app.port } });
    // api's own certificate in namespace other (openssl's, signed by the same CA).
    const apiOther = apiCerts.leaves['other-namespace'];
    other.setServiceTls('api', { certChainPem: apiOther.certChainPem, keyPem: apiOther.keyPem, trustBundlePem: [pki.ca.rootPem] });
    assert.deepEqual(await presentAsClient(port, webCerts.leaves['other-namespace'], 'other'), { end: 'echoed', data: 'hello' });
    const from = lines.length;
    assert.deepEqual(await presentAsClient(port, webCerts.leaves.good, 'other'), { end: 'closed', handshake: true });
    const line = await nextLine(lines, from, 'refusal', (l) => l.event === EVENTS.connRejected);
    assert.equal(line.reason, `peer ${ID('/ns/default/svc/web')} is in namespace default, this mesh accepts only namespace other`);
    assert.equal(metrics.get('knit_inbound_rejected_total', { service: 'api', reason: line.reason ?? '' }), 1);
    // And an SNI naming namespace default is not one of its services.
    assert.deepEqual(await presentAsClient(port, webCerts.leaves['other-namespace'], 'default'), { end: 'closed', handshake: false });
  } finally {
    await other.close();
  }
});

/** The application's side of web's upstream: sends at once, resolves with the echo or how the connection ended. */
async function appThroughUpstream(msg: string): Promise<{ echo?: string; error?: string }> {
  const s = net.connect(mesh.upstreamPort, '127.0.0.1');
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

test('outbound: every hostile agent certificate is an identity refusal, no byte is sent after the handshake; good ones carry traffic', async (t) => {
  for (const name of HOSTILE_CASES) {
    const expect = OUTBOUND[name];
    await t.test(name, async () => {
      const leaf = apiCerts.leaves[name];
      const srv = await fakeAgent({ cert: leaf.certChainPem, key: leaf.keyPem });
      mesh.upstream.setEndpoints([apiAt(srv.port)]);
      try {
        const lines = mesh.a.lines;
        const from = lines.length;
        const before = { ok: outboundResult('ok'), identity: outboundResult('identity'), connectError: outboundResult('connect_error'), dials: dials('identity') };
        const got = await appThroughUpstream('ping');
        if (expect === 'accept') {
          assert.deepEqual(got, { echo: 'ping' }, `${name} must be accepted`);
          assert.equal(outboundResult('ok'), before.ok + 1);
          assert.ok(srv.bytes() > 0, 'the tunnel carried the stream');
          return;
        }
        assert.equal(got.error, 'ECONNRESET', `${name}: the app's connection is reset (got ${JSON.stringify(got)})`);
        const line = await nextLine(lines, from, 'outbound refusal', (l) => l.event === EVENTS.connRejected && l.upstream === 'api');
        assertRefusal(line, expect);
        assert.equal(line.result, 'identity');
        assert.equal(line.agent, `127.0.0.1:${srv.port}`);
        assert.equal(dials('identity'), before.dials + 1, 'knit_hbone_dials_total{result="identity"} counted');
        assert.ok(outboundRejected(line.reason!) >= 1, `knit_outbound_rejected_total{reason="${line.reason}"} counted`);
        assert.equal(outboundResult('identity'), before.identity + 1, 'the application connection counted as identity');
        assert.equal(outboundResult('connect_error'), before.connectError, 'not as connect_error');
        await srv.closed();
        assert.equal(srv.connections(), 1, 'knit dialled the agent once');
        assert.equal(srv.bytes(), 0, 'the hostile agent received no byte after the handshake: no HTTP/2 preface, no CONNECT');
        assert.equal(mesh.a.proxy.tunnels().length, 0, 'no tunnel was pooled');
      } finally {
        mesh.upstream.setEndpoints([mesh.api]);
        srv.close();
      }
    });
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
