import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { once } from 'node:events';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Agent } from './agent.js';
import { loadServicesStrict } from '../config/services.js';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { ControlPlane } from '../server/control-plane.js';
import { Metrics } from '../log/metrics.js';
import { silentLogger } from '../log/logger.js';
import type { Instance, Registry } from '../registry/registry.js';
import { Recorder, until } from '../../test/helpers/wait.js';
import { freePort } from '../../test/helpers/knit.js';
import { isKnitError } from '../errors.js';

let dir: string;
let app: http.Server;
let appPort: number;
let healthy = true;
let agent: Agent;
let watcher: Registry;
let upPort: number;
let cp: ControlPlane;

const get = (port: number) => new Promise<string>((resolve, reject) => {
  http.get(`http://127.0.0.1:${port}/`, { agent: false }, (res) => {
    let b = '';
    res.on('data', (c: Buffer) => (b += c.toString()));
    res.on('end', () => resolve(b));
  }).on('error', reject);
});

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'knit-agent-'));
  app = http.createServer((req, res) => {
    if (req.url === '/health') res.statusCode = healthy ? 200 : 503;
    res.end('api says hi');
  });
  app.listen(0, '127.0.0.1');
  await once(app, 'listening');
  appPort = (app.address() as net.AddressInfo).port;
  upPort = await freePort();
  const services = join(dir, 'services');
  await (await import('node:fs/promises')).mkdir(services);
  await writeFile(join(services, 'api.json'), JSON.stringify({ service: { name: 'api', port: appPort, check: { http: `http://127.0.0.1:${appPort}/health`, interval: '1s', timeout: '1s' } } }));
  await writeFile(join(services, 'web.json'), JSON.stringify({ service: { name: 'web', connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'api', local_bind_port: upPort }] } } } } }));
  const store = await EmbeddedStore.open(join(dir, 'data'));
  cp = await ControlPlane.open({ dataDir: join(dir, 'data'), registry: store.client(), name: 'cp', initialDefault: 'allow', log: silentLogger() });
  agent = new Agent({
    node: 'n1', trustDomain: cp.trustDomain, servicesDir: services, advertiseAddress: '127.0.0.1', bindAddress: '127.0.0.1', hbonePort: 0,
    registry: store.client(), signer: cp.localSigner(), log: silentLogger(), metrics: new Metrics(),
    trust: () => ({ roots: cp.trustBundle(), trustDomain: cp.trustDomain }),
  });
  await agent.start((await loadServicesStrict(services)).services);
  watcher = store.client();
});

after(async () => {
  await agent.stop();
  app.close();
  await rm(dir, { recursive: true, force: true });
});

test('an instance whose checks fail leaves its peers\' endpoints and comes back when they pass', async () => {
  const rec = new Recorder<Instance[]>();
  const w = watcher.watchService('api', rec.push);
  await rec.next('api routable', (l) => l.length === 1);
  assert.equal(await get(upPort), 'api says hi');

  healthy = false;
  await rec.next('api removed', (l) => l.length === 0, 5000);
  await until('web has no endpoint', () => agent.state().services.find((s) => s.name === 'web')?.upstreams[0]?.endpoints.length === 0);
  await assert.rejects(get(upPort), /ECONNRESET|socket hang up/);

  healthy = true;
  const n = rec.values.length;
  await rec.next('api back', (l) => l.length === 1, 5000, n);
  await until('web routes again', async () => (await get(upPort).catch(() => '')) === 'api says hi');
  w.close();
});

test('the control plane signs a service leaf only for a service the node is allowed to run', async () => {
  const { createCsr } = await import('../identity/ca.js');
  const { serviceId } = await import('../identity/spiffe.js');
  const csr = (await createCsr(serviceId(cp.trustDomain, 'api'))).csrPem;
  const refused = (node: string, re: RegExp) => assert.rejects(cp.signService(node, 'api', csr), (e: unknown) => isKnitError(e, 'KNIT_ERR_UNAUTHORIZED') && re.test(e.message));
  await refused('n2', /node n2 is not known to the control plane/);
  const grant = async (node: string, services: string[]) => cp.nodes.enrol({ id: `tok-${node}`, node, services, expiresAt: new Date(Date.now() + 60_000).toISOString() }, 'KEY', new Date(Date.now() + 60_000));
  await grant('n2', ['web', 'db-*']);
  // Registering the service is not a way in: only the allowance counts.
  await refused('n2', /service api is not allowed on node n2: knit node set n2 --services web,db-\*,api/);
  await cp.nodes.setServices('n2', ['api*']);
  assert.ok((await cp.signService('n2', 'api', csr)).certPem);
  await cp.nodes.revoke('n2');
  await refused('n2', /node n2 was revoked at/);
});

