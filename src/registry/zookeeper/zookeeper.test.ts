import { test, after, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import zookeeper, { type ACL as ZkAcl, type Client } from 'node-zookeeper-client';
import { pino } from 'pino';
import { registryContract, type Partitioned } from '../contract-suite.js';
import { ZooKeeperRegistry, digestId, type ZooKeeperCredentials, type ZooKeeperOptions } from './zookeeper.js';
import { silentLogger } from '../../log/logger.js';
import type { Instance, Registry } from '../registry.js';
import { startZooKeeper, ensureZooKeeper, type ZkCluster } from '../../../test/helpers/zookeeper.js';
import { ROOT } from '../../../test/helpers/knit.js';
import { Recorder, until } from '../../../test/helpers/wait.js';
import { TcpProxy, ZK_OP, zkRequest } from '../../../test/helpers/tcp-proxy.js';
import { isKnitError } from '../../errors.js';

const { ACL, Id, Permission, CreateMode, Exception } = zookeeper;
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

/** Runs `node --import tsx ARGS` as an instance owner and returns how to SIGKILL it. */
async function spawnOwner(args: string[], env: NodeJS.ProcessEnv = {}): Promise<() => Promise<void>> {
  const p = spawn(process.execPath, ['--import', 'tsx', ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, ...env } });
  let out = '';
  p.stdout.on('data', (d: Buffer) => (out += d.toString()));
  await until('owner registered', () => out.includes('registered'), 20_000);
  return async () => {
    p.kill('SIGKILL');
    await once(p, 'exit');
  };
}

// ---- credentials --------------------------------------------------------

const SERVER = { user: 'knit-server', password: 'server-secret-0123456789' };
const AGENT = { user: 'knit-agent', password: 'agent:secret-9876543210' };
const serverCreds: ZooKeeperCredentials = { role: 'server', ...SERVER, agentId: digestId(AGENT.user, AGENT.password) };
const agentCreds: ZooKeeperCredentials = { role: 'agent', ...AGENT };
const SID = digestId(SERVER.user, SERVER.password);
const AID = digestId(AGENT.user, AGENT.password);

const instance = (service: string, node: string, extra: Partial<Instance> = {}): Instance => ({
  id: `${node}/${service}`,
  service,
  node,
  address: '10.0.0.1',
  port: 21000,
  tags: [],
  meta: {},
  health: 'passing',
  ...extra,
});

/** A registry client closed when the test ends. */
async function open(t: TestContext, root: string, extra: Partial<ZooKeeperOptions> = {}): Promise<ZooKeeperRegistry> {
  const r = await ZooKeeperRegistry.connect({ servers: (await server()).connect, root, sessionTimeoutMs: 5000, log: silentLogger(), ...extra });
  t.after(() => r.close());
  return r;
}

/** A plain node-zookeeper-client session, with a digest credential or anonymous; closed when the test ends. */
async function raw(t: TestContext, auth?: { user: string; password: string }): Promise<Client> {
  const c = zookeeper.createClient((await server()).connect, { sessionTimeout: 5000 });
  if (auth) c.addAuthInfo('digest', Buffer.from(`${auth.user}:${auth.password}`));
  const connected = once(c, 'connected');
  c.connect();
  await connected;
  t.after(() => c.close());
  return c;
}

/** Resolves 'ok' or the name of the ZooKeeper error code (NO_AUTH, NOT_EMPTY, ...). */
function outcome(fn: (cb: (err: unknown) => void) => void): Promise<string> {
  return new Promise((resolve) =>
    fn((err) => {
      if (!err) return resolve('ok');
      resolve(err instanceof Exception ? err.getName() : `not a ZooKeeper error: ${(err as Error).message}`);
    }),
  );
}

/** An ACL as zkCli prints it, sorted: `digest:user:hash:cdrwa`, `world:anyone:r`. */
async function aclOf(c: Client, path: string): Promise<string[]> {
  const acls = await new Promise<ZkAcl[]>((resolve, reject) => c.getACL(path, (err, a) => (err ? reject(new Error(`getACL ${path}: ${(err as InstanceType<typeof Exception>).getName()}`)) : resolve(a))));
  const letters = (p: number): string => [['c', Permission.CREATE], ['d', Permission.DELETE], ['r', Permission.READ], ['w', Permission.WRITE], ['a', Permission.ADMIN]].filter(([, bit]) => p & (bit as number)).map(([l]) => l).join('');
  // The library's ACL objects carry `permission`, not the `perms` of its type declarations.
  return acls.map((a) => `${a.id.scheme}:${a.id.id}:${letters((a as unknown as { permission: number }).permission)}`).sort();
}

