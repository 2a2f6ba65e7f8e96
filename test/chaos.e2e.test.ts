/**
 * A bounded chaos run, the fault test to show an SRE. Three hosts (network
 * namespaces) run real agents: `web` on A and C calls `api` on B and C
 * through the mesh, all the time. Meanwhile, at random (seeded, so a run
 * can be replayed with KNIT_CHAOS_SEED), the run kills and restarts a
 * ZooKeeper member, the ZooKeeper leader, the control plane, an agent
 * (SIGKILL or SIGTERM), and cuts a host off for longer than the session
 * timeout, then heals it.
 *
 * It reports requests sent, failed, and failed between services whose
 * instances were healthy throughout (no fault on the calling host nor on
 * any api host during the request, and settled since the last one): those
 * are the failures a mesh owes nobody, and there must be none. It also
 * reports how many requests failed while one api host was down and the
 * other healthy (failover: new connections should find the healthy one;
 * requests in flight on the dead host, or on kept-alive connections into a
 * black hole, cannot be saved by any proxy). At the end it
 * checks that the registry, every agent's view and the intentions match
 * what was declared: nothing lost, nothing stale.
 *
 * Short by default (part of npm test); `npm run chaos` runs it longer
 * (KNIT_CHAOS_SECONDS).
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { setTimeout as delay } from 'node:timers/promises';
import { KNIT, ROOT, knit, start, freePort, type Proc } from './helpers/knit.js';
import { makeNet, netnsUnavailable, type TestNet } from './helpers/netns.js';
import { ensureZooKeeper, startZooKeeper, type ZkCluster } from './helpers/zookeeper.js';
import { FleetAgents } from './helpers/fleet.js';
import { until } from './helpers/wait.js';
import { prng } from './helpers/prng.js';

const missing = netnsUnavailable() ?? ensureZooKeeper();
const SECONDS = Number(process.env.KNIT_CHAOS_SECONDS ?? 40);
const SEED = Number(process.env.KNIT_CHAOS_SEED ?? Date.now() % 100_000);
const SESSION_MS = 2000;
/** After a fault on a host ends, its traffic may take this long to settle (re-registration, watches) before a failure counts. */
const SETTLE_MS = 3000;
const HOSTS = ['a', 'b', 'c'] as const;
type Host = (typeof HOSTS)[number];
const API_HOSTS: Host[] = ['b', 'c'];
const CLIENT_HOSTS: Host[] = ['a', 'c'];

let net: TestNet;
let zk: ZkCluster;
let dir: string;
let server: Proc;
let serverUrl: string;
let cliEnv: NodeJS.ProcessEnv;
let fleet: FleetAgents;
const procs: ChildProcess[] = [];
const lines: Record<string, string[]> = {};
/** Fault windows per host: [from, to] (to undefined while the fault lasts). */
const windows: Record<Host, Array<[number, number | undefined]>> = { a: [], b: [], c: [] };
const log: string[] = [];

const faulted = (h: Host, t: number): boolean => windows[h].some(([from, to]) => t >= from && (to === undefined || t <= to + SETTLE_MS));

async function startServer(): Promise<void> {
  server = start([KNIT, 'server', '--config', join(dir, 'server', 'server.yaml')]);
  await server.waitFor(/knit server ready/, 60_000);
}

