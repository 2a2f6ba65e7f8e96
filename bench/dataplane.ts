/**
 * Side-by-side data-plane benchmark, in one run on this machine (habit 11:
 * a baseline in the same run, ratios printed). Paths (see dataplane/paths.ts):
 * direct, an HAProxy mTLS pair, knit's pair as two `knit agent` processes,
 * and `knit dev` (one process, the same-host path). Workloads, each on every
 * path, paths alternating within every round (the order rotates from round
 * to round), medians over the rounds:
 *   keepalive_c1   wrk -c1 --latency: req/s, p50/p99 (and added vs direct)
 *   keepalive_c16  req/s, and the proxies' CPU (utime+stime of every proxy
 *                  process and its helpers) per 1,000 requests: the headline
 *                  CPU figure (it is read in the other request workloads too)
 *   keepalive_c64  req/s, and the proxies' peak RSS (VmHWM, reset before the run)
 *   new_conns_c16  Connection: close, 16 concurrent: new connections/s (and
 *                  proxy CPU per 1,000 connections: the handshake cost)
 *   bulk_c1        64 MiB responses on one connection: MiB/s
 *   idle           proxies' RSS after start, 3 services on each agent
 *
 * Placement (this machine has 2 cores): the load generator (wrk), this
 * harness and the control plane (knit server, ZooKeeper; idle while
 * measuring) run on CPU 0; the app and every proxy process of every path run
 * on CPU 1. Each path thus gets the same single core for app + both proxies,
 * HAProxy (one thread per process) and knit (one event loop per process plus
 * V8/libuv helper threads, all pinned) alike; the load generator never takes
 * CPU from what is measured, and no path can borrow an idle core the others
 * do not get.
 *
 * Noise: every run also records how much of each CPU went to processes
 * outside the benchmark (/proc/stat less the CPU time of everything the
 * benchmark started, wrk included); the summary prints it, and figures from
 * runs with much of it are not worth comparing. The header says whether knit
 * ran compiled (dist/) or from src/ through tsx, which costs memory.
 *
 * With --floor, two more paths (dataplane/floor.mjs) show what Node itself
 * costs to carry the same traffic the same way, without knit: an HTTP/2
 * CONNECT pair over mutual TLS, and a TCP pipe. knit's figures are also
 * given as ratios to them (x floor).
 *
 * Usage: npm run bench [-- --quick] [--rounds N] [--seconds N] [--only W,...] [--node-flags=F] [--floor] [--profile] [--knit-root DIR] [--out FILE]
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, rmSync, statSync } from 'node:fs';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { startZooKeeper, type ZkCluster } from '../test/helpers/zookeeper.js';
import { ROOT } from '../test/helpers/knit.js';
import { summarizeProfile } from './dataplane/cpuprofile.js';
import { directPath, startApp, startFloor, startHaproxy, startKnitAgents, startKnitDev, type Path, type PathKey, type Setup } from './dataplane/paths.js';
import { cpuMs, cpuTimes, memoryMb, Processes, resetPeak, tail, withDescendants } from './dataplane/procs.js';
import { summarize, table, WORKLOAD_LABELS, type Sample, type WorkloadKey } from './dataplane/report.js';
import { wrk } from './dataplane/wrk.js';

const USAGE = `usage: npm run bench [-- OPTIONS]
  --quick            one round of 3 s runs (about 1.5 minutes in all)
  --rounds N         rounds (default 3; medians over them)
  --seconds N        seconds per run (default 5)
  --only W,...       only these workloads (keepalive_c1, keepalive_c16, keepalive_c64, new_conns_c16, bulk_c1), for
                     studying one figure; the idle figure is always taken
  --node-flags=F     extra node flags for the knit agents and knit dev (e.g. --node-flags=--max-semi-space-size=4), to compare tunings
  --floor            also run the Node floor paths (floor.mjs): plain node:http2 and net, none of knit's work
  --profile          run the knit agents and knit dev under node --cpu-prof and print their top 15 self-time functions
  --knit-root DIR    the knit checkout to run (default: this repository)
  --out FILE         results JSON (default bench/results/latest.json)`;

interface Workload {
  key: Exclude<WorkloadKey, 'idle'>;
  connections: number;
  latency?: boolean;
  close?: boolean;
  bulk?: boolean;
}
const WORKLOADS: Workload[] = [
  { key: 'keepalive_c1', connections: 1, latency: true },
  { key: 'keepalive_c16', connections: 16 },
  { key: 'keepalive_c64', connections: 64 },
  { key: 'new_conns_c16', connections: 16, close: true },
  { key: 'bulk_c1', connections: 1, bulk: true },
];
const ORDER: PathKey[] = ['direct', 'haproxy', 'knit_agents', 'knit_dev', 'node_h2', 'node_tcp'];

interface Options {
  rounds: number;
  seconds: number;
  warmup: number;
  quick: boolean;
  profile: boolean;
  knitRoot: string;
  out: string;
  workloads: Workload[];
  nodeFlags: string[];
  floor: boolean;
}

function options(): Options {
  let v;
  try {
    v = parseArgs({
      options: {
        quick: { type: 'boolean', default: false }, floor: { type: 'boolean', default: false }, profile: { type: 'boolean', default: false }, help: { type: 'boolean', default: false },
        rounds: { type: 'string' }, seconds: { type: 'string' }, 'knit-root': { type: 'string' }, out: { type: 'string' },
        only: { type: 'string' }, 'node-flags': { type: 'string' },
      },
    }).values;
  } catch (e) {
    console.error(`${(e as Error).message}\n${USAGE}`);
    process.exit(2);
  }
  if (v.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const int = (name: string, s: string | undefined, dflt: number): number => {
    if (s === undefined) return dflt;
    const n = Number(s);
    if (!Number.isInteger(n) || n < 1) {
      console.error(`--${name} ${s}: expected a whole number >= 1\n${USAGE}`);
      process.exit(2);
    }
    return n;
  };
  const quick = v.quick;
  const only = v.only?.split(',').map((w) => w.trim()).filter(Boolean);
  const unknown = only?.filter((w) => !WORKLOADS.some((x) => x.key === w));
  if (unknown?.length || (only && !only.length)) {
    console.error(`--only ${v.only}: unknown workload ${unknown?.join(', ') || '(none given)'}\n${USAGE}`);
    process.exit(2);
  }
  return {
    workloads: only ? WORKLOADS.filter((w) => only.includes(w.key)) : WORKLOADS,
    nodeFlags: v['node-flags']?.split(/\s+/).filter(Boolean) ?? [],
    floor: v.floor,
    quick,
    profile: v.profile,
    rounds: int('rounds', v.rounds, quick ? 1 : 3),
    seconds: int('seconds', v.seconds, quick ? 3 : 5),
    warmup: quick ? 1 : 2,
    knitRoot: resolve(v['knit-root'] ?? ROOT),
    out: resolve(v.out ?? join(import.meta.dirname, 'results', 'latest.json')),
  };
}

const firstLine = (cmd: string, args: string[]): string => {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return `${r.stdout ?? ''}${r.stderr ?? ''}`.split('\n')[0]?.trim() || 'unknown';
};
/**
 * How bin/knit.mjs in `root` runs knit: the compiled dist/ when it is at
 * least as new as every source it is built from, else src/ through tsx
 * (some 30 MB and a few hundred ms more per process). The same test as
 * bin/knit.mjs's, repeated here only to label the figures.
 */