const OPEN: ZkAcl[] = [new ACL(Permission.ALL, new Id('world', 'anyone'))];
/** The ACLs the module doc promises, as aclOf prints them. */
const EXPECTED = {
  root: [`digest:${SID}:cdrwa`, 'world:anyone:r'],
  privateKey: [`digest:${SID}:cdrwa`],
  services: [`digest:${AID}:cr`, `digest:${SID}:cdrwa`, 'world:anyone:r'],
  serviceDir: [`digest:${AID}:cdr`, `digest:${SID}:cdrwa`, 'world:anyone:r'],
  instance: [`digest:${AID}:cdrwa`, `digest:${SID}:cdrwa`, 'world:anyone:r'],
  serverId: [`digest:${AID}:r`, `digest:${SID}:cdrwa`],
};

let rootSeq = 0;
const newRoot = (what: string): string => `/${what}-${process.pid}-${++rootSeq}`;

/** Every KNIT_ERR_REGISTRY_DENIED check: the code, not retryable, and a message matching `re`. */
const denied = (re: RegExp) => (e: unknown): boolean => {
  assert.ok(isKnitError(e, 'KNIT_ERR_REGISTRY_DENIED'), String(e));
  assert.equal(e.retryable, false);
  assert.match(e.message, re);
  return true;
};

