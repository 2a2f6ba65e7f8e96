import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import { once } from 'node:events';
import { InboundProxy } from './inbound/inbound.js';
import { OutboundProxy } from './outbound/outbound.js';
import { Metrics } from '../log/metrics.js';
import { silentLogger } from '../log/logger.js';
import { compile, type IntentionSet } from '../policy/intentions.js';
import type { SpiffeId } from '../identity/spiffe.js';
import type { Instance } from '../registry/registry.js';
import { makePki, hostileLeaf, type TestPki } from '../../test/helpers/pki.js';
import { until } from '../../test/helpers/wait.js';

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
/** A raw mTLS client; resolves with how the connection ended. */
async function tlsAttempt(opts: tls.ConnectionOptions): Promise<'echoed' | 'closed'> {
  const s = tls.connect({ host: '127.0.0.1', port: inboundPort, checkServerIdentity: () => undefined, ...opts });
  s.on('error', () => undefined);
  try {
    await once(s, 'secureConnect');
    return (await roundTrip(s, 'hi')) === 'hi' ? 'echoed' : 'closed';
  } catch {
    return 'closed';
  } finally {
    s.destroy();
  }
}

before(async () => {
  pki = await makePki();
  echo = net.createServer((s) => s.pipe(s));
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
  inbound.setAuthorize(policy({ defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'deny' }] }));
  await once(s, 'close');
  const again = await dialPlain(outboundPort);
  await assert.rejects(roundTrip(again, 'after'));
  assert.ok(metrics.get('knit_inbound_closed_by_policy_total', { service: 'api', rule: 'intention web -> api (deny)' }) >= 1);
  inbound.setAuthorize(policy(allowWeb));
});

test('refused: no client cert, another CA, an expired cert, another service without intention, plaintext', async () => {
  const rejected = (reason: string) => metrics.get('knit_inbound_rejected_total', { service: 'api', reason });
  const ca = pki.ca.rootPem;

  assert.equal(await tlsAttempt({ ca }), 'closed');
  await until('no-cert counted', () => rejected('no client certificate') === 1);

  const other = await (await makePki(pki.trustDomain)).leaf('web');
  assert.equal(await tlsAttempt({ ca, cert: other.certChainPem, key: other.keyPem }), 'closed');
  await until('other-CA counted', () => rejected('client certificate not signed by the trust bundle') === 1);

  const expired = await pki.leaf('web', { now: new Date(Date.now() - 3 * 24 * 3600e3) });
  assert.equal(await tlsAttempt({ ca, cert: expired.certChainPem, key: expired.keyPem }), 'closed');
  await until('expired counted', () => rejected('client certificate expired') === 1);

  const db = await pki.leaf('db');
  assert.equal(await tlsAttempt({ ca, cert: db.certChainPem, key: db.keyPem }), 'closed');
  assert.equal(metrics.get('knit_inbound_connections_total', { service: 'api', source: 'db', decision: 'deny', rule: 'default (deny)' }), 1);

  const plain = await dialPlain(inboundPort);
  plain.on('error', () => undefined);
  plain.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
  await once(plain, 'close');
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
    assert.equal(await tlsAttempt({ ca, cert: h.cert, key: h.key }), 'closed', reason);
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
  await assert.rejects(roundTrip(s, 'x'));
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
  outbound.setEndpoints([endpoint(deadPort), endpoint(inboundPort)]);
  for (let i = 0; i < 4; i++) {
    const s = await dialPlain(outboundPort);
    assert.equal(await roundTrip(s, `r${i}`), `r${i}`);
    s.destroy();
  }
  outbound.setEndpoints([endpoint(inboundPort)]);
});

test('a renewed certificate is served to new connections while old ones stay open', async () => {
  const s = await dialPlain(outboundPort);
  assert.equal(await roundTrip(s, 'old'), 'old');
  inbound.setTls(await pki.leaf('api'));
  outbound.setTls(await pki.leaf('web'));
  const t = await dialPlain(outboundPort);
  assert.equal(await roundTrip(t, 'new'), 'new');
  assert.equal(await roundTrip(s, 'still'), 'still');
  s.destroy();
  t.destroy();
});
