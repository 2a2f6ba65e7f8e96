/**
 * The paths under test, each started once per run and left up while the
 * rounds alternate between them:
 *   direct       wrk -> app
 *   haproxy      wrk -> haproxy (plain in, mTLS out) -> haproxy (mTLS in) -> app
 *   knit_agents  wrk -> agent A (client's upstream listener) -> agent B -> app,
 *                two `knit agent` processes as on two hosts, enrolled with
 *                join tokens from a `knit server` over a ZooKeeper
 *   knit_dev     wrk -> one `knit dev` process (both ends: the same-host path) -> app
 *   node_h2      (--floor) wrk -> Node HTTP/2 CONNECT client -> mTLS -> Node server -> app:
 *                the HBONE design with none of knit's work (floor.mjs)
 *   node_tcp     (--floor) wrk -> a Node TCP pipe -> app: the same-host path's floor
 * knit runs through its CLI and config files only, from `knitRoot`, so the
 * harness measures whatever `knit agent` does there (one TLS connection per
 * application connection, or HBONE streams over pooled connections).
 */
import { execFile } from 'node:child_process';
import http from 'node:http';
import net from 'node:net';
import { mkdir, writeFile } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { freePort } from '../../test/helpers/knit.js';
import { until } from '../../test/helpers/wait.js';
import { tail, type Processes, type Started } from './procs.js';

const run = promisify(execFile);

export type PathKey = 'direct' | 'haproxy' | 'knit_agents' | 'knit_dev' | 'node_h2' | 'node_tcp';

export interface Path {
  key: PathKey;
  label: string;
  /** Where wrk sends requests (the 64-byte body); `${url}bulk` is the 64 MiB one. */
  url: string;
  /** The proxy processes whose CPU and memory count (none for direct). */
  proxies: Started[];
  /** What the proxies' figures include beyond the data plane. */
  note?: string;
  /** Read during the new-connections run, when the path can say how it set up TLS (HAProxy: session reuse). */
  probe?(): Promise<Record<string, number | string>>;
}

/** Where things run and what runs them. */
export interface Setup {
  procs: Processes;
  /** Temporary directory of the run (removed at the end). */
  dir: string;
  /** CPUs of the app and the proxies under test. */
  serverCpus: string;
  /** CPUs of the control plane (knit server, ZooKeeper): idle during measurements. */
  controlCpus: string;
  /** The knit checkout to run (`bin/knit.mjs` in it). */
  knitRoot: string;
  /** Extra node flags (`--node-flags`, --cpu-prof ...) of the measured knit processes, by name: bench-a, bench-b, knit-dev. */
  knitNodeFlags(name: string): string[];
  log(msg: string): void;
}

const START_TIMEOUT_MS = 60_000;

/** One GET through a path; true on a 200 with the app's 64-byte body. */
export function httpOk(url: string): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get(url, { agent: false, timeout: 2000 }, (res) => {
      let n = 0;
      res.on('data', (d: Buffer) => (n += d.length));
      res.on('end', () => resolve(res.statusCode === 200 && n === 64));
      res.on('error', () => resolve(false));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(false));
  });
}

/** Waits until one request gets through `path`, or fails saying which processes were involved and what they printed. */
async function routable(path: Path, timeoutMs: number): Promise<void> {
  try {
    await until(`a request through ${path.label}`, () => httpOk(path.url), timeoutMs, 100);
  } catch (e) {
    const logs = path.proxies.map((p) => `${p.name}${p.exited() ? ` (exited ${p.child.exitCode ?? p.child.signalCode})` : ''}:\n${tail(p.output())}`).join('\n');
    throw new Error(`${(e as Error).message}\n${logs}`);
  }
}