/** A client connected through its own TCP proxy, which the contract's fault tests cut and heal. */
async function partitionedClient(z: ZkCluster, proxies: TcpProxy[], connect: (servers: string) => Promise<Registry>): Promise<Partitioned> {
  const m = z.members[0]!;
  const proxy = await TcpProxy.start({ host: m.host, port: m.clientPort });
  proxies.push(proxy);
  return { client: await connect(proxy.address), cut: () => proxy.cut(), heal: () => proxy.heal() };
}

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
    const proxies: TcpProxy[] = [];
    return {
      client: open,
      livenessTimeoutMs: SESSION_MS * 3 + 1000,
      spawnOwner: (instance: Instance) => spawnOwner([join(ROOT, 'test/helpers/zk-owner.ts'), z.connect, root, String(SESSION_MS), JSON.stringify(instance)]),
      partitioned: () => partitionedClient(z, proxies, (servers) => ZooKeeperRegistry.connect({ servers, root, sessionTimeoutMs: SESSION_MS, log: silentLogger() })),
      async reopen() {
        for (const r of opened.splice(0)) await r.close();
      },
      async cleanup() {
        for (const r of opened) await r.close();
        for (const p of proxies) await p.close();
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

// The whole contract again on a protected tree, every client holding the server credential
// and the crashing owner the agent credential, as in production.
registryContract(
  'zookeeper, protected tree',
  async () => {
    const z = await server();
    const root = newRoot('contract-acl');
    const opened: Registry[] = [];
    const openOne = async (): Promise<Registry> => {
      const r = await ZooKeeperRegistry.connect({ servers: z.connect, root, sessionTimeoutMs: SESSION_MS, log: silentLogger(), credentials: serverCreds });
      opened.push(r);
      return r;
    };
    // Protect the tree before any agent-credential owner connects.
    await openOne();
    const owner = `
      import { ZooKeeperRegistry } from ${JSON.stringify(join(ROOT, 'src/registry/zookeeper/zookeeper.ts'))};
      import { silentLogger } from ${JSON.stringify(join(ROOT, 'src/log/logger.ts'))};
      const e = process.env;
      const r = await ZooKeeperRegistry.connect({ servers: e.ZK, root: e.ZK_ROOT, sessionTimeoutMs: ${SESSION_MS}, log: silentLogger(), credentials: JSON.parse(e.ZK_CREDS) });
      await r.register(JSON.parse(e.INSTANCE));
      process.stdout.write('registered\\n');
      setInterval(() => undefined, 1 << 30);`;
    const proxies: TcpProxy[] = [];
    return {
      client: openOne,
      livenessTimeoutMs: SESSION_MS * 3 + 1000,
      partitioned: () => partitionedClient(z, proxies, (servers) => ZooKeeperRegistry.connect({ servers, root, sessionTimeoutMs: SESSION_MS, log: silentLogger(), credentials: agentCreds })),
      spawnOwner: (i: Instance) => spawnOwner(['--input-type=module', '-e', owner], { ZK: z.connect, ZK_ROOT: root, ZK_CREDS: JSON.stringify(agentCreds), INSTANCE: JSON.stringify(i) }),
      async reopen() {
        for (const r of opened.splice(0)) await r.close();
      },
      async cleanup() {
        for (const r of opened) await r.close();
        for (const p of proxies) await p.close();
      },
    };
  },
  { skip: missing && `ZooKeeper not available: ${missing}` },
);

test('zookeeper credentials are checked before connecting', async () => {
  const base = { servers: '127.0.0.1:1', root: '/x', sessionTimeoutMs: 1000, connectTimeoutMs: 500, log: silentLogger() };
  await assert.rejects(ZooKeeperRegistry.connect({ ...base, credentials: { role: 'server', ...SERVER, agentId: 'knit-agent:not-a-digest' } }), (e: unknown) => isKnitError(e, 'KNIT_ERR_CONFIG') && /agentId must be a digest id/.test(e.message));
  await assert.rejects(ZooKeeperRegistry.connect({ ...base, credentials: { role: 'agent', user: 'a:b', password: 'p' } }), (e: unknown) => isKnitError(e, 'KNIT_ERR_CONFIG') && /without spaces or ":"/.test(e.message));
  await assert.rejects(ZooKeeperRegistry.connect({ ...base, credentials: { role: 'agent', user: 'a', password: '' } }), (e: unknown) => isKnitError(e, 'KNIT_ERR_CONFIG') && /password is empty/.test(e.message));
  assert.match(digestId('u', 'p'), /^u:[A-Za-z0-9+/]{27}=$/);
});

test('protected tree: an anonymous client reads instances and ordinary keys, and every write at every depth is refused', { skip: missing }, async (t) => {
  const root = newRoot('anon');
  const srv = await open(t, root, { credentials: serverCreds });
  await srv.kvSet('intentions', '{"default":"deny"}');
  await srv.kvSet('tokens/t1', 'secret');
  await srv.kvSet('nodes/n1', 'node state');
  const agent = await open(t, root, { credentials: agentCreds });
  await agent.register(instance('web', 'n1'));
  const inst = `${root}/services/web/${encodeURIComponent('n1/web')}`;
  const anon = await raw(t);

  const paths = [root, `${root}/kv`, `${root}/kv/intentions`, `${root}/kv/tokens%2Ft1`, `${root}/kv/nodes%2Fn1`, `${root}/services`, `${root}/services/web`, inst, `${root}/server-id`];
  for (const p of paths) {
    assert.equal(await outcome((cb) => anon.create(`${p}/intruder`, Buffer.from('x'), cb)), 'NO_AUTH', `create under ${p}`);
    assert.equal(await outcome((cb) => anon.create(`${p}/intruder`, Buffer.from('x'), OPEN, CreateMode.EPHEMERAL, cb)), 'NO_AUTH', `create ephemeral under ${p}`);
    assert.equal(await outcome((cb) => anon.setData(p, Buffer.from('x'), -1, cb)), 'NO_AUTH', `setData ${p}`);
    assert.equal(await outcome((cb) => anon.setACL(p, OPEN, -1, cb)), 'NO_AUTH', `setACL ${p}`);
    // Deleting needs DELETE on the parent. The root's parent is `/`, which is not knit's and
    // stays open, but the root always has children it cannot delete, so ZooKeeper says NOT_EMPTY.
    assert.equal(await outcome((cb) => anon.remove(p, -1, cb)), p === root ? 'NOT_EMPTY' : 'NO_AUTH', `remove ${p}`);
  }
  // Reads: everything but the private keys and the server's id.
  for (const p of [`${root}/kv/intentions`, inst, `${root}/services`]) assert.equal(await outcome((cb) => anon.getData(p, cb)), 'ok', `read ${p}`);
  for (const p of [`${root}/kv/tokens%2Ft1`, `${root}/kv/nodes%2Fn1`, `${root}/server-id`]) assert.equal(await outcome((cb) => anon.getData(p, cb)), 'NO_AUTH', `read ${p}`);
  // ZooKeeper shows digest ids only to clients with ADMIN: the reason agents read server-id instead.
  assert.deepEqual(await aclOf(anon, `${root}/services`), ['digest:knit-agent:x:cr', 'digest:knit-server:x:cdrwa', 'world:anyone:r']);

  // The same through the Registry API: connecting writes nothing, reads work, writes say what they need.
  const reg = await open(t, root);
  assert.deepEqual((await reg.instances('web')).map((i) => i.id), ['n1/web']);
  assert.deepEqual(await reg.listServices(), [{ name: 'web', instances: 1, routable: 1 }]);
  assert.equal((await reg.kvGet('intentions'))?.value, '{"default":"deny"}');
  await assert.rejects(reg.kvGet('tokens/t1'), denied(/ZooKeeper denied read .*\/kv\/tokens%2Ft1: it needs knit's server credential; this client has no credential/));
  await assert.rejects(reg.kvGet('nodes/n1'), denied(/kv\/nodes%2Fn1/));
  await assert.rejects(reg.kvSet('intentions', 'x'), denied(/ZooKeeper denied write .*\/kv\/intentions: it needs knit's server credential; this client has no credential \(auth=file:/));
  await assert.rejects(reg.kvSet('new-key', 'x'), denied(/ZooKeeper denied create .*\/kv\/new-key/));
  await assert.rejects(reg.kvDelete('intentions'), denied(/ZooKeeper denied remove .*\/kv\/intentions/));
  await assert.rejects(reg.register(instance('web', 'n2')), denied(/ZooKeeper denied create .*\/services\/web\/n2%2Fweb: it needs knit's agent or server credential/));
  await assert.rejects(reg.register(instance('newsvc', 'n2')), denied(/ZooKeeper denied create .*\/services\/newsvc: it needs knit's agent or server credential/));
  await assert.rejects(reg.evict('web', 'n1/web'), denied(/ZooKeeper denied remove .*\/services\/web\/n1%2Fweb: it needs knit's server credential/));
  const errors = new Recorder<Error>();
  const w = reg.watchKey('tokens/t1', () => assert.fail('no value for an anonymous watcher'), errors.push);
  await errors.next('watch told it is denied', (e) => isKnitError(e, 'KNIT_ERR_REGISTRY_DENIED'));
  w.close();
  assert.deepEqual((await agent.instances('web')).map((i) => i.id), ['n1/web'], 'nothing was removed');
});

test('protected tree: an agent registers and deregisters, creates service dirs, and cannot write KV, evict or remove dirs', { skip: missing }, async (t) => {
  const root = newRoot('agent');
  const srv = await open(t, root, { credentials: serverCreds });
  await srv.kvSet('intentions', 'v1');
  await srv.kvSet('tokens/t1', 'secret');
  const admin = await raw(t, SERVER);
  const agent = await open(t, root, { credentials: agentCreds });
  const other = await open(t, root, { credentials: agentCreds });

  await agent.register(instance('api', 'n1'));
  await other.register(instance('api', 'n2'));
  const inst = `${root}/services/api/${encodeURIComponent('n1/api')}`;
  assert.deepEqual(await aclOf(admin, `${root}/services/api`), EXPECTED.serviceDir);
  assert.deepEqual(await aclOf(admin, inst), EXPECTED.instance);
  await agent.setHealth('n1/api', 'warning');
  assert.equal((await srv.instances('api')).find((i) => i.id === 'n1/api')?.health, 'warning');
  assert.equal((await agent.kvGet('intentions'))?.value, 'v1');

  await assert.rejects(agent.kvSet('intentions', 'v2'), denied(/ZooKeeper denied write .*\/kv\/intentions: it needs knit's server credential; this client has the agent credential "knit-agent"/));
  await assert.rejects(agent.kvSet('fresh', 'v'), denied(/ZooKeeper denied create .*\/kv\/fresh/));
  await assert.rejects(agent.kvDelete('intentions'), denied(/ZooKeeper denied remove .*\/kv\/intentions/));
  await assert.rejects(agent.kvGet('tokens/t1'), denied(/ZooKeeper denied read .*\/kv\/tokens%2Ft1: it needs knit's server credential; this client has the agent credential/));
  await assert.rejects(agent.evict('api', 'n2/api'), denied(/evicting .*\/services\/api\/n2%2Fapi needs knit's server credential; this client has the agent credential "knit-agent"/));
  assert.equal((await srv.kvGet('intentions'))?.value, 'v1');

  await agent.deregister('n1/api');
  await other.deregister('n2/api');
  assert.deepEqual(await srv.instances('api'), []);
  // The empty service dir: only the server may remove it, and nobody but the server may change its ACL.
  const agentRaw = await raw(t, AGENT);
  assert.equal(await outcome((cb) => agentRaw.remove(`${root}/services/api`, -1, cb)), 'NO_AUTH');
  assert.equal(await outcome((cb) => agentRaw.setACL(`${root}/services/api`, OPEN, -1, cb)), 'NO_AUTH');
  assert.equal(await outcome((cb) => agentRaw.setACL(`${root}/services`, OPEN, -1, cb)), 'NO_AUTH');
  assert.equal(await outcome((cb) => agentRaw.create(`${root}/kv/x`, cb)), 'NO_AUTH');
  assert.equal(await outcome((cb) => agentRaw.create(`${root}/evil`, cb)), 'NO_AUTH');
  assert.equal(await outcome((cb) => admin.remove(`${root}/services/api`, -1, cb)), 'ok');

  // An agent whose credential the server does not grant is told at once; so is one that arrives before the server.
  await assert.rejects(open(t, root, { credentials: { role: 'agent', user: AGENT.user, password: 'wrong' } }), denied(/denied reading .*\/server-id to the agent credential "knit-agent": knit server grants agents another credential/));
  await assert.rejects(open(t, newRoot('unprotected'), { credentials: agentCreds }), (e: unknown) => isKnitError(e, 'KNIT_ERR_REGISTRY_UNAVAILABLE') && e.retryable && /is not protected yet .*start knit server with auth= and agent_auth=/.test(e.message));
});

test('protected tree: the server can do everything, including evicting an agent\'s instance', { skip: missing }, async (t) => {
  const root = newRoot('server');
  const srv = await open(t, root, { credentials: serverCreds });
  const agent = await open(t, root, { credentials: agentCreds });
  const watcher = await open(t, root);
  const admin = await raw(t, SERVER);

  const v = await srv.kvSet('intentions', 'a', 0);
  await srv.kvSet('intentions', 'b', v);
  await srv.kvSet('tokens/t1', 'secret', 0);
  assert.equal((await srv.kvGet('tokens/t1'))?.value, 'secret');
  assert.deepEqual(await aclOf(admin, `${root}/kv/tokens%2Ft1`), EXPECTED.privateKey);
  assert.deepEqual(await aclOf(admin, `${root}/kv/intentions`), EXPECTED.root);
  await srv.kvDelete('tokens/t1');
  await srv.register(instance('api', 'server'));
  await srv.setHealth('server/api', 'warning');

  await agent.register(instance('api', 'n1'));
  const snaps = new Recorder<Instance[]>();
  const w = watcher.watchService('api', snaps.push);
  await snaps.next('both', (l) => l.length === 2);
  await srv.evict('api', 'n1/api');
  const left = await snaps.next('the agent\'s instance evicted', (l) => l.length === 1);
  assert.equal(left[0]!.id, 'server/api');
  await srv.evict('api', 'n1/api');
  await srv.evict('api', 'server/api');
  await snaps.next('its own evicted too', (l) => l.length === 0);
  w.close();
  await srv.deregister('server/api');
  assert.equal(await outcome((cb) => admin.remove(`${root}/services/api`, -1, cb)), 'ok');

  // Another server credential cannot take a protected tree over.
  await assert.rejects(
    open(t, root, { credentials: { ...serverCreds, password: 'not-the-one' } }),
    denied(/ZooKeeper denied set the ACL of \/server-\d+-\d+: it needs knit's server credential; this client's server credential "knit-server" is not the one the tree grants/),
  );
});

test('protected tree: an open tree from an earlier knit is protected by the first server-credential client', { skip: missing }, async (t) => {
  const root = newRoot('migrate');
  // Today's knit: everything world:anyone ALL.
  const legacy = await open(t, root);
  await legacy.register(instance('legacy', 'n1'));
  await legacy.kvSet('intentions', 'v1');
  await legacy.kvSet('tokens/t1', 'secret');
  await legacy.kvSet('nodes/n1', 'state');
  const anon = await raw(t);
  const inst = `${root}/services/legacy/${encodeURIComponent('n1/legacy')}`;
  for (const p of [root, `${root}/kv/tokens%2Ft1`, inst]) assert.deepEqual(await aclOf(anon, p), ['world:anyone:cdrwa'], `open before: ${p}`);

  const lines = new Recorder<{ msg: string }>();
  const log = pino({ level: 'debug' }, { write: (l: string) => lines.push(JSON.parse(l) as { msg: string }) });
  await open(t, root, { credentials: serverCreds, log });
  // root, kv, services, three keys, the service dir and the instance; server-id is new, made protected.
  await lines.next('migration logged', (l) => /set knit's ACLs on 8 znode\(s\)/.test(l.msg));

  const admin = await raw(t, SERVER);
  assert.deepEqual(await aclOf(admin, root), EXPECTED.root);
  assert.deepEqual(await aclOf(admin, `${root}/kv`), EXPECTED.root);
  assert.deepEqual(await aclOf(admin, `${root}/kv/intentions`), EXPECTED.root);
  assert.deepEqual(await aclOf(admin, `${root}/kv/tokens%2Ft1`), EXPECTED.privateKey);
  assert.deepEqual(await aclOf(admin, `${root}/kv/nodes%2Fn1`), EXPECTED.privateKey);
  assert.deepEqual(await aclOf(admin, `${root}/services`), EXPECTED.services);
  assert.deepEqual(await aclOf(admin, `${root}/services/legacy`), EXPECTED.serviceDir);
  assert.deepEqual(await aclOf(admin, inst), EXPECTED.instance, 'an open instance znode is closed too');
  assert.deepEqual(await aclOf(admin, `${root}/server-id`), EXPECTED.serverId);

  // Protected now: the legacy anonymous client reads, and its writes are refused.
  assert.equal(await outcome((cb) => anon.setData(inst, Buffer.from('{}'), -1, cb)), 'NO_AUTH');
  assert.equal(await outcome((cb) => anon.create(`${root}/services/legacy/x`, cb)), 'NO_AUTH');
  assert.equal(await outcome((cb) => anon.getData(`${root}/kv/tokens%2Ft1`, cb)), 'NO_AUTH');
  assert.equal((await legacy.kvGet('intentions'))?.value, 'v1');
  await assert.rejects(legacy.kvSet('intentions', 'v2'), denied(/kv\/intentions: it needs knit's server credential/));
  await assert.rejects(legacy.setHealth('n1/legacy', 'critical'), denied(/update .*n1%2Flegacy: it needs knit's agent or server credential/));

  // Agents can join the migrated tree, and a second server connect changes nothing.
  const agent = await open(t, root, { credentials: agentCreds });
  await agent.register(instance('legacy', 'n2'));
  assert.deepEqual((await legacy.instances('legacy')).map((i) => i.id), ['n1/legacy', 'n2/legacy']);
  const again = new Recorder<{ msg: string }>();
  await open(t, root, { credentials: serverCreds, log: pino({ level: 'debug' }, { write: (l: string) => again.push(JSON.parse(l) as { msg: string }) }) });
  assert.deepEqual(again.values.filter((l) => /set the ACL|set knit's ACLs/.test(l.msg)), []);
});

test('protected tree: after a ZooKeeper restart and a lost session, agents authenticate again and re-register', { skip: missing }, async (t) => {
  const z = await server();
  const root = newRoot('expiry');
  await open(t, root, { credentials: serverCreds, sessionTimeoutMs: 10_000 });
  const admin = await raw(t, SERVER);
  // A keeps its session across the restart (the library re-sends the credential on reconnection);
  // B's short session is lost while ZooKeeper is down, so it builds a new client (recover()).
  const aLog = new Recorder<{ msg: string }>();
  // A's session outlasts the outage with room to spare on a loaded machine (ZooKeeper is down
  // until B notices, then takes seconds to start again: 20 s was once not enough while the
  // whole suite ran); a write waits up to the session timeout, so the wait below allows more than two.
  const a = await open(t, root, { credentials: agentCreds, sessionTimeoutMs: 40_000, log: pino({ level: 'debug' }, { write: (l: string) => aLog.push(JSON.parse(l) as { msg: string }) }) });
  const bLog = new Recorder<{ msg: string }>();
  const b = await open(t, root, { credentials: agentCreds, sessionTimeoutMs: 1000, connectTimeoutMs: 2000, log: pino({ level: 'debug' }, { write: (l: string) => bLog.push(JSON.parse(l) as { msg: string }) }) });
  const watcher = await open(t, root, { sessionTimeoutMs: 10_000 });
  await a.register(instance('svc', 'a'));
  await b.register(instance('svc', 'b'));
  const bPath = `${root}/services/svc/${encodeURIComponent('b/svc')}`;
  const ownerOf = async (): Promise<string | undefined> =>
    new Promise((resolve) => admin.exists(bPath, (err, st) => resolve(err || !st ? undefined : st.ephemeralOwner.toString('hex'))));
  const before = await ownerOf();
  assert.ok(before);
  const snaps = new Recorder<Instance[]>();
  watcher.watchService('svc', snaps.push);
  await snaps.next('both', (l) => l.length === 2);

  const m = z.members[0]!;
  await m.stop('SIGKILL');
  await bLog.next('B gives its session up', (l) => /session expired or lost; re-registering 1 instance/.test(l.msg), 20_000);
  await m.start();

  // A: the same session, authenticated again by the library (an unauthenticated write would be DENIED).
  await until('A writes again in its old session', async () => {
    await a.setHealth('a/svc', 'warning');
    return true;
  }, 100_000, 200);
  const stalls = aLog.values.filter((l) => /did not answer the session handshake/.test(l.msg)).length;
  if (stalls) t.diagnostic(`A gave up ${stalls} connection(s) the restarting ZooKeeper accepted and left unanswered`);
  assert.ok(!aLog.values.some((l) => /session expired or lost/.test(l.msg)), 'A kept its session');
  // B: a new session whose client authenticated too, or re-registration would have been refused.
  await until('B re-registered from a new session', async () => {
    const now = await ownerOf();
    return now !== undefined && now !== before;
  }, 30_000, 100);
  assert.deepEqual(await aclOf(admin, bPath), EXPECTED.instance);
  await b.setHealth('b/svc', 'warning');
  await snaps.next('both back, both warning', (l) => l.length === 2 && l.every((i) => i.health === 'warning'), 30_000);
  assert.ok(!bLog.values.some((l) => /denied/i.test(l.msg)), 're-registration was not refused');
});

// ---- faults: lost connections and sessions, forced with a TCP proxy in front of ZooKeeper ----

/** A proxy in front of the test ZooKeeper, closed when the test ends. */
async function proxyFor(t: TestContext): Promise<TcpProxy> {
  const m = (await server()).members[0]!;
  const proxy = await TcpProxy.start({ host: m.host, port: m.clientPort });
  t.after(() => proxy.close());
  return proxy;
}

/** A logger whose lines a test can wait for. */
function recordingLog(): { log: ZooKeeperOptions['log']; lines: Recorder<{ msg: string; err?: string }> } {
  const lines = new Recorder<{ msg: string; err?: string }>();
  return { lines, log: pino({ level: 'debug' }, { write: (l: string) => lines.push(JSON.parse(l) as { msg: string }) }) };
}

test('a server that accepts the connection and never answers the handshake holds the client for the handshake timeout, not a session: it comes back in the same session', { skip: missing }, async (t) => {
  const proxy = await proxyFor(t);
  const root = newRoot('stall');
  const { log, lines } = recordingLog();
  // A long session: without the handshake watch the client would wait 1.5 of them (45 s) and start another.
  const a = await open(t, root, { servers: proxy.address, sessionTimeoutMs: 30_000, handshakeTimeoutMs: 1000, log });
  const admin = await raw(t);
  await a.register(instance('svc', 'a'));
  const path = `${root}/services/svc/${encodeURIComponent('a/svc')}`;
  const owner = (): Promise<string | undefined> =>
    new Promise((resolve) => admin.exists(path, (err, st) => resolve(err || !st ? undefined : st.ephemeralOwner.toString('hex'))));
  const before = await owner();
  assert.ok(before);

  // The next two connections are accepted and left silent, as ZooKeeper 3.8 leaves one that arrives while it starts.
  proxy.stall(2);
  proxy.cut();
  proxy.heal();
  await lines.next('disconnected', (l) => /disconnected from ZooKeeper/.test(l.msg));
  const cutAt = Date.now();
  await lines.next('the first silent connection given up', (l) => /accepted the connection but did not answer the session handshake within 1000 ms/.test(l.msg), 10_000);
  await lines.next('reconnected', (l) => /reconnected to ZooKeeper/.test(l.msg), 15_000);
  const took = Date.now() - cutAt;
  t.diagnostic(`back ${took} ms after the cut, through two silent connections`);
  assert.equal(lines.values.filter((l) => /did not answer the session handshake/.test(l.msg)).length, 2, 'each silent connection given up once');
  await until('the silent connections closed', () => proxy.stalled.size === 0, 5000);
  assert.ok(!lines.values.some((l) => /session expired or lost/.test(l.msg)), 'the session was kept');
  assert.equal(await owner(), before, 'the instance is still the same session\'s');
  await a.setHealth('a/svc', 'warning');
  assert.equal((await a.instances('svc'))[0]?.health, 'warning');
});

/** True for the client packet that reads `path` with `op` and sets a watch. */
const watchingRead = (op: number, path: string) => (packet: Buffer, index: number): boolean => {
  const r = zkRequest(packet, index);
  return r?.type === op && r.path === path && r.watch === true;
};

for (const v of [
  { what: 'the instance list', op: ZK_OP.getChildren2, path: (root: string) => `${root}/services/svc` },
  { what: 'an instance', op: ZK_OP.getData, path: (root: string) => `${root}/services/svc/${encodeURIComponent('a/svc')}` },
]) {
  test(`regression: a watch whose re-arming read of ${v.what} is lost with the connection, more often than the library retries it, still delivers later changes`, { skip: missing }, async (t) => {
    const proxy = await proxyFor(t);
    const root = newRoot('deaf');
    const a = await open(t, root, { sessionTimeoutMs: 10_000 });
    // A long session: the fault is lost connections, never an expiry (a new session re-arms everything anyway).
    const b = await open(t, root, { servers: proxy.address, sessionTimeoutMs: 10_000 });
    await a.register(instance('svc', 'a'));
    const snaps = new Recorder<Instance[]>();
    const errors = new Recorder<Error>();
    b.watchService('svc', snaps.push, errors.push);
    await snaps.next('first snapshot', (l) => l.length === 1);

    // The read that re-arms the watch after the next change is lost, and so is the library's one retry of it.
    const cut = proxy.cutOn(watchingRead(v.op, v.path(root)), 2);
    if (v.op === ZK_OP.getChildren2) await a.register(instance('svc', 'b'));
    else await a.setHealth('a/svc', 'warning');
    await until('the re-arming read lost twice', () => cut.hits === 2, 20_000);
    await errors.next('the failed read reported', (e) => isKnitError(e, 'KNIT_ERR_REGISTRY_UNAVAILABLE'));
    await snaps.next('the change, once the connection is back', (l) => (v.op === ZK_OP.getChildren2 ? l.length === 2 : l[0]?.health === 'warning'), 20_000);

    // Before the fix the watch was marked armed although ZooKeeper had never set it: deaf from
    // here on. Two changes, each awaited: a re-read still pending from the reconnection can
    // catch one of them by chance, not both.
    let from = snaps.values.length;
    if (v.op === ZK_OP.getChildren2) await a.register(instance('svc', 'c'));
    else await a.setHealth('a/svc', 'critical');
    await snaps.next('a later change', (l) => (v.op === ZK_OP.getChildren2 ? l.length === 3 : l.length === 0), 10_000, from);
    from = snaps.values.length;
    if (v.op === ZK_OP.getChildren2) await a.deregister('b/svc');
    else await a.setHealth('a/svc', 'passing');
    await snaps.next('and another', (l) => (v.op === ZK_OP.getChildren2 ? l.length === 2 : l[0]?.health === 'passing'), 10_000, from);
  });
}

test('regression: re-registration after a session expiry is retried until it succeeds, then onResync is told', { skip: missing }, async (t) => {
  const proxy = await proxyFor(t);
  const root = newRoot('reregister');
  const { log, lines } = recordingLog();
  const a = await open(t, root, { servers: proxy.address, sessionTimeoutMs: 1000, log });
  const watcher = await open(t, root, { sessionTimeoutMs: 10_000 });
  const resyncs = new Recorder<Instance[]>();
  a.onResync(() => void watcher.instances('svc').then(resyncs.push));
  await a.register(instance('svc', 'a'));
  await a.setHealth('a/svc', 'warning');
  const snaps = new Recorder<Instance[]>();
  watcher.watchService('svc', snaps.push);
  await snaps.next('registered', (l) => l.length === 1 && l[0]!.health === 'warning');

  proxy.cut();
  await snaps.next('its session expired', (l) => l.length === 0, 15_000);
  // Once back, its re-registrations are lost with their connection, more often than one call retries.
  const path = `${root}/services/svc/${encodeURIComponent('a/svc')}`;
  const cut = proxy.cutOn((p, i) => zkRequest(p, i)?.type === ZK_OP.create && zkRequest(p, i)?.path === path, 4);
  const from = snaps.values.length;
  proxy.heal();
  // Before the fix: "re-registration failed" once, and the instance was gone for good.
  await snaps.next('registered again, with its latest health', (l) => l.length === 1 && l[0]!.health === 'warning', 30_000, from);
  assert.equal(cut.hits, 4);
  assert.ok(lines.values.some((l) => /not written to ZooKeeper yet, retrying/.test(l.msg)), 'the failed attempts were logged');
  const seen = await resyncs.next('onResync after the instance was back', () => true, 10_000);
  assert.deepEqual(seen.map((i) => [i.id, i.health]), [['a/svc', 'warning']]);
  // The new session is a working one.
  await a.setHealth('a/svc', 'passing');
  await snaps.next('a write in the new session', (l) => l[0]?.health === 'passing', 5000, from);
});

test('regression: close() while a lost session is being re-established leaves no session behind and does not crash when ZooKeeper is back', { skip: missing }, async (t) => {
  const proxy = await proxyFor(t);
  const root = newRoot('close-recovering');
  const { log, lines } = recordingLog();
  const a = await open(t, root, { servers: proxy.address, sessionTimeoutMs: 1000, log });
  await a.register(instance('svc', 'a'));
  proxy.cut();
  await lines.next('recovery started', (l) => /session expired or lost/.test(l.msg), 15_000);
  // It is trying to open a new session through the cut link; close it meanwhile, then heal the link.
  await a.close();
  const forwarded = proxy.forwarded;
  proxy.heal();
  // Before the fix the recovery's client connected as soon as the link was back and kept a session
  // (or, closed while connecting, threw an uncaught "Unknown code" from inside the library). That
  // something does NOT happen can only be shown over a window: the library retries every
  // 200 ms (spinDelay), so 2 s is ten chances. (A TCP connection already under way may still
  // open; it is dropped before it says anything, so no session can start.)
  await assert.rejects(until('a closed client talking to ZooKeeper again', () => proxy.forwarded > forwarded, 2000, 20), /timed out/);
  await until('no connection left open', () => proxy.open === 0);
  const watcher = await open(t, root);
  assert.deepEqual(await watcher.instances('svc'), []);
});

test('regression: a client closed while it connects for the first time does not crash when the server answers later', { skip: missing }, async (t) => {
  const proxy = await proxyFor(t);
  proxy.cut();
  const connecting = ZooKeeperRegistry.connect({ servers: proxy.address, root: newRoot('first'), sessionTimeoutMs: 1000, connectTimeoutMs: 600, log: silentLogger() });
  await assert.rejects(connecting, (e: unknown) => isKnitError(e, 'KNIT_ERR_REGISTRY_UNAVAILABLE') && /within 600 ms/.test(e.message));
  const forwarded = proxy.forwarded;
  proxy.heal();
  // As above: a window long enough for ten reconnection attempts.
  await assert.rejects(until('the abandoned client talking to ZooKeeper again', () => proxy.forwarded > forwarded, 2000, 20), /timed out/);
  await until('no connection left open', () => proxy.open === 0);
});

test('regression: an instance deregistered while the new session re-registers it does not come back', { skip: missing }, async (t) => {
  const proxy = await proxyFor(t);
  const root = newRoot('dereg-recovering');
  const a = await open(t, root, { servers: proxy.address, sessionTimeoutMs: 1000 });
  const watcher = await open(t, root, { sessionTimeoutMs: 10_000 });
  await a.register(instance('svc', 'x'));
  const snaps = new Recorder<Instance[]>();
  watcher.watchService('svc', snaps.push);
  await snaps.next('registered', (l) => l.length === 1);
  proxy.cut();
  await snaps.next('its session expired', (l) => l.length === 0, 15_000);
  // The moment the new session starts re-registering x (it first checks the service directory),
  // x is deregistered. Before the fix the deregistration looked for x before it was created,
  // found nothing and returned; the re-registration then created x, which nobody owned any more
  // and which lived as long as the session.
  let deregistered: Promise<void> | undefined;
  const untap = proxy.tap((p, i) => {
    const r = zkRequest(p, i);
    if (!deregistered && r?.type === ZK_OP.exists && r.path === `${root}/services/svc`) {
      untap();
      deregistered = a.deregister('x/svc');
    }
  });
  proxy.heal();
  await until('deregistered during the re-registration', () => deregistered !== undefined, 15_000);
  await deregistered;
  // A barrier: an instance registered after the deregistration resolved; once the watcher sees it, it
  // has seen everything before it.
  await a.register(instance('svc', 'y'));
  const seen = await snaps.next('y registered', (l) => l.some((i) => i.id === 'y/svc'), 10_000);
  assert.deepEqual(seen.map((i) => i.id), ['y/svc']);
  assert.deepEqual((await watcher.instances('svc')).map((i) => i.id), ['y/svc']);
});
