import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Server } from 'node:http';
import { X509Certificate } from 'node:crypto';
import { request, Agent as Dispatcher } from 'undici';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { ControlPlane } from './control-plane.js';
import { agentApiRoutes, fleetAuthenticator } from './agent-routes.js';
import { controlPlaneRoutes } from './routes.js';
import { listenApi } from '../api/router.js';
import { createCsr } from '../identity/ca.js';
import { agentId, serverId, serviceId } from '../identity/spiffe.js';
import { keyFingerprint } from '../identity/signed-doc.js';
import { tlsOptions, type ServiceTls } from '../identity/tls.js';
import { ControlClient, enrol, rejoin } from '../agent/control-client.js';
import { silentLogger } from '../log/logger.js';
import { isKnitError } from '../errors.js';

let dir: string;
let cp: ControlPlane;
let api: Server;
let url: string;
/** Added to the server's clock: lets a test step past the rejoin window. */
let skewMs = 0;
const OP = 'operator-token-0123456789abcdef';

async function op<T>(method: 'POST' | 'PUT' | 'GET', path: string, body?: unknown): Promise<T> {
  const d = new Dispatcher({ connect: { ca: cp.trustBundle(), checkServerIdentity: () => undefined } });
  const r = await request(`${url}${path}`, { method, dispatcher: d, headers: { authorization: `Bearer ${OP}`, 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
  const json = (await r.body.json()) as T;
  await d.close();
  assert.ok(r.statusCode < 300, JSON.stringify(json));
  return json;
}
const token = async (node: string, services: string[]) => (await op<{ token: string }>('POST', '/v1/tokens', { node, services, ttl: '10m' })).token;
const keyOf = (t: ServiceTls) => keyFingerprint(new X509Certificate(t.certChainPem).publicKey.export({ type: 'spki', format: 'pem' }).toString());

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'knit-routes-'));
  const store = await EmbeddedStore.open();
  const registry = store.client();
  const now = () => new Date(Date.now() + skewMs);
  cp = await ControlPlane.open({ dataDir: dir, registry, name: 'cp1', initialDefault: 'deny', log: silentLogger() });
  const id = serverId(cp.trustDomain, 'cp1');
  const { keyPem, csrPem } = await createCsr(id);
  const leaf = await cp.ca.signCsr(csrPem, id, { extraNames: ['127.0.0.1'] });
  const routes = [...agentApiRoutes(cp, { agentTtlMs: 3600_000, rejoinWindowMs: 30 * 24 * 3600_000, registry, log: silentLogger(), now }), ...controlPlaneRoutes(cp)];
  const l = await listenApi(routes, '127.0.0.1', 0, silentLogger(), {
    tls: tlsOptions({ certChainPem: leaf.certPem, keyPem, trustBundlePem: cp.trustBundle() }),
    authenticate: fleetAuthenticator(OP, () => cp.trustDomain),
  });
  api = l.server;
  url = `https://127.0.0.1:${l.port}`;
});

after(async () => {
  api.close();
  api.closeAllConnections();
  await rm(dir, { recursive: true, force: true });
});

test('enrolment takes the node from the token, trusts only the pinned root, and records the agent key', async () => {
  const got = await enrol(url, await token('n1', ['web', 'api-*']), 'n1');
  assert.equal(got.trustDomain, cp.trustDomain);
  assert.deepEqual(got.tls.trustBundlePem, [cp.ca.rootPem]);
  const rec = await cp.nodes.get('n1');
  assert.deepEqual(rec?.services, ['web', 'api-*']);
  assert.equal(keyFingerprint(rec.publicKey!), keyOf(got.tls));

  // A token for n2 cannot make its holder n1, nor anyone else.
  const t2 = await token('n2', ['web']);
  await assert.rejects(enrol(url, t2, 'n1'), (e: unknown) => isKnitError(e, 'KNIT_ERR_UNAUTHORIZED') && /this join token is for node n2, but the agent asked to be n1: set "node: n2" in agent\.yaml/.test(e.message));
  assert.equal(keyFingerprint((await cp.nodes.get('n1'))!.publicKey!), keyOf(got.tls), 'n1 untouched');
  // A token for an existing node re-enrols it with the new key in place of the old.
  const again = await enrol(url, await token('n1', ['web']), 'n1');
  assert.equal(keyFingerprint((await cp.nodes.get('n1'))!.publicKey!), keyOf(again.tls));
  const stale = new ControlClient(url, cp.trustDomain, 'n1', got.tls);
  await assert.rejects(stale.renewAgent((await createCsr(agentId(cp.trustDomain, 'n1'))).csrPem), /proved a key the control plane does not hold/);
  await stale.close();
});