/** The benchmark's app (bench/backend.mjs), on the server CPUs. */
export async function startApp(s: Setup): Promise<{ port: number; proc: Started }> {
  const port = await freePort();
  const proc = s.procs.start('app', s.serverCpus, process.execPath, [join(import.meta.dirname, '..', 'backend.mjs'), String(port)]);
  await proc.waitFor(/ready/, START_TIMEOUT_MS);
  // The first /bulk request allocates the app's 64 MiB body: do it now, not in the first path's measurement.
  await new Promise<void>((resolve, reject) => {
    http.get(`http://127.0.0.1:${port}/bulk`, { agent: false }, (res) => res.resume().on('end', resolve).on('error', reject)).on('error', reject);
  });
  return { port, proc };
}

export function directPath(appPort: number): Path {
  return { key: 'direct', label: 'direct', url: `http://127.0.0.1:${appPort}/`, proxies: [] };
}

/**
 * An EC P-256 CA and two leaves with SPIFFE URI SANs, made with the openssl
 * CLI: the key type and chain shape of knit's own, without depending on
 * knit's source (which may be mid-rewrite).
 */
async function makeCerts(dir: string): Promise<void> {
  const ossl = (args: string[]): Promise<unknown> => run('openssl', args, { cwd: dir });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-config', '/dev/null'];
  await ossl(['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/O=knit-bench/CN=bench-ca',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  for (const svc of ['client', 'server']) {
    await writeFile(join(dir, `${svc}.ext`), `subjectAltName=URI:spiffe://bench.knit/ns/default/svc/${svc}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n`);
    await ossl(['req', '-new', ...ec, '-keyout', `${svc}.key`, '-out', `${svc}.csr`, '-subj', '/O=knit-bench']);
    const serial = `0x${Date.now().toString(16)}${svc === 'client' ? '1' : '2'}`;
    await ossl(['x509', '-req', '-in', `${svc}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-set_serial', serial, '-days', '2', '-extfile', `${svc}.ext`, '-out', `${svc}.crt`]);
    await run('sh', ['-c', `cat ${svc}.crt ${svc}.key > ${svc}.pem && chmod 600 ${svc}.pem`], { cwd: dir });
  }
}

/** `show info` from an HAProxy stats socket, as name -> value. */
async function haproxyInfo(sock: string): Promise<Map<string, string>> {
  const text = await new Promise<string>((resolve, reject) => {
    const c = net.connect(sock, () => c.end('show info\n'));
    let out = '';
    c.on('data', (d: Buffer) => (out += d.toString()));
    c.on('end', () => resolve(out));
    c.on('error', reject);
  });
  return new Map(text.split('\n').filter((l) => l.includes(': ')).map((l) => [l.slice(0, l.indexOf(': ')), l.slice(l.indexOf(': ') + 2).trim()]));
}

/**
 * Two HAProxy processes, one thread each, tcp mode. TLS session resumption
 * is on as an operator leaves it (written out rather than left implicit):
 * the listener keeps a 20,000-entry session cache for 300 s and issues TLS
 * 1.3 tickets; the connecting side keeps the last session per server and
 * offers it again (`ssl-reuse`). Both sides verify the peer against the CA.
 */
export async function startHaproxy(s: Setup, appPort: number): Promise<Path> {
  const dir = join(s.dir, 'haproxy');
  await mkdir(dir);
  await makeCerts(dir);
  const [outPort, inPort] = [await freePort(), await freePort()];
  const global = (sock: string): string =>
    `global\n  nbthread 1\n  tune.ssl.cachesize 20000\n  tune.ssl.lifetime 300\n  stats socket ${join(dir, sock)} mode 600 level user\n` +
    'defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n';
  await writeFile(join(dir, 'out.cfg'),
    `${global('out.sock')}frontend plain_in\n  bind 127.0.0.1:${outPort}\n  default_backend mtls_out\n` +
    `backend mtls_out\n  server peer 127.0.0.1:${inPort} ssl crt ${dir}/client.pem ca-file ${dir}/ca.pem verify required ssl-reuse\n`);
  await writeFile(join(dir, 'in.cfg'),
    `${global('in.sock')}frontend mtls_in\n  bind 127.0.0.1:${inPort} ssl crt ${dir}/server.pem ca-file ${dir}/ca.pem verify required\n  default_backend app\n` +
    `backend app\n  server app 127.0.0.1:${appPort}\n`);
  const procs = [
    s.procs.start('haproxy (outbound)', s.serverCpus, 'haproxy', ['-db', '-f', join(dir, 'out.cfg')]),
    s.procs.start('haproxy (inbound)', s.serverCpus, 'haproxy', ['-db', '-f', join(dir, 'in.cfg')]),
  ];
  const path: Path = {
    key: 'haproxy', label: 'HAProxy mTLS pair', url: `http://127.0.0.1:${outPort}/`, proxies: procs,
    async probe() {
      // Rates over the last second: read in the middle of the new-connections run.
      const info = await haproxyInfo(join(dir, 'in.sock'));
      return { ssl_session_reuse_pct: Number(info.get('SslFrontendSessionReuse_pct') ?? NaN), ssl_full_handshakes_per_s: Number(info.get('SslFrontendKeyRate') ?? NaN) };
    },
  };
  await routable(path, START_TIMEOUT_MS / 2);
  return path;
}

/**
 * The floor paths (floor.mjs): what Node itself costs to carry the traffic
 * as knit does, without knit. An HTTP/2 CONNECT pair over mutual TLS (two
 * processes, as the two agents) and a TCP pipe (one process, as knit dev).
 */
export async function startFloor(s: Setup, appPort: number): Promise<Path[]> {
  const dir = join(s.dir, 'floor');
  await mkdir(dir);
  await makeCerts(dir);
  const script = join(import.meta.dirname, 'floor.mjs');
  const [tcpPort, serverPort, clientPort] = [await freePort(), await freePort(), await freePort()];
  const tcp = s.procs.start('node floor (tcp)', s.serverCpus, process.execPath, [script, 'tcp', String(tcpPort), String(appPort)]);
  const server = s.procs.start('node floor (h2 server)', s.serverCpus, process.execPath, [script, 'h2-server', String(serverPort), String(appPort), dir]);
  const client = s.procs.start('node floor (h2 client)', s.serverCpus, process.execPath, [script, 'h2-client', String(clientPort), String(serverPort), String(appPort), dir]);
  for (const p of [tcp, server, client]) await p.waitFor(/ready/, START_TIMEOUT_MS);
  const paths: Path[] = [
    { key: 'node_h2', label: 'Node floor: HTTP/2 CONNECT pair', url: `http://127.0.0.1:${clientPort}/`, proxies: [client, server], note: 'floor.mjs: the HBONE design in plain node:http2, none of knit\'s work' },
    { key: 'node_tcp', label: 'Node floor: TCP pipe', url: `http://127.0.0.1:${tcpPort}/`, proxies: [tcp], note: 'floor.mjs: a plain net pipe, none of knit\'s work' },
  ];
  for (const p of paths) await routable(p, START_TIMEOUT_MS / 2);
  return paths;
}

/** A service file in Consul's format. */
const service = (name: string, port: number, upstream?: { to: string; port: number }): string =>
  JSON.stringify({ service: { name, port, ...(upstream ? { connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: upstream.to, local_bind_port: upstream.port }] } } } } : {}) } });

