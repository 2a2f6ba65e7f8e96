/**
 * The processes a benchmark run starts, and what /proc says about them.
 *
 * Every process is started through `taskset -c CPUS` (so it and every
 * thread it makes stay on the CPUs the placement gives it), in its own
 * process group (so a Ctrl-C reaches only the harness, which then stops
 * everything in order, and so a helper a process spawns, such as tsx's
 * esbuild service, goes with it). Output is kept for the error message of
 * a process that fails to start.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';

/** Output kept per process: enough for the last lines of a failure. */
const KEEP_OUTPUT = 64 * 1024;

/** One started process. */
export interface Started {
  name: string;
  pid: number;
  child: ChildProcess;
  /** stdout and stderr as they came (the last 64 KiB). */
  output(): string;
  exited(): boolean;
  /** Resolves when the output matches `re`; rejects naming the process if it exits or times out first. */
  waitFor(re: RegExp, timeoutMs: number): Promise<void>;
}

export interface StartOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
}

/** Every process of the run; `stopAll` ends them, `killAllSync` is the last resort from an exit handler. */
export class Processes {
  private readonly all: Started[] = [];

  /** Starts `cmd args` pinned to `cpus` (a taskset list such as `1` or `0,1`). */
  start(name: string, cpus: string, cmd: string, args: string[], opts: StartOptions = {}): Started {
    const child = spawn('taskset', ['-c', cpus, cmd, ...args], {
      cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'], detached: true,
    });
    let out = '';
    let spawnError: Error | undefined;
    const keep = (d: Buffer): void => {
      out += d.toString();
      if (out.length > KEEP_OUTPUT) out = out.slice(-KEEP_OUTPUT);
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    child.on('error', (e) => (spawnError = e));
    const exited = (): boolean => spawnError !== undefined || child.exitCode !== null || child.signalCode !== null;
    const describe = (): string => `${name} (${cmd} ${args.join(' ')})`;
    const p: Started = {
      name,
      pid: child.pid ?? -1,
      child,
      output: () => out,
      exited,
      async waitFor(re, timeoutMs) {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
          if (re.test(out)) return;
          if (spawnError) throw new Error(`${describe()} could not be started: ${spawnError.message}`);
          if (exited()) throw new Error(`${describe()} exited (${child.exitCode ?? child.signalCode}) before printing ${re}; its last output:\n${tail(out)}`);
          if (Date.now() > deadline) throw new Error(`${describe()} did not print ${re} within ${timeoutMs / 1000} s; its last output:\n${tail(out)}`);
          await delay(20);
        }
      },
    };
    this.all.push(p);
    return p;
  }

  /** SIGTERM to every process group (newest first), then SIGKILL to whatever is still there after `graceMs`. */
  async stopAll(graceMs = 8000): Promise<void> {
    const live = this.all.filter((p) => !p.exited()).reverse();
    for (const p of live) signalGroup(p, 'SIGTERM');
    await Promise.all(live.map(async (p) => {
      const gone = p.exited() ? Promise.resolve() : once(p.child, 'exit').then(() => undefined);
      const timer = delay(graceMs).then(() => 'timeout' as const);
      if ((await Promise.race([gone, timer])) === 'timeout') {
        signalGroup(p, 'SIGKILL');
        if (!p.exited()) await once(p.child, 'exit');
      }
      signalGroup(p, 'SIGKILL'); // a helper left in the group (esbuild's service) goes too
    }));
  }

  /** SIGTERM one process and wait (then SIGKILL after `graceMs`). */
  async stop(p: Started, graceMs = 8000): Promise<void> {
    if (p.exited()) return;
    signalGroup(p, 'SIGTERM');
    const gone = once(p.child, 'exit');
    if ((await Promise.race([gone.then(() => 'exit'), delay(graceMs).then(() => 'timeout')])) === 'timeout') {
      signalGroup(p, 'SIGKILL');
      await gone;
    }
    signalGroup(p, 'SIGKILL');
  }

