/**
 * Faults between an agent and its registry, and reloads that cannot be
 * applied: what the registry says must converge to the truth, and a reload
 * applies whole or not at all.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { once } from 'node:events';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Agent } from './agent.js';
import { loadServicesStrict } from '../config/services.js';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { ControlPlane } from '../server/control-plane.js';
import { Metrics } from '../log/metrics.js';
import { silentLogger } from '../log/logger.js';
import type { CertSigner } from '../identity/leaf.js';
import type { Instance } from '../registry/registry.js';
import { faulty } from '../../test/helpers/faulty-registry.js';
import { Recorder, until } from '../../test/helpers/wait.js';
import { freePort } from '../../test/helpers/knit.js';

let dir: string;
let store: EmbeddedStore;
let cp: ControlPlane;
let app: http.Server;
let appPort: number;
let healthy = true;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'knit-reconcile-'));
  store = await EmbeddedStore.open();
  cp = await ControlPlane.open({ dataDir: join(dir, 'cp'), registry: store.client(), name: 'cp', initialDefault: 'allow', log: silentLogger() });
  app = http.createServer((req, res) => {
    if (req.url === '/health') res.statusCode = healthy ? 200 : 503;
    res.end('ok');
  });
  app.listen(0, '127.0.0.1');
  await once(app, 'listening');
  appPort = (app.address() as net.AddressInfo).port;
});

after(async () => {
  app.close();
  await rm(dir, { recursive: true, force: true });
});

async function agentWith(name: string, files: Record<string, unknown>, opts: { signer?: CertSigner; antiEntropyMs?: number } = {}) {
  const services = join(dir, name);
  await mkdir(services, { recursive: true });
  for (const [f, v] of Object.entries(files)) await writeFile(join(services, f), JSON.stringify(v));
  const registry = faulty(store.client());
  const agent = new Agent({
    node: name, trustDomain: cp.trustDomain, servicesDir: services, advertiseAddress: '127.0.0.1', bindAddress: '127.0.0.1', hbonePort: 0,
    registry, signer: opts.signer ?? cp.localSigner(), log: silentLogger(), metrics: new Metrics(), publishRetryMaxMs: 100, antiEntropyMs: opts.antiEntropyMs,
    trust: () => ({ roots: cp.trustBundle(), trustDomain: cp.trustDomain }),
  });
  return { agent, registry, services, start: async () => agent.start((await loadServicesStrict(services)).services) };
}

const api = (port = appPort) => ({ service: { name: 'api', port, check: { http: `http://127.0.0.1:${port}/health`, interval: '1s', timeout: '1s' } } });
const inRegistry = async (service: string) => (await store.client().instances(service))[0];

test('a failed registry write no longer leaves "passing" in the registry for an instance that is critical', async () => {
  healthy = true;
  const { agent, registry, start } = await agentWith('n-health', { 'api.json': api() });
  await start();
  await until('api passing in the registry', async () => (await inRegistry('api'))?.health === 'passing', 5000, 20);
  registry.failWrites = true;
  healthy = false;
  await until('the agent sees critical, and could not say so', () => registry.failed > 0 && agent.state().services[0]?.health === 'critical', 5000, 20);
  assert.equal((await inRegistry('api'))?.health, 'passing', 'the registry is stale while writes fail');
  assert.equal(agent.state().services[0]?.published, 'unknown');
  // The registry comes back; nothing else changes: the agent retries by itself.
  registry.failWrites = false;
  await until('registry says critical', async () => (await inRegistry('api'))?.health === 'critical', 5000, 20);
  assert.equal(agent.state().services[0]?.published, 'critical');
  healthy = true;
  await agent.stop();
});

test('anti-entropy puts back an instance removed behind the agent\'s back', async () => {
  healthy = true;
  const { agent, start } = await agentWith('n-ae', { 'api.json': api() }, { antiEntropyMs: 200 });
  await start();
  const id = 'n-ae/api';
  await until('registered', async () => (await store.client().instances('api')).some((i) => i.id === id), 5000, 20);
  await store.client().evict('api', id);
  assert.ok(!(await store.client().instances('api')).some((i) => i.id === id));
  await until('back by anti-entropy', async () => (await store.client().instances('api')).some((i) => i.id === id), 5000, 20);
  await agent.stop();
});

test('a reload whose start fails (port taken) changes nothing and says why', async () => {
  healthy = true;
  const taken = net.createServer();
  const takenPort = await freePort();
  taken.listen(takenPort, '127.0.0.1');
  await once(taken, 'listening');
  const upPort = await freePort();
  const web = { service: { name: 'web', connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'api', local_bind_port: upPort }] } } } } };
  const { agent, services, start } = await agentWith('n-reload', { 'api.json': api(), 'web.json': web });
  await start();
  await until('both run', () => agent.state().services.every((s) => s.published === 'passing'), 5000, 20);
  const before = JSON.stringify(agent.state().services.map((s) => [s.name, s.port, s.upstreams]));
  // One good change (web's upstream moves), one impossible start (jobs on a port held by someone else).
  const upPort2 = await freePort();
  await writeFile(join(services, 'web.json'), JSON.stringify({ service: { name: 'web', connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'api', local_bind_port: upPort2 }] } } } } }));
  await writeFile(join(services, 'jobs.json'), JSON.stringify({ service: { name: 'jobs', connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'api', local_bind_port: takenPort }] } } } } }));
  const r = await agent.reload();
  assert.equal(r.ok, false);
  assert.match(r.problems[0]!.message, new RegExp(`${takenPort}.*EADDRINUSE.*nothing changed`));
  assert.equal(JSON.stringify(agent.state().services.map((s) => [s.name, s.port, s.upstreams])), before, 'the previous services run as before');
  assert.equal(agent.state().services.find((s) => s.name === 'web')?.upstreams[0]?.local, `127.0.0.1:${upPort}`);
  assert.equal(await inRegistry('jobs'), undefined);
  // The good change applies once the bad file is fixed.
  await rm(join(services, 'jobs.json'));
  const ok = await agent.reload();
  assert.deepEqual([ok.ok, ok.restarted], [true, ['web']]);
  taken.close();
  await agent.stop();
});

test('a tag or meta change re-registers without restarting listeners or resetting open connections', async () => {
  healthy = true;
  const upPort = await freePort();
  const web = { service: { name: 'web', connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'api', local_bind_port: upPort }] } } } } };
  const { agent, services, start } = await agentWith('n-tags', { 'api.json': api(), 'web.json': web });
  await start();
  await until('registered', async () => (await store.client().instances('api')).some((i) => i.node === 'n-tags'), 5000, 20);
  // An open connection web -> api through the mesh: a restart of either would reset it.
  const keep = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const get = () => new Promise<string>((resolve, reject) => http.get(`http://127.0.0.1:${upPort}/`, { agent: keep }, (res) => {
    let b = '';
    res.on('data', (c: Buffer) => (b += c.toString()));
    res.on('end', () => resolve(b));
  }).on('error', reject));
  await until('web reaches api', async () => (await get().catch(() => '')) === 'ok', 5000, 20);
  const sock = Object.values(keep.freeSockets)[0]?.[0];
  assert.ok(sock, 'a kept-alive connection');
  let closed = false;
  sock.on('close', () => (closed = true));
  await writeFile(join(services, 'api.json'), JSON.stringify({ service: { ...api().service, tags: ['v2'], meta: { version: '2' } } }));
  const r = await agent.reload();
  assert.deepEqual([r.ok, r.updated, r.restarted], [true, ['api'], []]);
  await until('new tags in the registry', async () => (await store.client().instances('api')).find((i) => i.node === 'n-tags')?.tags[0] === 'v2', 5000, 20);
  assert.equal(await get(), 'ok', 'the same connection still carries requests');
  assert.equal(closed, false, 'the open connection was not reset');
  keep.destroy();
  await agent.stop();
});

test('stopping the agent cancels a service still waiting for its certificate: no leaked registration', async () => {
  healthy = true;
  const local = cp.localSigner();
  let release: (() => void) | undefined;
  const gate = new Promise<void>((r) => (release = r));
  const signer: CertSigner = {
    signService: async (svc, csr) => {
      if (svc === 'slow') await gate;
      return local.signService(svc, csr);
    },
    trustBundle: () => local.trustBundle(),
  };
  const { agent, start } = await agentWith('n-cancel', { 'api.json': api(), 'slow.json': { service: { name: 'slow', port: await freePort() } } }, { signer });
  const started = start();
  await until('api registered while slow still starts', async () => (await store.client().instances('api')).some((i) => i.node === 'n-cancel'), 5000, 20);
  const seen = new Recorder<Instance[]>();
  const w = store.client().watchService('slow', seen.push);
  await agent.stop();
  release!();
  await started.catch(() => undefined);
  // Nothing to wait for but the absence of an event: a short bounded wait for a registration that must not come.
  await assert.rejects(seen.next('a leaked registration', (l) => l.length > 0, 300), /timed out/);
  w.close();
  assert.deepEqual(await store.client().instances('slow'), []);
});

test('deregister_critical_service_after: an instance critical that long leaves the registry, and comes back when it passes', async () => {
  healthy = true;
  const svc = { service: { name: 'api', port: appPort, check: { http: `http://127.0.0.1:${appPort}/health`, interval: '1s', timeout: '1s', deregister_critical_service_after: '1s' } } };
  const { agent, start } = await agentWith('n-dcsa', { 'api.json': svc });
  await start();
  const mine = async () => (await store.client().instances('api')).find((i) => i.node === 'n-dcsa');
  await until('registered passing', async () => (await mine())?.health === 'passing', 5000, 20);
  healthy = false;
  await until('critical in the registry', async () => (await mine())?.health === 'critical', 5000, 20);
  await until('gone after a second critical', async () => (await mine()) === undefined, 5000, 20);
  assert.match(agent.state().services[0]?.deregisteredCritical ?? '', /critical for 1 s \(deregister_critical_service_after\)/);
  healthy = true;
  await until('back when passing', async () => (await mine())?.health === 'passing', 5000, 20);
  await agent.stop();
});