/** Writes services to `dir`: the two extra dummy services point at ports where nothing listens (they only cost what a configured service costs). */
async function writeServices(dir: string, files: Record<string, string>): Promise<void> {
  await mkdir(dir, { recursive: true });
  for (const [name, text] of Object.entries(files)) await writeFile(join(dir, `${name}.json`), text);
}

/** `knit dev` with both ends (client with an upstream, server) and the four dummies the two agents have between them. */
export async function startKnitDev(s: Setup, appPort: number): Promise<Path> {
  const dir = join(s.dir, 'dev');
  const upstreamPort = await freePort();
  const files: Record<string, string> = { server: service('server', appPort), client: service('client', await freePort(), { to: 'server', port: upstreamPort }) };
  for (const d of ['dummy-a1', 'dummy-a2', 'dummy-b1', 'dummy-b2']) files[d] = service(d, await freePort());
  await writeServices(join(dir, 'services'), files);
  // Mesh ports on any free port, with whichever flag this checkout's `knit dev` has (per-service inbound ports before HBONE, one HBONE port after).
  const help = await knitCli(s, ['dev', '--help'], {});
  const portFlags = ['--inbound-port-base', '--hbone-port'].filter((f) => help.includes(`${f} `)).flatMap((f) => [f, '0']);
  const proc = startKnit(s, 'knit dev', s.serverCpus, s.knitNodeFlags('knit-dev'),
    ['dev', '--config-dir', join(dir, 'services'), '--data-dir', join(dir, 'data'), '--admin-addr', `127.0.0.1:${await freePort()}`, ...portFlags], { KNIT_LOG_LEVEL: 'warn' });
  await proc.waitFor(/knit dev ready/, START_TIMEOUT_MS);
  const path: Path = {
    key: 'knit_dev', label: 'knit dev (one process)', url: `http://127.0.0.1:${upstreamPort}/`, proxies: [proc],
    note: 'one process: both ends, control plane and embedded registry',
  };
  await routable(path, START_TIMEOUT_MS / 2);
  return path;
}