  /** For process 'exit': synchronous SIGKILL of every group still alive. */
  killAllSync(): void {
    for (const p of this.all) signalGroup(p, 'SIGKILL');
  }
}

function signalGroup(p: Started, sig: NodeJS.Signals): void {
  if (p.pid <= 0) return;
  try {
    process.kill(-p.pid, sig);
  } catch {
    // already gone
  }
}

/** The last lines of a process's output, for an error message. */
export function tail(s: string, lines = 25): string {
  return s.trimEnd().split('\n').slice(-lines).map((l) => `  | ${l}`).join('\n') || '  | (no output)';
}

/** Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses). */
async function statFields(pid: number): Promise<string[] | undefined> {
  try {
    const s = await readFile(`/proc/${pid}/stat`, 'utf8');
    return s.slice(s.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/** `pids` and all their descendants (a proxy's helpers count as the proxy). */
export async function withDescendants(pids: number[]): Promise<number[]> {
  const children = new Map<number, number[]>();
  for (const e of await readdir('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    const f = await statFields(Number(e));
    const ppid = Number(f?.[1]);
    if (!f || !ppid) continue;
    children.set(ppid, [...(children.get(ppid) ?? []), Number(e)]);
  }
  const out: number[] = [];
  const walk = (pid: number): void => {
    out.push(pid);
    for (const c of children.get(pid) ?? []) walk(c);
  };
  for (const p of pids) walk(p);
  return out;
}

/** Clock ticks per second of utime/stime (CLK_TCK; 100 on common Linux builds, asked once). */
const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;

/** CPU time (user + system, all threads) of `pids`, in ms. */
export async function cpuMs(pids: number[]): Promise<number> {
  let ticks = 0;
  for (const pid of pids) {
    const f = await statFields(pid);
    // utime and stime are fields 14 and 15 of stat; counted from the state field (3), indexes 11 and 12.
    if (f) ticks += Number(f[11]) + Number(f[12]);
  }
  return (ticks * 1000) / CLK_TCK;
}

/** Resident memory of `pids`, summed: now (VmRSS) and peak since start or the last `resetPeak` (VmHWM), in MiB. */
export async function memoryMb(pids: number[]): Promise<{ rss: number; hwm: number }> {
  let rss = 0;
  let hwm = 0;
  for (const pid of pids) {
    let s: string;
    try {
      s = await readFile(`/proc/${pid}/status`, 'utf8');
    } catch {
      continue;
    }
    rss += Number(/VmRSS:\s+(\d+)/.exec(s)?.[1] ?? 0);
    hwm += Number(/VmHWM:\s+(\d+)/.exec(s)?.[1] ?? 0);
  }
  return { rss: rss / 1024, hwm: hwm / 1024 };
}

/** Resets VmHWM to the current RSS (`echo 5 > clear_refs`, Linux 4.0+); false when the kernel refuses. */
export async function resetPeak(pids: number[]): Promise<boolean> {
  let ok = true;
  for (const pid of pids) {
    try {
      await writeFile(`/proc/${pid}/clear_refs`, '5');
    } catch {
      ok = false;
    }
  }
  return ok;
}

/**
 * Time one CPU spent running processes (user, nice, system) or stolen by
 * the hypervisor, and its total time, since boot, from /proc/stat, in ms.
 * irq/softirq time (loopback TCP of the processes under test, which the
 * kernel may account there) counts in the total only.
 */
export async function cpuTimes(cpu: number): Promise<{ busyMs: number; totalMs: number }> {
  const line = (await readFile('/proc/stat', 'utf8')).split('\n').find((l) => l.startsWith(`cpu${cpu} `));
  if (!line) throw new Error(`no cpu${cpu} in /proc/stat`);
  // user nice system idle iowait irq softirq steal ...
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  const at = (i: number): number => f[i] ?? 0;
  const busy = at(0) + at(1) + at(2) + at(7);
  return { busyMs: (busy * 1000) / CLK_TCK, totalMs: ((busy + at(3) + at(4) + at(5) + at(6)) * 1000) / CLK_TCK };
}
