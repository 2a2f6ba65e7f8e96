/**
 * Side-by-side data-plane figures on this machine:
 *   direct:  wrk -> app
 *   haproxy: wrk -> haproxy (plain in, mTLS out) -> haproxy (mTLS in) -> app, one thread each
 *   knit dev:    wrk -> knit outbound -> mTLS -> knit inbound -> app (one `knit dev` process)
 *   knit agents: the same through two `knit agent` processes (as on two hosts),
 *                with `knit server` and a ZooKeeper started for the run
 * For each: throughput at 16 keep-alive connections (ratio to direct),
 * added p50 latency on one sequential connection, new connections per
 * second (Connection: close), and resident memory of the proxies.
 * Usage: bench/run.sh [--seconds N]
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, writeFile, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CertificateAuthority, createCsr } from '../src/identity/ca.js';
import { serviceId } from '../src/identity/spiffe.js';
import { freePort, KNIT, ROOT } from '../test/helpers/knit.js';
import { until } from '../test/helpers/wait.js';
import { startZooKeeper } from '../test/helpers/zookeeper.js';

const seconds = Number(process.argv[process.argv.indexOf('--seconds') + 1]) || 5;
const procs: ChildProcess[] = [];

function run(cmd: string, args: string[]): ChildProcess {
  const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  procs.push(p);
  return p;
}
const waitOutput = (p: ChildProcess, re: RegExp): Promise<void> =>
  new Promise((resolve, reject) => {
    let buf = '';
    const on = (d: Buffer): void => {
      buf += d.toString();
      if (re.test(buf)) resolve();
    };
    p.stdout!.on('data', on);
    p.stderr!.on('data', on);
    p.once('exit', (c) => reject(new Error(`exited ${c} before ${re}: ${buf.slice(-500)}`)));
  });

function wrk(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => execFile('wrk', args, { timeout: (seconds + 30) * 1000 }, (e: Error | null, out: string) => (e ? reject(e) : resolve(out))));
}
function parseRate(out: string): number {
  return Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1] ?? NaN);
}
function parseP50us(out: string): number {
  const m = /50%\s+([\d.]+)(us|ms|s)/.exec(out);
  if (!m) return NaN;
  const v = Number(m[1]);
  return m[2] === 'us' ? v : m[2] === 'ms' ? v * 1000 : v * 1e6;
}
async function rssMb(pid: number): Promise<number> {
  const s = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(s)?.[1] ?? 0) / 1024;
}

async function measure(url: string): Promise<{ rps: number; p50: number; cps: number }> {
  const d = `${seconds}s`;
  await wrk(['-t1', '-c4', '-d1s', url]); // warm-up
  const rps = parseRate(await wrk(['-t1', '-c16', `-d${d}`, url]));
  const p50 = parseP50us(await wrk(['-t1', '-c1', `-d${d}`, '--latency', url]));
  const cps = parseRate(await wrk(['-t1', '-c16', `-d${d}`, '-H', 'Connection: close', url]));
  return { rps, p50, cps };
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'knit-bench-'));
  try {
    const appPort = await freePort();
    const app = run(process.execPath, [join(ROOT, 'bench/backend.mjs'), String(appPort)]);
    await waitOutput(app, /ready/);

    // HAProxy pair with certificates from a knit CA (same key type and chain as knit's).
    const ca = await CertificateAuthority.create('bench.knit');
    const leaf = async (svc: string): Promise<string> => {
      const id = serviceId('bench.knit', svc);
      const { keyPem, csrPem } = await createCsr(id);
      return `${(await ca.signCsr(csrPem, id)).certPem.trim()}\n${keyPem.trim()}\n`;
    };
    await writeFile(join(dir, 'ca.pem'), ca.rootPem);
    await writeFile(join(dir, 'client.pem'), await leaf('client'), { mode: 0o600 });
    await writeFile(join(dir, 'server.pem'), await leaf('server'), { mode: 0o600 });
    const [hOut, hIn] = [await freePort(), await freePort()];
    const common = 'global\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n';
    await writeFile(join(dir, 'out.cfg'), `${common}frontend f\n  bind 127.0.0.1:${hOut}\n  default_backend b\nbackend b\n  server s 127.0.0.1:${hIn} ssl crt ${dir}/client.pem ca-file ${dir}/ca.pem verify required\n`);
    await writeFile(join(dir, 'in.cfg'), `${common}frontend f\n  bind 127.0.0.1:${hIn} ssl crt ${dir}/server.pem ca-file ${dir}/ca.pem verify required\n  default_backend b\nbackend b\n  server a 127.0.0.1:${appPort}\n`);
    const ha = [run('haproxy', ['-db', '-f', join(dir, 'out.cfg')]), run('haproxy', ['-db', '-f', join(dir, 'in.cfg')])];
    await until('haproxy route', async () => parseRate(await wrk(['-t1', '-c1', '-d1s', `http://127.0.0.1:${hOut}/`]).catch(() => '')) > 0, 10_000, 200);

    // knit dev with a client service whose upstream is the app's service.
    const knitPort = await freePort();
    const conf = join(dir, 'services');
    await (await import('node:fs/promises')).mkdir(conf);
    await writeFile(join(conf, 'server.json'), JSON.stringify({ service: { name: 'server', port: appPort } }));
    await writeFile(join(conf, 'client.json'), JSON.stringify({ service: { name: 'client', connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'server', local_bind_port: knitPort }] } } } } }));
    const knit = spawn(process.execPath, [KNIT, 'dev', '--config-dir', conf, '--data-dir', join(dir, 'data'), '--admin-addr', `127.0.0.1:${await freePort()}`, '--inbound-port-base', '0'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KNIT_LOG_LEVEL: 'warn' } });
    procs.push(knit);
    await waitOutput(knit, /knit dev ready/);
    await until('knit route', async () => parseRate(await wrk(['-t1', '-c1', '-d1s', `http://127.0.0.1:${knitPort}/`]).catch(() => '')) > 0, 10_000, 200);

    const results: Array<[string, { rps: number; p50: number; cps: number }, number]> = [];
    const direct = await measure(`http://127.0.0.1:${appPort}/`);
    results.push(['direct', direct, 0]);
    const h = await measure(`http://127.0.0.1:${hOut}/`);
    results.push(['haproxy mTLS pair', h, (await rssMb(ha[0]!.pid!)) + (await rssMb(ha[1]!.pid!))]);
    const k = await measure(`http://127.0.0.1:${knitPort}/`);
    results.push(['knit dev (both ends, one process)', k, await rssMb(knit.pid!)]);
    knit.kill('SIGTERM');

    // Two agents, as on two hosts: client's agent and server's agent are separate processes.
    const zk = await startZooKeeper();
    try {
      const sport = await freePort();
      await writeFile(join(dir, 'server.yaml'), `name: bench\ndata_dir: ${dir}/cp\nregistry: zk://${zk.connect}/knit\nlisten: 127.0.0.1:${sport}\nadvertise: [127.0.0.1]\ndefault_intention: allow\n`);
      const cp = run(process.execPath, [KNIT, 'server', '--config', join(dir, 'server.yaml')]);
      await waitOutput(cp, /knit server ready/);
      const cli = { ...process.env, KNIT_SERVER: `https://127.0.0.1:${sport}`, KNIT_TOKEN_FILE: `${dir}/cp/operator.token`, KNIT_CA_FILE: `${dir}/cp/ca/root.pem` };
      const agentPids: number[] = [];
      const agentPort = await freePort();
      for (const [name, svc] of [['srv', { service: { name: 'server', port: appPort } }], ['cli', { service: { name: 'client', connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'server', local_bind_port: agentPort }] } } } } }]] as const) {
        const d = join(dir, name);
        await (await import('node:fs/promises')).mkdir(join(d, 'services'), { recursive: true });
        await writeFile(join(d, 'services', 'svc.json'), JSON.stringify(svc));
        const token = await new Promise<string>((res, rej) => execFile(process.execPath, [KNIT, 'token', 'create', '--node', name, '--services', svc.service.name], { env: cli }, (e: Error | null, out: string) => (e ? rej(e) : res(out))));
        await writeFile(join(d, 'join.token'), token);
        await writeFile(join(d, 'agent.yaml'), `node: ${name}\ndata_dir: ${d}/data\nregistry: zk://${zk.connect}/knit\nserver: https://127.0.0.1:${sport}\njoin_token_file: ${d}/join.token\nservices_dir: ${d}/services\nadvertise: 127.0.0.1\nbind: 127.0.0.1\nadmin: 127.0.0.1:${await freePort()}\ninbound_port_base: 0\nlog_level: warn\n`);
        const p = run(process.execPath, [KNIT, 'agent', '--config', join(d, 'agent.yaml')]);
        await waitOutput(p, /knit agent ready/);
        agentPids.push(p.pid!);
      }
      await until('agents route', async () => parseRate(await wrk(['-t1', '-c1', '-d1s', `http://127.0.0.1:${agentPort}/`]).catch(() => '')) > 0, 20_000, 200);
      const a = await measure(`http://127.0.0.1:${agentPort}/`);
      results.push(['knit agents (two processes)', a, (await rssMb(agentPids[0]!)) + (await rssMb(agentPids[1]!))]);
    } finally {
      for (const p of procs.splice(3)) p.kill('SIGTERM');
      await zk.stop();
    }

    console.log(`\nknit data-plane benchmark (${seconds}s per run, HTTP keep-alive, 64-byte body, node ${process.version})`);
    console.log('| path | req/s, 16 conns | x direct | p50 1 conn | added p50 | new conns/s | proxy RSS |');
    console.log('|---|---|---|---|---|---|---|');
    for (const [name, r, rss] of results) {
      console.log(`| ${name} | ${r.rps.toFixed(0)} | ${(r.rps / direct.rps).toFixed(2)} | ${r.p50.toFixed(0)} us | ${name === 'direct' ? '-' : `+${(r.p50 - direct.p50).toFixed(0)} us`} | ${r.cps.toFixed(0)} | ${rss ? `${rss.toFixed(0)} MB` : '-'} |`);
    }
    for (const [name, r] of results.slice(2)) {
      console.log(`${name} vs haproxy: throughput ${(r.rps / h.rps).toFixed(2)}x, new conns ${(r.cps / h.cps).toFixed(2)}x, added p50 ${((r.p50 - direct.p50) / Math.max(1, h.p50 - direct.p50)).toFixed(2)}x`);
    }
  } finally {
    for (const p of procs) p.kill('SIGTERM');
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
