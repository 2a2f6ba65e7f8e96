/**
 * Self time per function from V8 `.cpuprofile` files (written by
 * `node --cpu-prof`), read from the JSON directly: `nodes` (the call
 * tree, each with a callFrame), `samples` (the node on top of the stack
 * at each tick) and `timeDeltas` (microseconds since the previous tick).
 * A sample lasts until the next one, as Chrome DevTools counts it.
 */
import { readFile } from 'node:fs/promises';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
}
interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface SelfTime {
  /** `name  file:line` */
  fn: string;
  selfMs: number;
  /** Share of the busy time (everything but `(idle)`). */
  pct: number;
}

export interface ProfileSummary {
  file: string;
  /** The profile's own span, CLOCK_MONOTONIC microseconds. */
  startUs: number;
  endUs: number;
  busyMs: number;
  idleMs: number;
  top: SelfTime[];
}

/**
 * Reads one .cpuprofile and returns its `n` functions with the most self
 * time; `root` is cut from script URLs. With `window` (CLOCK_MONOTONIC
 * microseconds, the clock of both V8's profile timestamps and
 * `process.hrtime`), only samples inside it count: the measured rounds,
 * not the start-up.
 */
export async function summarizeProfile(file: string, n: number, root: string, window?: { fromUs: number; toUs: number }): Promise<ProfileSummary> {
  const p = JSON.parse(await readFile(file, 'utf8')) as CpuProfile;
  if (!Array.isArray(p.nodes) || !Array.isArray(p.samples) || !Array.isArray(p.timeDeltas)) throw new Error(`${file} is not a V8 CPU profile`);
  const byId = new Map(p.nodes.map((x) => [x.id, x.callFrame]));
  const selfUs = new Map<string, number>();
  let t = p.startTime;
  const stamps = p.timeDeltas.map((d) => (t += d));
  let idleUs = 0;
  let busyUs = 0;
  for (let i = 0; i < p.samples.length; i++) {
    const dur = Math.max(0, (i + 1 < stamps.length ? stamps[i + 1]! : p.endTime) - stamps[i]!);
    const cf = byId.get(p.samples[i]!);
    if (!cf || (window && (stamps[i]! < window.fromUs || stamps[i]! > window.toUs))) continue;
    if (cf.functionName === '(idle)') {
      idleUs += dur;
      continue;
    }
    busyUs += dur;
    const url = cf.url.replace(/^file:\/\//, '').replace(`${root}/`, '');
    const key = url ? `${cf.functionName || '(anonymous)'}  ${url}:${cf.lineNumber + 1}` : cf.functionName || '(anonymous)';
    selfUs.set(key, (selfUs.get(key) ?? 0) + dur);
  }
  const top = [...selfUs.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, n)
    .map(([fn, us]) => ({ fn, selfMs: us / 1000, pct: busyUs ? (100 * us) / busyUs : 0 }));
  return { file, startUs: p.startTime, endUs: p.endTime, busyMs: busyUs / 1000, idleMs: idleUs / 1000, top };
}