test('service leaves only for the allowance; set takes effect on the next signing; revoke stops renewals and signings', async () => {
  const got = await enrol(url, await token('n3', ['web']), 'n3');
  const c = new ControlClient(url, cp.trustDomain, 'n3', got.tls);
  const csr = async (svc: string) => (await createCsr(serviceId(cp.trustDomain, svc))).csrPem;
  assert.ok((await c.signService('web', await csr('web'))).certPem);
  await assert.rejects(c.signService('db', await csr('db')), (e: unknown) => isKnitError(e, 'KNIT_ERR_UNAUTHORIZED') && /service db is not allowed on node n3: knit node set n3 --services web,db/.test(e.message));
  await op('PUT', '/v1/nodes/n3', { services: ['web', 'db'] });
  assert.ok((await c.signService('db', await csr('db'))).certPem);
  // A renewal records the new key; the key before it still works once (a lost answer must not lock the agent out).
  const renewed = await c.renewAgent((await createCsr(agentId(cp.trustDomain, 'n3'))).csrPem);
  assert.ok(renewed.notAfter > new Date());
  const list = await op<Array<{ node: string; lastSeen?: string; keyFingerprint?: string }>>('GET', '/v1/nodes');
  assert.ok(list.find((n) => n.node === 'n3')?.lastSeen);
  const revoked = await op<{ revokedAt?: string }>('POST', '/v1/nodes/n3/revoke', {});
  assert.ok(revoked.revokedAt);
  await assert.rejects(c.signService('web', await csr('web')), /node n3 was revoked/);
  await assert.rejects(c.renewAgent((await createCsr(agentId(cp.trustDomain, 'n3'))).csrPem), /node n3 was revoked/);
  await assert.rejects(rejoin(url, got.tls, cp.trustDomain, 'n3'), /node n3 was revoked at .*; it needs a new token \(knit token create --node n3 --services web,db\)/);
  await c.close();
});

test('an agent whose certificate expired rejoins with its recorded key, within the window only', async () => {
  const got = await enrol(url, await token('n4', ['web']), 'n4');
  const back = await rejoin(url, got.tls, cp.trustDomain, 'n4');
  assert.equal(keyFingerprint((await cp.nodes.get('n4'))!.publicKey!), keyOf(back.tls));
  // Another key, even with a valid-looking request, proves nothing.
  const impostor = { ...got.tls, keyPem: (await createCsr(agentId(cp.trustDomain, 'n4'))).keyPem };
  await assert.rejects(rejoin(url, impostor, cp.trustDomain, 'n4'), /not signed with the key recorded for this node/);
  // 31 days after the certificate expired: past the 30-day window.
  skewMs = 31 * 24 * 3600_000 + 3600_000;
  try {
    await assert.rejects(rejoin(url, back.tls, cp.trustDomain, 'n4'), /longer ago than the rejoin window \(720h\); it needs a new token/);
  } finally {
    skewMs = 0;
  }
  // A nonce is single use.
  const d = new Dispatcher({ connect: { ca: cp.trustBundle(), checkServerIdentity: () => undefined } });
  const nonce = ((await (await request(`${url}/v1/agent/challenge`, { method: 'POST', dispatcher: d, body: '{}', headers: { 'content-type': 'application/json' } })).body.json()) as { nonce: string }).nonce;
  const send = async () => (await request(`${url}/v1/agent/rejoin`, { method: 'POST', dispatcher: d, body: JSON.stringify({ node: 'n4', nonce, csr: 'x', proof: 'AA==' }), headers: { 'content-type': 'application/json' } })).body.json() as Promise<{ error: string }>;
  assert.match((await send()).error, /not signed with the key recorded/);
  assert.match((await send()).error, /unknown or expired nonce/);
  await d.close();
});
