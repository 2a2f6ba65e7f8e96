import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { registryContract } from '../contract-suite.js';
import { ZooKeeperRegistry } from './zookeeper.js';
import { silentLogger } from '../../log/logger.js';
import type { Instance, Registry } from '../registry.js';
import { startZooKeeper, ensureZooKeeper, type ZkCluster } from '../../../test/helpers/zookeeper.js';
import { ROOT } from '../../../test/helpers/knit.js';
import { Recorder, until } from '../../../test/helpers/wait.js';
import { isKnitError } from '../../errors.js';

const missing = ensureZooKeeper();
// Short sessions so a crashed owner's instances go in about a second (ZooKeeper: timeout + one tick).
const SESSION_MS = 1000;
const log = process.env.KNIT_TEST_LOG ? (await import('../../log/logger.js')).createLogger({ level: 'debug' }) : silentLogger();
let zk: ZkCluster | undefined;
const roots: string[] = [];

async function server(): Promise<ZkCluster> {
  zk ??= await startZooKeeper();
  return zk;
}
after(async () => {
  await zk?.stop();
});

registryContract(
  'zookeeper',
  async () => {
    const z = await server();
    const root = `/contract-${process.pid}-${roots.length}`;
    roots.push(root);
    const opened: Registry[] = [];
    const open = async (): Promise<Registry> => {
      const r = await ZooKeeperRegistry.connect({ servers: z.connect, root, sessionTimeoutMs: SESSION_MS, log: silentLogger() });
      opened.push(r);
      return r;
    };
    return {
      client: open,
      livenessTimeoutMs: SESSION_MS * 3 + 1000,
      async spawnOwner(instance: Instance) {
        const p = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'test/helpers/zk-owner.ts'), z.connect, root, String(SESSION_MS), JSON.stringify(instance)], { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
        let out = '';
        p.stdout.on('data', (d: Buffer) => (out += d.toString()));
        await until('owner registered', () => out.includes('registered'), 20_000);
        return async () => {
          p.kill('SIGKILL');
          await once(p, 'exit');
        };
      },
      async reopen() {
        for (const r of opened.splice(0)) await r.close();
      },
      async cleanup() {
        for (const r of opened) await r.close();
      },
    };
  },
  { skip: missing && `ZooKeeper not available: ${missing}` },
);

test('zookeeper: an unreachable ensemble is a clear, retryable error', { skip: missing }, async () => {
  await assert.rejects(
    ZooKeeperRegistry.connect({ servers: '127.0.0.1:1', root: '/x', sessionTimeoutMs: 1000, connectTimeoutMs: 1500, log: silentLogger() }),
    (e: unknown) => isKnitError(e, 'KNIT_ERR_REGISTRY_UNAVAILABLE') && e.retryable && /cannot reach ZooKeeper at 127\.0\.0\.1:1 within 1500 ms/.test(e.message),
  );
});

test('zookeeper: a server restart keeps the last snapshot while down and resyncs after', { skip: missing }, async (t) => {
  const z = await server();
  const root = `/restart-${process.pid}`;
  const a = await ZooKeeperRegistry.connect({ servers: z.connect, root, sessionTimeoutMs: 10_000, log: log.child({ c: 'a' }) });
  const b = await ZooKeeperRegistry.connect({ servers: z.connect, root, sessionTimeoutMs: 10_000, log: log.child({ c: 'b' }) });
  const inst: Instance = { id: 'n1/api', service: 'api', node: 'n1', address: '10.0.0.1', port: 21000, tags: [], meta: {}, health: 'passing' };
  t.after(async () => {
    await a.close();
    await b.close();
  });
  await a.register(inst);
  const snaps = new Recorder<Instance[]>();
  const errors = new Recorder<string>();
  b.watchService('api', snaps.push, (e) => errors.push(e.message));
  await snaps.next('registered', (l) => l.length === 1);
  const m = z.members[0]!;
  await m.stop('SIGKILL');
  await errors.next('told about the disconnection', (x) => /disconnected/.test(x), 10_000);
  assert.equal(snaps.values.at(-1)?.length, 1, 'no empty snapshot while disconnected (fail static)');
  await m.start();
  // While down, the instance changed: after reconnection the watcher sees it.
  await until('a can write again', async () => {
    await a.setHealth('n1/api', 'warning');
    return true;
  }, 30_000, 200);
  await snaps.next('resynced', (l) => l[0]?.health === 'warning', 30_000);
});

test('regression: health changes of a watched service do not pile up ZooKeeper watch listeners', { skip: missing }, async (t) => {
  const z = await server();
  const root = `/listeners-${process.pid}`;
  const a = await ZooKeeperRegistry.connect({ servers: z.connect, root, sessionTimeoutMs: 5000, log: silentLogger() });
  const b = await ZooKeeperRegistry.connect({ servers: z.connect, root, sessionTimeoutMs: 5000, log: silentLogger() });
  const warnings: string[] = [];
  const onWarning = (w: Error): void => void warnings.push(`${w.name}: ${w.message}`);
  process.on('warning', onWarning);
  t.after(async () => {
    process.off('warning', onWarning);
    await a.close();
    await b.close();
  });
  const inst: Instance = { id: 'n1/db', service: 'db', node: 'n1', address: '10.0.0.1', port: 21000, tags: [], meta: {}, health: 'passing' };
  await a.register(inst);
  const snaps = new Recorder<Instance[]>();
  b.watchService('db', snaps.push);
  await snaps.next('registered', (l) => l.length === 1);
  // Each health flip is a data change: before the fix every refresh added one more children listener.
  for (let i = 0; i < 30; i++) {
    const from = snaps.values.length;
    const health = i % 2 ? 'passing' : 'warning';
    await a.setHealth('n1/db', health);
    await snaps.next(`flip ${i}`, (l) => l[0]?.health === health, 5000, from);
  }
  // Still delivering, and the client never warned about a listener leak.
  await a.setHealth('n1/db', 'critical');
  await snaps.next('critical leaves the set', (l) => l.length === 0);
  assert.deepEqual(warnings.filter((w) => /MaxListeners/.test(w)), []);
});