/**
 * A long-running `knit` process, started as an operator starts it: with
 * the node flags of bin/knit.mjs's `#!` line (`#!/usr/bin/env -S node
 * FLAGS`), which `node bin/knit.mjs` would leave out, then the extra ones
 * (profiling, `--node-flags`; node refuses some of them in NODE_OPTIONS).
 */
function startKnit(s: Setup, name: string, cpus: string, nodeFlags: string[], args: string[], env: NodeJS.ProcessEnv = {}): Started {
  const bin = join(s.knitRoot, 'bin', 'knit.mjs');
  const shebang = /^#!\S*env -S \S*node((?: +\S+)*)\s*$/.exec(readFileSync(bin, 'utf8').split('\n')[0] ?? '')?.[1]?.trim().split(/ +/).filter(Boolean) ?? [];
  return s.procs.start(name, cpus, process.execPath, [...shebang, ...nodeFlags, bin, ...args], { cwd: s.knitRoot, env: { ...process.env, ...env } });
}

/** Runs a short `knit` CLI command against the control plane. */
async function knitCli(s: Setup, args: string[], env: NodeJS.ProcessEnv): Promise<string> {
  try {
    const { stdout } = await run(process.execPath, [join(s.knitRoot, 'bin', 'knit.mjs'), ...args], { cwd: s.knitRoot, env: { ...process.env, ...env }, timeout: 60_000 });
    return stdout.trim();
  } catch (e) {
    const err = e as Error & { stdout?: string; stderr?: string };
    throw new Error(`knit ${args.join(' ')} failed: ${err.message}\n${tail(`${err.stdout ?? ''}${err.stderr ?? ''}`)}`);
  }
}

/**
 * Writes an agent config with `base` and those of the `optional` keys this
 * checkout's `knit validate` knows: per-service inbound ports
 * (`inbound_port_base`) before HBONE, the host's HBONE port (`hbone_port`,
 * a free one: the registry tells peers which) after. Throws with
 * validate's report when the config still has problems.
 */
async function writeAgentConfig(s: Setup, file: string, base: Record<string, string>, optional: Record<string, number | string>): Promise<void> {
  const write = (keys: Record<string, number | string>): Promise<void> => writeFile(file, `${Object.entries({ ...base, ...keys }).map(([k, v]) => `${k}: ${v}`).join('\n')}\n`);
  const validate = async (): Promise<string> => {
    try {
      await run(process.execPath, [join(s.knitRoot, 'bin', 'knit.mjs'), 'validate', file], { cwd: s.knitRoot, timeout: 60_000 });
      return '';
    } catch (e) {
      const err = e as Error & { stdout?: string; stderr?: string };
      return `${err.stdout ?? ''}${err.stderr ?? ''}` || err.message;
    }
  };
  await write(optional);
  const report = await validate();
  if (!report) return;
  const known = Object.fromEntries(Object.entries(optional).filter(([k]) => !report.includes(`unknown field "${k}"`)));
  await write(known);
  const again = await validate();
  if (again) throw new Error(`knit validate refuses the agent config ${file}:\n${tail(again)}`);
}

