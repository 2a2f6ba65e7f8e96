/**
 * Registry figures over a real ZooKeeper, with ZooKeeper itself as the
 * baseline in the same run:
 *  - registration to routable: one client registers an instance, another
 *    (as a peer agent) waits for its watch to deliver it. Baseline: a bare
 *    znode create seen by a bare children watch.
 *  - deregistration after a crash: an owner process is SIGKILLed; time until
 *    the watcher's snapshot drops it, against the configured session timeout.
 * Usage: npm run bench:registry [-- --iterations N]
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import zookeeper from 'node-zookeeper-client';
import { ZooKeeperRegistry } from '../src/registry/zookeeper/zookeeper.js';
import { silentLogger } from '../src/log/logger.js';
import type { Instance } from '../src/registry/registry.js';
import { startZooKeeper } from '../test/helpers/zookeeper.js';
import { ROOT } from '../test/helpers/knit.js';
import { Recorder } from '../test/helpers/wait.js';

const n = Number(process.argv[process.argv.indexOf('--iterations') + 1]) || 200;
const pct = (xs: number[], p: number): number => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;
const fmt = (xs: number[]): string => `p50 ${pct(xs, 50).toFixed(2)} ms, p99 ${pct(xs, 99).toFixed(2)} ms, max ${Math.max(...xs).toFixed(2)} ms`;
const inst = (i: number, service = 'bench'): Instance => ({ id: `host-${i}/${service}`, service, node: `host-${i}`, address: '10.0.0.1', port: 21000, tags: [], meta: {}, health: 'passing' });

async function baseline(servers: string): Promise<number[]> {
  const mk = async () => {
    const c = zookeeper.createClient(servers, { sessionTimeout: 5000 });
    c.connect();
    await once(c, 'connected');
    return c;
  };
  const [w, r] = [await mk(), await mk()];
  await new Promise<void>((res) => r.mkdirp('/baseline/svc', () => res()));
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    // One children watch, armed before the create: its notification is the engine's floor.
    // (Wrapped in an object: resolving with a promise would wait for it.)
    const { seen } = await new Promise<{ seen: Promise<void> }>((armed) => {
      const fired = new Promise<void>((res) => w.getChildren('/baseline/svc', () => res(), () => armed({ seen: fired })));
    });
    const t0 = performance.now();
    await new Promise<void>((res) => r.create(`/baseline/svc/i${i}`, Buffer.from('{}'), zookeeper.CreateMode.EPHEMERAL, () => res()));
    await seen;
    out.push(performance.now() - t0);
    await new Promise<void>((res) => r.remove(`/baseline/svc/i${i}`, () => res()));
  }
  w.close();
  r.close();
  return out;
}

async function knitRegistration(servers: string): Promise<number[]> {
  const opts = { servers, root: '/bench', sessionTimeoutMs: 5000, log: silentLogger() };
  const [owner, peer] = [await ZooKeeperRegistry.connect(opts), await ZooKeeperRegistry.connect(opts)];
  const rec = new Recorder<Instance[]>();
  peer.watchService('bench', rec.push);
  await rec.next('initial', () => true);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const from = rec.values.length;
    const t0 = performance.now();
    await owner.register(inst(i));
    await rec.next(`instance ${i}`, (l) => l.some((x) => x.id === inst(i).id), 10_000, from);
    out.push(performance.now() - t0);
    const gone = rec.values.length;
    await owner.deregister(inst(i).id);
    await rec.next(`instance ${i} gone`, (l) => l.length === 0, 10_000, gone);
  }
  await owner.close();
  await peer.close();
  return out;
}

async function crashDeregistration(servers: string, sessionMs: number): Promise<number> {
  const peer = await ZooKeeperRegistry.connect({ servers, root: '/bench', sessionTimeoutMs: 5000, log: silentLogger() });
  const service = `crash${sessionMs}`;
  const rec = new Recorder<Instance[]>();
  peer.watchService(service, rec.push);
  const p = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'test/helpers/zk-owner.ts'), servers, '/bench', String(sessionMs), JSON.stringify(inst(0, service))], { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
  await rec.next('registered', (l) => l.length === 1, 30_000);
  const from = rec.values.length;
  const t0 = performance.now();
  p.kill('SIGKILL');
  await rec.next('removed', (l) => l.length === 0, sessionMs * 5, from);
  const ms = performance.now() - t0;
  await peer.close();
  return ms;
}

const zk = await startZooKeeper();
try {
  const base = await baseline(zk.connect);
  const ours = await knitRegistration(zk.connect);
  console.log(`\nregistry benchmark over ZooKeeper 3.8 standalone on loopback, ${n} registrations each`);
  console.log(`| path | registration to routable |`);
  console.log(`|---|---|`);
  console.log(`| bare znode create -> children watch (baseline) | ${fmt(base)} |`);
  console.log(`| knit register() -> peer's watchService snapshot | ${fmt(ours)} |`);
  console.log(`knit / baseline: p50 ${(pct(ours, 50) / pct(base, 50)).toFixed(2)}x, p99 ${(pct(ours, 99) / pct(base, 99)).toFixed(2)}x\n`);
  console.log('| session timeout | deregistration after SIGKILL of the owner (3 runs) |');
  console.log('|---|---|');
  for (const s of [1000, 2000, 5000]) {
    const runs = [await crashDeregistration(zk.connect, s), await crashDeregistration(zk.connect, s), await crashDeregistration(zk.connect, s)];
    console.log(`| ${s} ms | ${runs.map((x) => `${x.toFixed(0)} ms`).join(', ')} (${(Math.max(...runs) / s).toFixed(2)}x the timeout at most) |`);
  }
} finally {
  await zk.stop();
}
