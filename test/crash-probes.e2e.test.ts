/**
 * "No request can crash a process", end to end: a real `knit dev` process
 * takes several hundred malformed and hostile requests on its admin API and
 * is still running, still healthy and unchanged afterwards. It relies on the
 * router alone, not on a process-level guard.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { start, freePort, KNIT, type Proc } from './helpers/knit.js';
import { crashProbe, assertServing } from './helpers/probes.js';

let dataDir: string;
let configDir: string;
let adminPort: number;
let dev: Proc;

before(async () => {
  dataDir = await mkdtemp(join(tmpdir(), 'knit-probe-data-'));
  configDir = await mkdtemp(join(tmpdir(), 'knit-probe-conf-'));
  // One service of our own, on ports free now (not the example's fixed ones, which other tests use).
  const service = { service: { name: 'probe-target', port: await freePort(), connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'probe-elsewhere', local_bind_port: await freePort() }] } } } } };
  await writeFile(join(configDir, 'probe-target.json'), JSON.stringify(service, null, 2));
  adminPort = await freePort();
  dev = start([KNIT, 'dev', '--config-dir', configDir, '--data-dir', dataDir, '--admin-addr', `127.0.0.1:${adminPort}`, '--hbone-port', '0'], { KNIT_LOG_LEVEL: 'info' });
  await dev.waitFor(/knit dev ready/);
});

after(async () => {
  await dev?.stop();
  await rm(dataDir, { recursive: true, force: true });
  await rm(configDir, { recursive: true, force: true });
});

/** What the probes must not change: the intentions (with their version) and the services. */
async function snapshot(): Promise<unknown> {
  const get = async (path: string) => (await request(`http://127.0.0.1:${adminPort}${path}`)).body.json();
  const state = (await get('/v1/state')) as { services: Array<{ name: string; port: number }> };
  return { intentions: await get('/v1/intentions'), services: state.services.map((s) => [s.name, s.port]) };
}

test('knit dev survives the crash probes on its admin API, still healthy and unchanged', async (t) => {
  const target = { host: '127.0.0.1', port: adminPort };
  const before = await snapshot();
  const t0 = Date.now();
  const r = await crashProbe(target);
  const ms = Date.now() - t0;
  t.diagnostic(`crash probes: ${r.sent} sent, ${r.answered} answered in ${ms} ms: ${JSON.stringify(r.statuses)}`);
  for (const o of r.outcomes.filter((x) => !/^\d{3}$/.test(x.outcome))) t.diagnostic(`  ${o.outcome}: ${o.probe}`);

  assert.equal(dev.child.exitCode, null, `knit dev exited:\n${dev.stderr().slice(-3000)}`);
  assert.equal(dev.child.signalCode, null);
  await assertServing(target);
  const health = await request(`http://127.0.0.1:${adminPort}/v1/health`);
  assert.equal(health.statusCode, 200);
  assert.deepEqual(await health.body.json(), { status: 'ok' });

  assert.ok(r.sent >= 500, `${r.sent} probes`);
  assert.ok(r.answered >= r.sent - 20, `${r.answered} of ${r.sent} answered: ${JSON.stringify(r.statuses)}`);
  const serverErrors = r.outcomes.filter((o) => !/^[234]\d\d$|^closed$|^reset$|^timeout$/.test(o.outcome));
  assert.deepEqual(serverErrors, [], 'probes answered with a server error or not HTTP');
  assert.doesNotMatch(dev.stderr(), /API handler failed|API request failed|unhandled|uncaught/i);
  assert.ok(ms < 15_000, `${ms} ms`);
  assert.deepEqual(await snapshot(), before, 'the probes changed state');
});
