/**
 * `npm run fleet`: README's "Running a fleet", tried on one machine. Starts a
 * throwaway ZooKeeper, a `knit server` and two `knit agent`s on loopback
 * (node web-1 runs examples/hello's web, node api-1 runs its api; each
 * enrolled with its own join token from `knit token create`), the two
 * example apps, and applies examples/hello/intentions.yaml. Prints what to
 * try, then `fleet ready`. Ctrl-C (SIGINT) or SIGTERM stops every process
 * and removes every temporary directory.
 *
 * It reuses the helpers the end-to-end tests use (test/helpers): the same
 * ZooKeeper (Debian's package, installed with apt-get when missing and run
 * as root), the same way of running `knit`.
 *
 * The fleet runs in a process group of its own, under a small supervisor
 * (this same script, re-run): Ctrl-C in a terminal signals the whole
 * foreground group, and ZooKeeper and the server dying at the same instant
 * as the agents would leave the agents unable to deregister. So Ctrl-C
 * reaches only the supervisor, which asks the fleet to stop in order
 * (agents, apps, server, ZooKeeper); if the supervisor itself is killed,
 * the fleet sees its stdin close and stops all the same.
 *
 *   npm run fleet                      # web on :8080, api on :9001, server :7700, agents' admin :7701/:7702
 *   npm run fleet -- --any-ports       # free ports everywhere (what the test uses)
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createWriteStream, type WriteStream } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parse as parseYaml } from 'yaml';
import { KNIT, ROOT, freePort, knit } from '../test/helpers/knit.js';
import { ensureZooKeeper, startZooKeeper, type ZkCluster } from '../test/helpers/zookeeper.js';
import { until } from '../test/helpers/wait.js';

const HELLO = join(ROOT, 'examples', 'hello');

/** Set in the fleet process the supervisor starts. */
const INNER = 'KNIT_FLEET_SUPERVISED';

const { values: args } = parseArgs({
  options: {
    'any-ports': { type: 'boolean', default: false },
    'web-port': { type: 'string', default: '8080' },
    'api-port': { type: 'string', default: '9001' },
    'upstream-port': { type: 'string', default: '9191' },
    'server-port': { type: 'string', default: '7700' },
    'admin-ports': { type: 'string', default: '7701,7702' },
  },
});

/** A process of the fleet, its output kept (and written to DIR/<name>.log). */
interface Member {
  name: string;
  child: ChildProcess;
  out: string;
  log: WriteStream;
}

const members: Member[] = [];
let dir: string | undefined;
let zk: ZkCluster | undefined;
let zkStarting: Promise<ZkCluster> | undefined;
let stopping: Promise<void> | undefined;

const exited = (c: ChildProcess): boolean => c.exitCode !== null || c.signalCode !== null;