/**
 * `knit server` (on the control-plane CPUs) over the given ZooKeeper, then
 * two agents on the server CPUs, each enrolled with a token from `knit
 * token create --node NODE --services ...`. Each agent binds and advertises
 * its own loopback address (127.0.0.2 and 127.0.0.3), as two hosts would
 * have their own: per-host ports do not collide, and
 * agent A reaches agent B only through B's listener. Each agent has three
 * services: its end of the pair and two dummies.
 */
export async function startKnitAgents(s: Setup, appPort: number, zkConnect: string): Promise<{ path: Path; server: Started }> {
  const dir = join(s.dir, 'agents');
  await mkdir(dir);
  const registry = `zk://${zkConnect}/knit-bench`;
  const serverPort = await freePort();
  await writeFile(join(dir, 'server.yaml'),
    `name: bench\ndata_dir: ${dir}/cp\nregistry: ${registry}\nlisten: 127.0.0.1:${serverPort}\nadvertise: [127.0.0.1]\ndefault_intention: allow\nlog_level: warn\n`);
  const server = startKnit(s, 'knit server', s.controlCpus, [], ['server', '--config', join(dir, 'server.yaml')]);
  await server.waitFor(/knit server ready/, START_TIMEOUT_MS);
  const tokenFile = /operator token in ([^\s)]+)/.exec(server.output())?.[1] ?? join(dir, 'cp', 'operator.token');
  const caFile = join(dir, 'cp', 'ca', 'root.pem');
  if (!existsSync(caFile)) throw new Error(`knit server started but its CA root is not at ${caFile}; the harness needs it for KNIT_CA_FILE`);
  const cliEnv = { KNIT_SERVER: `https://127.0.0.1:${serverPort}`, KNIT_TOKEN_FILE: tokenFile, KNIT_CA_FILE: caFile };

  const upstreamPort = await freePort();
  const agents = [
    { name: 'bench-a', addr: '127.0.0.2', services: { client: service('client', await freePort(), { to: 'server', port: upstreamPort }) } as Record<string, string> },
    { name: 'bench-b', addr: '127.0.0.3', services: { server: service('server', appPort) } as Record<string, string> },
  ];
  const started: Started[] = [];
  for (const a of agents) {
    for (const d of ['1', '2']) a.services[`dummy-${a.name.slice(-1)}${d}`] = service(`dummy-${a.name.slice(-1)}${d}`, await freePort());
    const ad = join(dir, a.name);
    await writeServices(join(ad, 'services'), a.services);
    const token = await knitCli(s, ['token', 'create', '--node', a.name, '--services', Object.keys(a.services).join(',')], cliEnv);
    await writeFile(join(ad, 'join.token'), `${token}\n`, { mode: 0o600 });
    await writeAgentConfig(s, join(ad, 'agent.yaml'), {
      node: a.name, data_dir: `${ad}/data`, registry, server: `https://127.0.0.1:${serverPort}`,
      join_token_file: `${ad}/join.token`, services_dir: `${ad}/services`, advertise: a.addr, bind: a.addr,
      admin: `127.0.0.1:${await freePort()}`, drain: '2s', log_level: 'warn',
    }, { inbound_port_base: 0, hbone_port: await freePort() });
    const p = startKnit(s, `knit agent ${a.name}`, s.serverCpus, s.knitNodeFlags(a.name), ['agent', '--config', join(ad, 'agent.yaml')]);
    started.push(p);
  }
  await Promise.all(started.map((p) => p.waitFor(/knit agent ready/, START_TIMEOUT_MS)));
  const path: Path = {
    key: 'knit_agents', label: 'knit agents (two processes)', url: `http://127.0.0.1:${upstreamPort}/`, proxies: started,
    note: 'two agents; knit server and ZooKeeper not counted',
  };
  await routable(path, START_TIMEOUT_MS / 2);
  return { path, server };
}
