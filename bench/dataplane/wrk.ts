/**
 * One wrk run (pinned to the load generator's CPUs) and what its report
 * says: requests, rate, bytes per second, and the 50th/99th latency
 * percentiles when asked for (`--latency`). wrk is one thread here: one
 * thread saturates none of the paths on this machine, and a second would
 * only compete with the first for the load generator's core.
 */
import { execFile } from 'node:child_process';

export interface WrkRun {
  url: string;
  connections: number;
  seconds: number;
  /** taskset CPU list for wrk. */
  cpus: string;
  /** Ask for the latency distribution (p50, p99). */
  latency?: boolean;
  /** Send `Connection: close`: every request on a new connection. */
  close?: boolean;
  /** A request slower than this counts as a timeout error (wrk's default is 2 s; a 64 MiB body may need more). */
  timeoutS?: number;
  /** Aborting it kills wrk (the harness was interrupted). */
  signal?: AbortSignal;
}

export interface WrkResult {
  requests: number;
  durationS: number;
  rps: number;
  /** wrk's Transfer/sec, in MiB/s (wrk's units are powers of 1024). */
  mibPerS: number;
  p50Us?: number;
  p99Us?: number;
  /** Socket errors and non-2xx responses, when there were any. */
  errors?: string;
  /** CPU time wrk itself used (user + system), ms; from bash's `times`. */
  cpuMs?: number;
  raw: string;
}

const TIME: Record<string, number> = { us: 1, ms: 1e3, s: 1e6, m: 60e6, h: 3600e6 };
const BYTES: Record<string, number> = { B: 1, KB: 1024, MB: 1024 ** 2, GB: 1024 ** 3, TB: 1024 ** 4 };

function percentileUs(out: string, p: string): number | undefined {
  const m = new RegExp(`^\\s+${p}(?:\\.0+)?%\\s+([\\d.]+)(us|ms|s|m|h)\\s*$`, 'm').exec(out);
  return m ? Number(m[1]) * TIME[m[2]!]! : undefined;
}

/** Parses wrk 4's report; throws when it holds no request count (wrk failed). */
export function parseWrk(out: string): WrkResult {
  const done = /(\d+) requests in ([\d.]+)(us|ms|s|m|h),/.exec(out);
  if (!done) throw new Error(`wrk printed no result:\n${out}`);
  const transfer = /Transfer\/sec:\s+([\d.]+)(B|KB|MB|GB|TB)/.exec(out);
  const socket = /Socket errors: (.*)/.exec(out)?.[1];
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1];
  const errors = [socket && `socket errors: ${socket}`, non2xx && `${non2xx} non-2xx responses`].filter(Boolean).join('; ');
  const durationS = (Number(done[2]) * TIME[done[3]!]!) / 1e6;
  return {
    requests: Number(done[1]),
    durationS,
    rps: Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1] ?? Number(done[1]) / durationS),
    mibPerS: transfer ? (Number(transfer[1]) * BYTES[transfer[2]!]!) / 1024 ** 2 : 0,
    p50Us: percentileUs(out, '50'),
    p99Us: percentileUs(out, '99'),
    errors: errors || undefined,
    raw: out,
  };
}

/** bash's `times`: the last line is the children's user and system time. */
function childTimesMs(out: string): number | undefined {
  const m = /(\d+)m([\d.]+)s (\d+)m([\d.]+)s\s*$/.exec(out);
  return m ? (Number(m[1]) * 60 + Number(m[2]) + Number(m[3]) * 60 + Number(m[4])) * 1000 : undefined;
}

/**
 * Runs wrk once (under bash, whose `times` then reports wrk's CPU time);
 * rejects with wrk's own words when it fails or completes no request.
 */
export function wrk(r: WrkRun): Promise<WrkResult> {
  const wrkArgs = ['-t1', `-c${r.connections}`, `-d${r.seconds}s`, '--timeout', `${r.timeoutS ?? 2}s`];
  if (r.latency) wrkArgs.push('--latency');
  if (r.close) wrkArgs.push('-H', 'Connection: close');
  wrkArgs.push(r.url);
  // wrk runs in the background so that a TERM/INT to bash (an abort) reaches it through the trap.
  const script = 'wrk "$@" & w=$!; trap "kill $w; wait $w; exit 143" TERM INT; wait $w; rc=$?; times; exit $rc';
  const args = ['-c', r.cpus, 'bash', '-c', script, 'wrk', ...wrkArgs];
  return new Promise((resolve, reject) => {
    execFile('taskset', args, { timeout: (r.seconds + 60) * 1000, signal: r.signal }, (e, stdout, stderr) => {
      if (e) return reject(new Error(`wrk ${wrkArgs.join(' ')} failed: ${e.message}\n${stdout}${stderr}`));
      let res: WrkResult;
      try {
        res = { ...parseWrk(stdout), cpuMs: childTimesMs(stdout) };
      } catch (err) {
        return reject(err instanceof Error ? err : new Error(String(err)));
      }
      if (res.requests === 0 && res.mibPerS === 0) return reject(new Error(`wrk completed no request against ${r.url}:\n${stdout}`));
      resolve(res);
    });
  });
}