function run(name: string, argv: string[], env: NodeJS.ProcessEnv = {}): Member {
  const log = createWriteStream(join(dir!, `${name}.log`));
  // Pretty log lines in the files, for `tail -f`, unless the user chose otherwise.
  const child = spawn(process.execPath, argv, { cwd: ROOT, env: { ...process.env, KNIT_LOG_FORMAT: process.env.KNIT_LOG_FORMAT ?? 'pretty', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const m: Member = { name, child, out: '', log };
  const take = (d: Buffer): void => {
    m.out += d.toString();
    log.write(d);
  };
  child.stdout.on('data', take);
  child.stderr.on('data', take);
  members.push(m);
  return m;
}

/** Waits for `text` in a member's output; fails with its last lines if it exits first. */
async function ready(m: Member, text: string, timeoutMs = 90_000): Promise<void> {
  await until(`${m.name}: "${text}"`, () => {
    if (m.out.includes(text)) return true;
    if (exited(m.child)) throw new Error(`${m.name} exited (${m.child.exitCode ?? m.child.signalCode}) before "${text}":\n${m.out.trim().split('\n').slice(-15).join('\n')}`);
    return false;
  }, timeoutMs, 50);
}

/** SIGTERM, then SIGKILL if it is still there after `graceMs`; resolves once it has exited. */
async function stopMember(m: Member, graceMs: number): Promise<void> {
  if (!exited(m.child)) {
    const gone = new Promise((r) => m.child.once('exit', r));
    m.child.kill('SIGTERM');
    const t = setTimeout(() => m.child.kill('SIGKILL'), graceMs);
    await gone;
    clearTimeout(t);
  }
  await new Promise((r) => m.log.end(r));
}

/** Stops everything in reverse order of dependence and removes every temp dir; runs once. */
function teardown(): Promise<void> {
  stopping ??= (async () => {
    const agents = members.filter((m) => m.name.startsWith('agent'));
    const others = members.filter((m) => !agents.includes(m) && m.name !== 'server');
    // Agents first (they deregister and drain), then the apps, the server, ZooKeeper.
    await Promise.all(agents.map((m) => stopMember(m, 10_000)));
    await Promise.all(others.map((m) => stopMember(m, 5000)));
    await Promise.all(members.filter((m) => m.name === 'server').map((m) => stopMember(m, 10_000)));
    const z = zk ?? (await zkStarting?.catch(() => undefined));
    await z?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  })();
  return stopping;
}

/** Stops the fleet (once) and exits. */
function stopAndExit(why: string, code = 0): void {
  if (!stopping) console.log(`\n${why}: stopping the fleet`);
  void teardown().then(() => {
    console.log(`fleet stopped${dir ? `; removed ${dir}` : ''}`);
    process.exit(code);
  });
}

/** True when something on this host already listens on 127.0.0.1:port. */
function inUse(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', (e: NodeJS.ErrnoException) => resolve(e.code === 'EADDRINUSE'));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(false)));
  });
}

function portArg(name: string, v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new Error(`--${name} ${v}: expected a port number`);
  return n;
}

interface Ports {
  web: number;
  api: number;
  upstream: number;
  server: number;
  admin: [number, number];
}

async function choosePorts(): Promise<Ports> {
  if (args['any-ports']) {
    // Distinct free ports: freePort() may hand out the same one twice if asked while none is bound.
    const got = new Set<number>();
    while (got.size < 6) got.add(await freePort());
    const [web, api, upstream, server, a1, a2] = [...got] as [number, number, number, number, number, number];
    return { web, api, upstream, server, admin: [a1, a2] };
  }
  const admin = args['admin-ports'].split(',').map((p) => portArg('admin-ports', p));
  if (admin.length !== 2) throw new Error('--admin-ports: expected two ports, e.g. 7701,7702');
  const ports: Ports = {
    web: portArg('web-port', args['web-port']),
    api: portArg('api-port', args['api-port']),
    upstream: portArg('upstream-port', args['upstream-port']),
    server: portArg('server-port', args['server-port']),
    admin: [admin[0]!, admin[1]!],
  };
  const wanted: Array<[number, string]> = [
    [ports.web, 'the example app web (--web-port)'],
    [ports.api, 'the example app api (--api-port)'],
    [ports.upstream, "web's upstream to api (--upstream-port)"],
    [ports.server, "knit server's API (--server-port)"],
    [ports.admin[0], "agent web-1's admin API (--admin-ports)"],
    [ports.admin[1], "agent api-1's admin API (--admin-ports)"],
    [15008, "agent web-1's HBONE port"],
    [15009, "agent api-1's HBONE port"],
  ];
  for (const [port, what] of wanted) {
    if (await inUse(port)) throw new Error(`port ${port} on 127.0.0.1 is already in use; ${what} wants it. Is npm run hello or another fleet running? Stop it, choose another port, or pass --any-ports`);
  }
  return ports;
}

/** The example's service file for `name`, with this run's ports. */
async function serviceFile(name: 'web' | 'api', p: Ports): Promise<string> {
  const file = name === 'web' ? 'web.json' : 'api.yaml';
  const doc = parseYaml(await readFile(join(HELLO, 'services', file), 'utf8')) as {
    service: { port: number; checks?: Array<{ http?: string }>; connect?: { sidecar_service?: { proxy?: { upstreams?: Array<{ local_bind_port: number }> } } } };
  };
  const s = doc.service;
  s.port = name === 'web' ? p.web : p.api;
  for (const c of s.checks ?? []) if (c.http) c.http = c.http.replace(/:\d+\//, `:${s.port}/`);
  for (const u of s.connect?.sidecar_service?.proxy?.upstreams ?? []) u.local_bind_port = p.upstream;
  return JSON.stringify(doc, null, 2);
}

async function main(): Promise<void> {
  const why = ensureZooKeeper();
  if (why) throw new Error(`cannot start ZooKeeper: ${why}`);
  const p = await choosePorts();
  dir = await mkdtemp(join(tmpdir(), 'knit-fleet-run-'));
  console.log(`knit fleet on this machine; everything lives in ${dir} (removed on Ctrl-C)`);

  zkStarting = startZooKeeper({ size: 1 });
  zk = await zkStarting;
  const registry = `zk://${zk.connect}/knit`;
  console.log(`  ZooKeeper      ${zk.connect}`);

  await mkdir(join(dir, 'server'));
  const serverYaml = join(dir, 'server', 'server.yaml');
  await writeFile(serverYaml, [`name: cp1`, `data_dir: ${join(dir, 'server', 'data')}`, `registry: ${registry}`, `listen: 127.0.0.1:${p.server}`, 'advertise: [127.0.0.1, localhost]', 'default_intention: deny', ''].join('\n'));
  const server = run('server', [KNIT, 'server', '--config', serverYaml]);
  await ready(server, 'knit server ready');
  const serverUrl = `https://127.0.0.1:${p.server}`;
  const cliEnv = { KNIT_SERVER: serverUrl, KNIT_TOKEN_FILE: join(dir, 'server', 'data', 'operator.token'), KNIT_CA_FILE: join(dir, 'server', 'data', 'ca', 'root.pem') };
  console.log(`  knit server    ${serverUrl}  (log: ${join(dir, 'server.log')})`);

  const nodes = [
    { node: 'web-1', service: 'web' as const, admin: p.admin[0], base: 15008 },
    { node: 'api-1', service: 'api' as const, admin: p.admin[1], base: 15009 },
  ];
  const agents: Member[] = [];
  for (const n of nodes) {
    const home = join(dir, n.node);
    await mkdir(join(home, 'services'), { recursive: true });
    const tok = await knit(['token', 'create', '--node', n.node, '--services', n.service, '--ttl', '10m'], cliEnv);
    if (tok.code !== 0) throw new Error(`knit token create --node ${n.node} --services ${n.service}: ${tok.stderr.trim()}`);
    await writeFile(join(home, 'join.token'), tok.stdout);
    await writeFile(join(home, 'services', `${n.service}.json`), await serviceFile(n.service, p));
    await writeFile(join(home, 'agent.yaml'), [
      `node: ${n.node}`,
      `data_dir: ${join(home, 'data')}`,
      `registry: ${registry}`,
      `server: ${serverUrl}`,
      `join_token_file: ${join(home, 'join.token')}`,
      `services_dir: ${join(home, 'services')}`,
      'advertise: 127.0.0.1',
      'bind: 127.0.0.1',
      `admin: 127.0.0.1:${n.admin}`,
      `hbone_port: ${args['any-ports'] ? 0 : n.base}`,
      'drain: 1s',
      '',
    ].join('\n'));
  }
  run('app-api', [join(HELLO, 'api.mjs')], { API_PORT: String(p.api) });
  run('app-web', [join(HELLO, 'web.mjs')], { WEB_PORT: String(p.web), API_UPSTREAM: `http://127.0.0.1:${p.upstream}/` });
  for (const n of nodes) agents.push(run(`agent-${n.node}`, [KNIT, 'agent', '--config', join(dir, n.node, 'agent.yaml')]));
  await Promise.all(agents.map((a) => ready(a, 'knit agent ready')));
  for (const n of nodes) console.log(`  knit agent     ${n.node} runs ${n.service}; admin API http://127.0.0.1:${n.admin}  (log: ${join(dir, `agent-${n.node}.log`)})`);

  const applied = await knit(['intention', 'apply', '-f', join(HELLO, 'intentions.yaml')], cliEnv);
  if (applied.code !== 0) throw new Error(`knit intention apply: ${applied.stderr.trim()}`);
  console.log(`  intentions     ${join(HELLO, 'intentions.yaml')} (default deny, web -> api allowed)`);
  // Ready means ready: web reaches api through both agents.
  await until('web -> api through the mesh', async () => {
    const r = await fetch(`http://127.0.0.1:${p.web}/`).catch(() => undefined);
    return r?.status === 200 && (await r.text()).includes('hello from api');
  }, 60_000, 200);

  const env = Object.entries(cliEnv).map(([k, v]) => `${k}=${v}`).join(' ');
  console.log(`
Try, in another terminal (in ${ROOT}):
  curl http://127.0.0.1:${p.web}/                  # web (agent web-1) -> api (agent api-1) over mTLS
  export ${env}
  node bin/knit.mjs services                        # the registry's view, from the server
  node bin/knit.mjs node list                       # nodes, what each may run, key, expiry
  node bin/knit.mjs intention check web api         # allowed; exit status 0 (1 when denied)
  node bin/knit.mjs intention deny web api          # then curl again: 502
  node bin/knit.mjs intention allow web api
  node bin/knit.mjs --admin 127.0.0.1:${p.admin[0]} check      # agent web-1's diagnostics (no KNIT_SERVER needed)
  tail -f ${dir}/*.log
Ctrl-C stops everything and removes ${dir}.
fleet ready`);
}

/** The supervisor: runs the fleet in its own process group and turns SIGINT/SIGTERM into an orderly stop. */
function supervise(): void {
  const fleet = spawn(process.execPath, [...process.execArgv, fileURLToPath(import.meta.url), ...process.argv.slice(2)], {
    detached: true,
    stdio: ['pipe', 'inherit', 'inherit'],
    env: { ...process.env, [INNER]: '1' },
  });
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => fleet.kill('SIGTERM'));
  fleet.on('exit', (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
}

if (!process.env[INNER]) {
  supervise();
} else {
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => stopAndExit(sig));
  // The supervisor is gone (killed, or its terminal closed): stop too, leaving nothing behind.
  process.stdin.on('end', () => stopAndExit('supervisor gone'));
  process.stdin.resume();
  main().catch(async (e: unknown) => {
    if (stopping) return;
    console.error(`npm run fleet: ${e instanceof Error ? e.message : String(e)}`);
    await teardown();
    process.exit(1);
  });
}