function knitMode(root: string): 'dist' | 'tsx' {
  const mtime = (f: string): number | undefined => {
    try {
      return statSync(f).mtimeMs;
    } catch {
      return undefined;
    }
  };
  const built = mtime(join(root, 'dist', '.built'));
  if (!existsSync(join(root, 'dist', 'cli', 'main.js')) || built === undefined) return 'tsx';
  if (!existsSync(join(root, 'src'))) return 'dist';
  let newest = Math.max(mtime(join(root, 'tsconfig.json')) ?? 0, mtime(join(root, 'tsconfig.build.json')) ?? 0, mtime(join(root, 'src')) ?? 0);
  for (const e of readdirSync(join(root, 'src'), { recursive: true, withFileTypes: true })) {
    if (e.isFile() && (e.name.endsWith('.test.ts') || e.name === 'contract-suite.ts')) continue;
    newest = Math.max(newest, mtime(join(e.parentPath, e.name)) ?? Infinity);
  }
  return newest <= built ? 'dist' : 'tsx';
}

const monotonicUs = (): number => Number(process.hrtime.bigint() / 1000n);
const s1 = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;

async function main(): Promise<void> {
  const opt = options();
  const t0 = Date.now();
  if (!existsSync(join(opt.knitRoot, 'bin', 'knit.mjs'))) throw new Error(`--knit-root ${opt.knitRoot}: no bin/knit.mjs there`);
  if (!existsSync(join(opt.knitRoot, 'node_modules'))) throw new Error(`--knit-root ${opt.knitRoot}: no node_modules (run npm ci there)`);
  for (const tool of ['haproxy', 'wrk', 'taskset', 'openssl']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`${tool} is not installed (bench/run.sh installs haproxy and wrk when run as root)`);
  }

  const cpus = os.availableParallelism();
  const [loadCpus, serverCpus] = cpus >= 2 ? ['0', '1'] : ['0', '0'];
  if (cpus < 2) console.error('warning: one CPU: load generator, app and proxies share it; figures are not comparable with 2-core runs');
  // The harness itself samples /proc between runs: it belongs with the load generator.
  execFileSync('taskset', ['-a', '-p', '-c', loadCpus, String(process.pid)], { stdio: 'ignore' });
  const loadStart = os.loadavg();
  if (loadStart[0]! > 0.5) console.error(`warning: load average ${loadStart[0]!.toFixed(2)} before the run: other work on this machine will skew the figures`);

  const procs = new Processes();
  const dir = await mkdtemp(join(os.tmpdir(), 'knit-bench-'));
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const profileDir = join(import.meta.dirname, 'results', 'profiles', stamp);
  let zk: ZkCluster | undefined;
  let cleaning: Promise<void> | undefined;
  const cleanup = (): Promise<void> =>
    (cleaning ??= (async () => {
      await procs.stopAll();
      await zk?.stop().catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
    })());
  let aborting = false;
  const abort = new AbortController();
  for (const [sig, code] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
    process.once(sig, () => {
      aborting = true;
      abort.abort();
      console.error(`\n${sig}: stopping every process the benchmark started`);
      void cleanup().finally(() => process.exit(code));
    });
  }
  // Last resort if the harness dies some other way: nothing it started outlives it.
  process.once('exit', () => {
    procs.killAllSync();
    for (const m of zk?.members ?? []) m.proc?.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });

  try {
    const log = (m: string): void => console.log(m);
    const setup: Setup = {
      procs, dir, serverCpus, controlCpus: loadCpus, knitRoot: opt.knitRoot, log,
      knitNodeFlags: (name) => [...opt.nodeFlags, ...(opt.profile ? ['--cpu-prof', `--cpu-prof-dir=${join(profileDir, name)}`] : [])],
    };
    if (opt.profile) mkdirSync(profileDir, { recursive: true });
    log(`knit data-plane benchmark: ${opt.rounds} round(s) of ${opt.seconds} s runs; wrk on CPU ${loadCpus}, app + proxies on CPU ${serverCpus}; knit from ${opt.knitRoot}`);
    log('starting: app, HAProxy pair, knit dev, ZooKeeper, knit server, two knit agents');
    const app = await startApp(setup);
    const paths: Path[] = [directPath(app.port)];
    paths.push(await startHaproxy(setup, app.port));
    const modes = new Set([knitMode(opt.knitRoot)]);
    paths.push(await startKnitDev(setup, app.port));
    if (opt.floor) paths.push(...(await startFloor(setup, app.port)));
    zk = await startZooKeeper();
    if (aborting) await zk.stop(); // interrupted while it started: cleanup could not see it
    for (const m of zk.members) if (m.proc?.pid) execFileSync('taskset', ['-a', '-p', '-c', loadCpus, String(m.proc.pid)], { stdio: 'ignore' });
    const agents = await startKnitAgents(setup, app.port, zk.connect);
    paths.push(agents.path);
    modes.add(knitMode(opt.knitRoot));
    // src/ edited while knit started: some knit processes may run dist/, others tsx.
    const mode = modes.size > 1 ? 'mixed' : [...modes][0]!;
    const modeText = { dist: 'compiled dist/', tsx: 'src/ through tsx (dist/ missing or older than src/)', mixed: 'dist/ or src/ through tsx (src/ changed during start-up)' }[mode];
    log(`knit runs ${modeText}`);
    const byKey = new Map(paths.map((p) => [p.key, p]));
    const order = ORDER.filter((k) => byKey.has(k));
    const tSetup = Date.now();

    const samples = {} as Record<PathKey, Partial<Record<WorkloadKey, Sample[]>>>;
    for (const k of order) samples[k] = {};
    const add = (k: PathKey, w: WorkloadKey, s: Sample): void => {
      (samples[k][w] ??= []).push(s);
    };

    // Idle: every path is up and has carried exactly one request.
    for (const k of order) {
      const p = byKey.get(k)!;
      if (!p.proxies.length) continue;
      const m = await memoryMb(await withDescendants(p.proxies.map((x) => x.pid)));
      const each: Record<string, number> = {};
      for (const x of p.proxies) each[x.name] = Number((await memoryMb(await withDescendants([x.pid]))).rss.toFixed(1));
      add(k, 'idle', { rssMb: m.rss, rssMbPeak: m.hwm, rssByProcess: each });
    }

    const alive = (p: Path): void => {
      for (const x of p.proxies) if (x.exited()) throw new Error(`${x.name} exited (${x.child.exitCode ?? x.child.signalCode}) during the run; its last output:\n${tail(x.output())}`);
    };
    log(`warm-up: ${opt.warmup} s at 16 connections per path`);
    for (const k of order) await wrk({ url: byKey.get(k)!.url, connections: 16, seconds: opt.warmup, cpus: loadCpus, signal: abort.signal });

    // CPU time that is not the benchmark's on either CPU (other work on the machine): a run with much of it is suspect.
    // Ours on the server CPU: app and proxies; on the load generator's: wrk, this harness, knit server, ZooKeeper.
    const ours = await withDescendants([app.proc.pid, ...paths.flatMap((p) => p.proxies.map((x) => x.pid))]);
    const control = await withDescendants([agents.server.pid, ...zk.members.flatMap((m) => (m.proc?.pid ? [m.proc.pid] : []))]);
    const harnessMs = (): number => {
      const u = process.cpuUsage();
      return (u.user + u.system) / 1000;
    };
    const [serverCpu, loadCpu] = [Number(serverCpus), Number(loadCpus)];
    const foreignPct = async (run: () => Promise<Sample & { wrkCpuMs?: number }>): Promise<Sample> => {
      const [s0, l0, o0, c0, h0] = [await cpuTimes(serverCpu), await cpuTimes(loadCpu), await cpuMs(ours), await cpuMs(control), harnessMs()];
      const { wrkCpuMs, ...s } = await run();
      const [s1, l1, o1, c1, h1] = [await cpuTimes(serverCpu), await cpuTimes(loadCpu), await cpuMs(ours), await cpuMs(control), harnessMs()];
      const pct = (busy: number, total: number): number | undefined => (total > 0 ? Math.max(0, Math.min(100, (100 * busy) / total)) : undefined);
      if (serverCpu === loadCpu) return { ...s, foreignPct: pct(s1.busyMs - s0.busyMs - (o1 - o0) - (c1 - c0) - (h1 - h0) - (wrkCpuMs ?? 0), s1.totalMs - s0.totalMs) };
      return {
        ...s,
        foreignPct: pct(s1.busyMs - s0.busyMs - (o1 - o0), s1.totalMs - s0.totalMs),
        foreignLoadPct: wrkCpuMs === undefined ? undefined : pct(l1.busyMs - l0.busyMs - (c1 - c0) - (h1 - h0) - wrkCpuMs, l1.totalMs - l0.totalMs),
      };
    };

    const measure = async (p: Path, w: Workload): Promise<Sample> => foreignPct(() => measureOnce(p, w));
    const measureOnce = async (p: Path, w: Workload): Promise<Sample & { wrkCpuMs?: number }> => {
      if (aborting) throw new Error('interrupted');
      alive(p);
      const pids = await withDescendants(p.proxies.map((x) => x.pid));
      const run = { url: w.bulk ? `${p.url}bulk` : p.url, connections: w.connections, seconds: opt.seconds, cpus: loadCpus, latency: w.latency, close: w.close, timeoutS: w.bulk ? 60 : 5, signal: abort.signal };
      // Proxy CPU is read around every request workload; the keep-alive 16-connection figure is the headline one.
      const cpuBefore = await cpuMs(pids);
      const per1k = (requests: number, after: number): number | undefined => (pids.length && requests ? (after - cpuBefore) / (requests / 1000) : undefined);
      if (w.key === 'keepalive_c64') {
        const reset = await resetPeak(pids);
        let sampling = true;
        let sampled = 0;
        const sampler = (async () => {
          while (sampling) {
            sampled = Math.max(sampled, (await memoryMb(pids)).rss);
            await new Promise((r) => setTimeout(r, 200));
          }
        })();
        const r = await wrk(run).finally(() => (sampling = false));
        const cpu = per1k(r.requests, await cpuMs(pids));
        await sampler;
        const m = await memoryMb(pids);
        return { wrkCpuMs: r.cpuMs, rps: r.rps, cpuMsPer1k: cpu, rssMbPeak: pids.length ? (reset ? m.hwm : Math.max(sampled, m.rss)) : undefined, rssMb: pids.length ? m.rss : undefined, errors: r.errors };
      }
      if (w.key === 'new_conns_c16') {
        let probe: Sample['probe'];
        const t = p.probe && setTimeout(() => void p.probe!().then((x) => (probe = x), () => undefined), (opt.seconds * 1000) / 2);
        const r = await wrk(run);
        if (t) clearTimeout(t);
        return { wrkCpuMs: r.cpuMs, connsPerS: r.rps, cpuMsPer1k: per1k(r.requests, await cpuMs(pids)), errors: r.errors, probe };
      }
      const r = await wrk(run);
      if (w.bulk) return { wrkCpuMs: r.cpuMs, mibPerS: r.mibPerS, errors: r.errors };
      const cpu = per1k(r.requests, await cpuMs(pids));
      return { wrkCpuMs: r.cpuMs, rps: r.rps, p50Us: w.latency ? r.p50Us : undefined, p99Us: w.latency ? r.p99Us : undefined, cpuMsPer1k: cpu, errors: r.errors };
    };

    const windowFrom = monotonicUs();
    for (let round = 0; round < opt.rounds; round++) {
      const rotated = order.map((_, i) => order[(i + round) % order.length]!);
      for (const w of opt.workloads) {
        for (const k of rotated) {
          const s = await measure(byKey.get(k)!, w);
          if (aborting) throw new Error('interrupted');
          add(k, w.key, s);
          const fig = w.key === 'new_conns_c16' ? `${s.connsPerS!.toFixed(0)} conns/s` : w.bulk ? `${s.mibPerS!.toFixed(0)} MiB/s` : `${s.rps!.toFixed(0)} req/s`;
          log(`  round ${round + 1}/${opt.rounds}  ${w.key.padEnd(13)} ${k.padEnd(11)} ${fig}${s.errors ? `  [${s.errors}]` : ''}`);
        }
      }
    }
    const windowTo = monotonicUs();
    const tRuns = Date.now();

    const profiles: Array<{ agent: string; file: string; busyMs: number; top: Array<{ fn: string; selfMs: number; pct: number }> }> = [];
    if (opt.profile) {
      // Profiles are written when the agents exit: stop them cleanly (SIGTERM) before reading.
      for (const a of [...agents.path.proxies, ...byKey.get('knit_dev')!.proxies]) await procs.stop(a, 15_000);
      for (const a of ['bench-a', 'bench-b', 'knit-dev']) {
        const d = join(profileDir, a);
        const files = existsSync(d) ? (await readdir(d)).filter((f) => f.endsWith('.cpuprofile')) : [];
        if (!files.length) console.error(`warning: no .cpuprofile from ${a} in ${d}`);
        for (const f of files) {
          const sum = await summarizeProfile(join(d, f), 15, opt.knitRoot, { fromUs: windowFrom, toUs: windowTo });
          profiles.push({ agent: a, file: join(d, f), busyMs: sum.busyMs, top: sum.top });
        }
      }
    }

    const figs = summarize(samples);
    const labels = Object.fromEntries(order.map((k) => [k, byKey.get(k)!.label])) as Record<PathKey, string>;
    const placement = `wrk, the harness, knit server and ZooKeeper on CPU ${loadCpus}; the app and every proxy process on CPU ${serverCpus}`;
    console.log(`\nknit data-plane benchmark: median of ${opt.rounds} round(s), ${opt.seconds} s per run, HTTP/1.1, 64-byte body, node ${process.version}${opt.profile ? ' (knit agents PROFILED: slower than normal)' : ''}`);
    console.log(`placement: ${placement}; knit ran ${modeText}\n`);
    console.log(table(figs, order, labels));
    const spread = (f: (x: Sample) => number | undefined): string => {
      const v = order.flatMap((k) => Object.values(samples[k]).flat().map(f)).filter((x): x is number => x !== undefined).sort((a, b) => a - b);
      return v.length ? `median ${v[Math.floor(v.length / 2)]!.toFixed(0)}%, max ${v.at(-1)!.toFixed(0)}%` : 'unknown';
    };
    const quiet = Math.max(...order.flatMap((k) => Object.values(samples[k]).flat().flatMap((x) => [x.foreignPct ?? 0, x.foreignLoadPct ?? 0])));
    console.log(`\nother work during the runs (CPU time not the benchmark's): CPU ${serverCpus} ${spread((x) => x.foreignPct)}` +
      `${serverCpus !== loadCpus ? `; CPU ${loadCpus} ${spread((x) => x.foreignLoadPct)}` : ''}${quiet > 10 ? '. Runs above 10% are skewed: compare figures from a quiet machine' : ''}`);
    const reuse = figs.haproxy?.new_conns_c16?.probe;
    if (reuse) console.log(`\nHAProxy TLS session reuse during the new-connections run: ${reuse.ssl_session_reuse_pct}% (full handshakes/s: ${reuse.ssl_full_handshakes_per_s})`);
    for (const k of order) if (byKey.get(k)!.note) console.log(`${labels[k]}: ${byKey.get(k)!.note}`);
    const errs = order.flatMap((k) => Object.entries(figs[k]).flatMap(([w, f]) => f.errors.map((e) => `${k} ${w}: ${e}`)));
    if (errs.length) console.log(`\nerrors reported by wrk:\n${errs.map((e) => `  ${e}`).join('\n')}`);
    for (const p of profiles) {
      console.log(`\ntop 15 self time, ${p.agent} during the rounds (${(p.busyMs / 1000).toFixed(1)} s busy; ${p.file}):`);
      for (const f of p.top) console.log(`  ${f.selfMs.toFixed(0).padStart(7)} ms ${f.pct.toFixed(1).padStart(5)}%  ${f.fn}`);
    }

    const git = (args: string[]): string | null => {
      const r = spawnSync('git', ['-C', opt.knitRoot, '--no-optional-locks', ...args], { encoding: 'utf8' });
      return r.status === 0 ? r.stdout.trim() : null;
    };
    const result = {
      schema: 1,
      date: new Date().toISOString(),
      options: { quick: opt.quick, rounds: opt.rounds, seconds: opt.seconds, warmup_s: opt.warmup, profile: opt.profile, knit_root: opt.knitRoot, workloads: opt.workloads.map((w) => w.key), node_flags: opt.nodeFlags, floor: opt.floor },
      knit: { mode, commit: git(['rev-parse', 'HEAD']), uncommitted_files: git(['status', '--porcelain'])?.split('\n').filter(Boolean).length ?? null },
      machine: {
        cpus, cpu_model: os.cpus()[0]?.model ?? 'unknown', kernel: os.release(), mem_gb: Number((os.totalmem() / 1024 ** 3).toFixed(1)),
        loadavg_start: loadStart.map((x) => Number(x.toFixed(2))), loadavg_end: os.loadavg().map((x) => Number(x.toFixed(2))),
      },
      versions: { node: process.version, haproxy: firstLine('haproxy', ['-v']), wrk: firstLine('wrk', ['-v']), openssl: firstLine('openssl', ['version']) },
      placement: { loadgen_cpus: loadCpus, server_cpus: serverCpus, control_plane_cpus: loadCpus, text: placement },
      units: { rps: 'requests/s', p50_us: 'microseconds', conns_per_s: 'new connections/s', mb_per_s: 'MiB/s (2^20 bytes)', cpu_ms_per_1k: 'ms of CPU (utime+stime, all proxy processes) per 1,000 requests', rss_mb_peak: 'MiB, VmHWM summed over the proxy processes (keepalive_c64: peak during the run; idle: peak since start, rss_mb: VmRSS after start)', foreign_cpu_pct: '% of the server CPU (foreign_loadgen_cpu_pct: of the load generator CPU) used by processes outside the benchmark' },
      workloads: WORKLOAD_LABELS,
      paths: Object.fromEntries(order.map((k) => [k, { label: labels[k], note: byKey.get(k)!.note ?? null, workloads: figs[k] }])),
      profiles: profiles.map((p) => ({ agent: p.agent, file: p.file, busy_ms: Number(p.busyMs.toFixed(0)), top: p.top.map((f) => ({ fn: f.fn, self_ms: Number(f.selfMs.toFixed(1)), pct: Number(f.pct.toFixed(1)) })) })),
      timings_s: { setup: (tSetup - t0) / 1000, rounds: (tRuns - tSetup) / 1000, total: (Date.now() - t0) / 1000 },
    };
    mkdirSync(join(opt.out, '..'), { recursive: true });
    await writeFile(opt.out, `${JSON.stringify(result, null, 2)}\n`);
    console.log(`\nsetup ${s1(tSetup - t0)}, rounds ${s1(tRuns - tSetup)}, total ${s1(Date.now() - t0)}; results in ${opt.out}`);
  } catch (e) {
    if (aborting) return;
    console.error(`\nbench failed: ${e instanceof Error ? e.message : String(e)}`);
    process.exitCode = 1;
  } finally {
    if (!aborting) await cleanup();
  }
}

await main().catch((e: unknown) => {
  console.error(`bench: ${e instanceof Error ? e.message : String(e)}`);
  process.exitCode = 1;
});