test('a service whose certificate is refused waits, the others run, and it starts by itself once allowed', async () => {
  const { KnitError } = await import('../errors.js');
  const local = cp.localSigner();
  let allowDb = false;
  const services = join(dir, 'services-refused');
  await (await import('node:fs/promises')).mkdir(services);
  const dbPort = await freePort();
  await writeFile(join(services, 'db.json'), JSON.stringify({ service: { name: 'db', port: dbPort } }));
  await writeFile(join(services, 'cache.json'), JSON.stringify({ service: { name: 'cache', port: await freePort() } }));
  const store = await EmbeddedStore.open();
  const a = new Agent({
    node: 'n3', trustDomain: cp.trustDomain, servicesDir: services, advertiseAddress: '127.0.0.1', bindAddress: '127.0.0.1', hbonePort: 0,
    registry: store.client(), log: silentLogger(), metrics: new Metrics(), identityRetryMaxMs: 200,
    signer: {
      signService: async (svc, csr) => {
        if (svc === 'db' && !allowDb) throw new KnitError('KNIT_ERR_UNAUTHORIZED', 'control plane /v1/agent/sign: service db is not allowed on node n3: knit node set n3 --services cache,db');
        return local.signService(svc, csr);
      },
      trustBundle: () => local.trustBundle(),
    },
    trust: () => ({ roots: cp.trustBundle(), trustDomain: cp.trustDomain }),
  });
  const peer = store.client();
  await a.start((await loadServicesStrict(services)).services);
  const byName = () => Object.fromEntries(a.state().services.map((s) => [s.name, s]));
  assert.equal(byName().cache?.waiting, undefined);
  assert.match(byName().db?.waiting ?? '', /service db is not allowed on node n3: knit node set n3 --services cache,db/);
  assert.equal((await peer.instances('cache')).length, 1, 'the allowed service runs');
  assert.equal((await peer.instances('db')).length, 0, 'the refused one is not registered');
  allowDb = true;
  await until('db started by itself', async () => byName().db?.waiting === undefined && (await peer.instances('db')).length === 1, 5000, 20);
  assert.ok(byName().db?.certificateExpires);
  await a.stop();
});

test('reload starts new services, refuses bad files without touching running ones, and TTL checks report', async () => {
  const services = join(dir, 'services');
  await writeFile(join(services, 'jobs.yaml'), 'service:\n  name: jobs\n  port: 1\n  check:\n    ttl: 30s\n');
  const ok = await agent.reload();
  assert.deepEqual([ok.ok, ok.started], [true, ['jobs']]);
  assert.equal(agent.state().services.find((s) => s.name === 'jobs')?.health, 'critical');
  agent.reportCheck('service:jobs', 'passing');
  await until('jobs passing', () => agent.state().services.find((s) => s.name === 'jobs')?.health === 'passing');
  assert.throws(() => agent.reportCheck('service:api', 'passing'), /http check, not a ttl check/);
  assert.throws(() => agent.reportCheck('nope', 'passing'), (e: unknown) => isKnitError(e, 'KNIT_ERR_NOT_FOUND'));

  await writeFile(join(services, 'jobs.yaml'), 'service:\n  name: jobs\n  port: 1\n  bogus: true\n');
  const bad = await agent.reload();
  assert.equal(bad.ok, false);
  assert.match(bad.problems[0]!.message, /unknown field "bogus"/);
  assert.deepEqual(agent.state().services.map((s) => s.name).sort(), ['api', 'jobs', 'web']);
  assert.equal(agent.state().services.find((s) => s.name === 'jobs')?.health, 'passing', 'running service untouched');

  await rm(join(services, 'jobs.yaml'));
  const removed = await agent.reload();
  assert.deepEqual(removed.stopped, ['jobs']);
  assert.deepEqual(await watcher.instances('jobs'), []);
});