// A hang fails in minutes, not at the runner's 15-minute limit (a normal run takes about a minute).
describe('chaos: traffic between three agents while ZooKeeper, the control plane, agents and links fail', { skip: missing && `cannot run: ${missing}`, timeout: (SECONDS + 240) * 1000 }, () => {
  before(async () => {
    net = makeNet([...HOSTS], 79);
    dir = await mkdtemp(join(tmpdir(), 'knit-chaos-'));
    zk = await startZooKeeper({ size: 3, host: net.bridgeAddress });
    const zkUrl = `zk://${zk.connect}/knit`;
    const port = await freePort();
    serverUrl = `https://${net.bridgeAddress}:${port}`;
    await mkdir(join(dir, 'server'), { recursive: true });
    await writeFile(join(dir, 'server', 'server.yaml'), `name: cp1\ndata_dir: ${join(dir, 'server', 'data')}\nregistry: ${zkUrl}\nlisten: ${net.bridgeAddress}:${port}\nadvertise: [${net.bridgeAddress}]\nleaf_ttl: 1m\nagent_ttl: 2m\n`);
    await startServer();
    cliEnv = { KNIT_SERVER: serverUrl, KNIT_TOKEN_FILE: join(dir, 'server', 'data', 'operator.token'), KNIT_CA_FILE: join(dir, 'server', 'data', 'ca', 'root.pem') };
    fleet = new FleetAgents(net, dir);
    const allowed: Record<Host, string> = { a: 'web', b: 'api', c: 'api,web' };
    for (const h of HOSTS) {
      await fleet.configure(h, { node: `host-${h}`, registry: `${zkUrl}?session_timeout=${SESSION_MS / 1000}s`, server: serverUrl, advertise: net.hosts[h]!.address, extra: ['drain: 1s'] });
      const tok = await knit(['token', 'create', '--node', `host-${h}`, '--services', allowed[h], '--ttl', '10m'], cliEnv);
      assert.equal(tok.code, 0, tok.stderr);
      await writeFile(join(fleet.home(h), 'join.token'), tok.stdout);
      if (API_HOSTS.includes(h)) {
        await writeFile(join(fleet.home(h), 'services', 'api.json'), JSON.stringify({ service: { name: 'api', port: 9001, check: { http: 'http://127.0.0.1:9001/health', interval: '1s', timeout: '1s' } } }));
        const app = net.spawn(h, [process.execPath, join(ROOT, 'examples/hello/api.mjs')]);
        procs.push(app);
        await new Promise((r) => app.stdout!.once('data', r));
      }
      if (CLIENT_HOSTS.includes(h)) {
        await writeFile(join(fleet.home(h), 'services', 'web.json'), JSON.stringify({ service: { name: 'web', connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'api', local_bind_port: 9191 }] } } } } }));
      }
    }
    for (const h of HOSTS) await fleet.start(h);
    await writeFile(join(dir, 'intentions.yaml'), 'default: deny\nintentions:\n  - { source: web, destination: api, action: allow }\n');
    assert.equal((await knit(['intention', 'apply', '-f', join(dir, 'intentions.yaml')], cliEnv)).code, 0);
    for (const h of CLIENT_HOSTS) {
      const p = net.spawn(h, [process.execPath, join(ROOT, 'test/helpers/load-client.mjs'), 'http://127.0.0.1:9191/', '25']);
      procs.push(p);
      lines[h] = [];
      let buf = '';
      p.stdout!.on('data', (d: Buffer) => {
        buf += d.toString();
        const parts = buf.split('\n');
        buf = parts.pop()!;
        lines[h]!.push(...parts);
      });
    }
    await until('traffic flows from A and C', () => CLIENT_HOSTS.every((h) => lines[h]!.filter((l) => l.split(' ')[1] === '1').length >= 10), 30_000, 50);
  });

  after(async () => {
    for (const p of procs) p.kill('SIGKILL');
    fleet?.killAll();
    await server?.kill();
    await zk?.stop();
    net?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  test(`${SECONDS} s of random faults: no request fails between healthy hosts, and everything converges`, async (t) => {
    const rand = prng(SEED);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
    const begin = Date.now();
    t.diagnostic(`seed ${SEED} (replay with KNIT_CHAOS_SEED=${SEED})`);
    const faults = ['zk-member', 'zk-leader', 'server', 'agent', 'partition'] as const;
    while (Date.now() - begin < SECONDS * 1000) {
      const fault = pick(faults);
      const at = Date.now() - begin;
      if (fault === 'zk-member' || fault === 'zk-leader') {
        const leader = await zk.leader();
        const victim = fault === 'zk-leader' ? leader : pick(zk.members.filter((m) => m !== leader));
        if (!victim) continue;
        await victim.stop('SIGKILL');
        await until('a leader', async () => (await zk.leader()) !== undefined, 30_000, 100);
        await victim.start();
        await until('member back', async () => (await victim.mode()) !== '', 30_000, 100);
        log.push(`+${at} ms ${fault} ${victim.id} killed and restarted`);
      } else if (fault === 'server') {
        const sig = pick(['SIGKILL', 'SIGTERM'] as const);
        if (sig === 'SIGKILL') await server.kill();
        else await server.stop();
        await delay(500 + rand() * 2000); // down for a random while: the fault's length, not a wait for a condition
        await startServer();
        log.push(`+${at} ms server ${sig} and restarted`);
      } else if (fault === 'agent') {
        const h = pick(HOSTS);
        const sig = pick(['SIGKILL', 'SIGTERM'] as const);
        const w: [number, number | undefined] = [Date.now(), undefined];
        windows[h].push(w);
        await fleet.stop(h, sig);
        await fleet.start(h);
        w[1] = Date.now();
        log.push(`+${at} ms agent ${h} ${sig} and restarted`);
      } else {
        const h = pick(HOSTS);
        const w: [number, number | undefined] = [Date.now(), undefined];
        windows[h].push(w);
        net.link(h, false);
        await delay(SESSION_MS * 1.5 + rand() * SESSION_MS); // cut off past the session timeout: the fault's length
        net.link(h, true);
        w[1] = Date.now();
        log.push(`+${at} ms partition ${h} for ${w[1] - w[0]} ms`);
      }
      await delay(500 + rand() * 1500); // a random gap between faults
    }
    // Let everything settle, then stop the load.
    await until('every client succeeds again', () => CLIENT_HOSTS.every((h) => lines[h]!.slice(-20).every((l) => l.split(' ')[1] === '1')), 60_000, 200);
    for (const p of procs.slice(-CLIENT_HOSTS.length)) p.kill('SIGTERM');

    let sent = 0;
    let failed = 0;
    let failover = 0;
    const owed: string[] = [];
    for (const h of CLIENT_HOSTS) {
      for (const l of lines[h]!) {
        const [ts, ok, ms, what] = l.split(' ');
        const at = Number(ts);
        const end = at + Number(ms);
        sent++;
        if (ok === '1') continue;
        failed++;
        const ok_ = (x: Host): boolean => !faulted(x, at) && !faulted(x, end);
        if (ok_(h) && API_HOSTS.every(ok_)) owed.push(`${h} +${at - begin} ms after ${ms} ms: ${what}`);
        else if (ok_(h) && API_HOSTS.some(ok_)) failover++;
      }
    }
    t.diagnostic(`faults: ${log.join(' | ')}`);
    t.diagnostic(`requests sent ${sent}, failed ${failed}; failed between services healthy throughout: ${owed.length}; failed while one api host was down and the other healthy: ${failover}`);

    // Nothing lost, nothing stale: the registry, every agent's view and the intentions as declared.
    const want = { api: ['host-b/api', 'host-c/api'], web: ['host-a/web', 'host-c/web'] };
    await until('registry as declared', async () => {
      const r = await knit(['services', '--json'], cliEnv);
      const list = JSON.parse(r.stdout) as Array<{ name: string; instances: Array<{ id: string; health: string }> }>;
      return Object.entries(want).every(([svc, ids]) => {
        const got = list.find((s) => s.name === svc)?.instances ?? [];
        return JSON.stringify(got.map((i) => i.id).sort()) === JSON.stringify(ids) && got.every((i) => i.health === 'passing');
      });
    }, 30_000, 250);
    const apiAddresses = API_HOSTS.map((h) => net.hosts[h]!.address).sort();
    for (const h of CLIENT_HOSTS) {
      await until(`agent ${h} routes to both api hosts`, async () => {
        const eps = (await fleet.state(h)).services.find((s) => s.name === 'web')?.upstreams[0]?.endpoints ?? [];
        return JSON.stringify(eps.map((e) => e.split(':')[0]).sort()) === JSON.stringify(apiAddresses);
      }, 30_000, 250);
    }
    const intentions = JSON.parse((await knit(['intention', 'list', '--json'], cliEnv)).stdout) as { default: string; intentions: Array<{ source: string; destination: string; action: string }> };
    assert.deepEqual([intentions.default, intentions.intentions.map((i) => `${i.source}->${i.destination}:${i.action}`)], ['deny', ['web->api:allow']]);
    assert.deepEqual(owed, [], `requests that failed between healthy hosts (seed ${SEED})`);
    assert.ok(sent > SECONDS * 20, `${sent} requests`);
  });
});
