/**
 * Medians over rounds, the printed table, and bench/results/latest.json.
 *
 * latest.json is for scripts comparing runs: for every path and workload
 * an object with the same keys (rps, p50_us, p99_us, conns_per_s,
 * mb_per_s, cpu_ms_per_1k, rss_mb_peak; null where a figure does not
 * apply), the ratios, and each round's value of the workload's main figure.
 */
import type { PathKey } from './paths.js';

export type WorkloadKey = 'keepalive_c1' | 'keepalive_c16' | 'keepalive_c64' | 'new_conns_c16' | 'bulk_c1' | 'idle';

/** One measurement of one path in one workload (one round). */
export interface Sample {
  rps?: number;
  p50Us?: number;
  p99Us?: number;
  connsPerS?: number;
  mibPerS?: number;
  cpuMsPer1k?: number;
  rssMbPeak?: number;
  rssMb?: number;
  /** Idle only: VmRSS of each proxy process (with its helpers), MiB. */
  rssByProcess?: Record<string, number>;
  errors?: string;
  probe?: Record<string, number | string>;
  /** Share of the server CPU, and of the load generator's, that other processes used during the run, %. */
  foreignPct?: number;
  foreignLoadPct?: number;
}

/** The figures of one path in one workload, as written to latest.json. */
export interface Figures {
  rps: number | null;
  p50_us: number | null;
  p99_us: number | null;
  conns_per_s: number | null;
  mb_per_s: number | null;
  cpu_ms_per_1k: number | null;
  rss_mb_peak: number | null;
  /** Derived and extra figures. */
  p50_added_us: number | null;
  p99_added_us: number | null;
  vcpu_per_1k_rps: number | null;
  rss_mb: number | null;
  x_direct: number | null;
  x_haproxy: number | null;
  /** knit's paths against the Node floor of the same design (--floor): knit_agents / node_h2, knit_dev / node_tcp. */
  x_floor: number | null;
  /** The workload's main figure in every round (rps, conns_per_s, mb_per_s or rss). */
  rounds: number[];
  errors: string[];
  probe?: Record<string, number | string>;
  rss_by_process?: Record<string, number>;
  /** Median share of the server CPU and of the load generator's CPU used by processes not in the benchmark during these runs, %. */
  foreign_cpu_pct: number | null;
  foreign_loadgen_cpu_pct: number | null;
}

export const WORKLOAD_LABELS: Record<WorkloadKey, string> = {
  keepalive_c1: 'keep-alive, 1 connection (sequential; latency)',
  keepalive_c16: 'keep-alive, 16 connections (proxy CPU: the headline cpu_ms_per_1k)',
  keepalive_c64: 'keep-alive, 64 connections (proxy RSS peak)',
  new_conns_c16: 'new connections (Connection: close), 16 concurrent (cpu_ms_per_1k: per 1,000 connections)',
  bulk_c1: 'bulk 64 MiB responses, 1 connection',
  idle: 'idle after start (3 services per agent)',
};

const median = (xs: number[]): number | null => {
  const v = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2;
};
const round = (x: number | null, digits = 1): number | null => (x === null ? null : Number(x.toFixed(digits)));
const pick = (samples: Sample[], f: (s: Sample) => number | undefined): number[] => samples.map(f).filter((x): x is number => x !== undefined);

/** The workload's main figure of a sample. */
function main(w: WorkloadKey, s: Sample): number | undefined {
  if (w === 'new_conns_c16') return s.connsPerS;
  if (w === 'bulk_c1') return s.mibPerS;
  if (w === 'idle') return s.rssMb;
  return s.rps;
}

/** Medians of each figure over the rounds, ratios against direct and HAProxy (for the workload's main figure). */
export function summarize(samples: Record<PathKey, Partial<Record<WorkloadKey, Sample[]>>>): Record<PathKey, Partial<Record<WorkloadKey, Figures>>> {
  const out = {} as Record<PathKey, Partial<Record<WorkloadKey, Figures>>>;
  const keys = Object.keys(samples) as PathKey[];
  for (const p of keys) {
    out[p] = {};
    for (const [w, list] of Object.entries(samples[p]) as Array<[WorkloadKey, Sample[]]>) {
      const rss = median(pick(list, (s) => s.rssMb));
      const cpu = median(pick(list, (s) => s.cpuMsPer1k));
      out[p][w] = {
        rps: round(median(pick(list, (s) => s.rps)), 0),
        p50_us: round(median(pick(list, (s) => s.p50Us))),
        p99_us: round(median(pick(list, (s) => s.p99Us))),
        conns_per_s: round(median(pick(list, (s) => s.connsPerS)), 0),
        mb_per_s: round(median(pick(list, (s) => s.mibPerS))),
        cpu_ms_per_1k: round(cpu, 2),
        rss_mb_peak: round(median(pick(list, (s) => s.rssMbPeak))),
        p50_added_us: null,
        p99_added_us: null,
        // cpu ms per 1,000 requests at 1,000 requests/s is that many ms of CPU per second.
        vcpu_per_1k_rps: cpu === null ? null : round(cpu / 1000, 3),
        rss_mb: round(rss),
        x_direct: null,
        x_haproxy: null,
        x_floor: null,
        foreign_cpu_pct: round(median(pick(list, (s) => s.foreignPct))),
        foreign_loadgen_cpu_pct: round(median(pick(list, (s) => s.foreignLoadPct))),
        rounds: pick(list, (s) => main(w, s)).map((x) => Number(x.toFixed(1))),
        errors: list.map((s) => s.errors).filter((e): e is string => !!e),
        ...(list.some((s) => s.probe) ? { probe: list.find((s) => s.probe)!.probe } : {}),
        ...(list[0]?.rssByProcess ? { rss_by_process: list[0].rssByProcess } : {}),
      };
    }
  }
  for (const p of keys) {
    for (const [w, f] of Object.entries(out[p]) as Array<[WorkloadKey, Figures]>) {
      const d = out.direct?.[w];
      const h = out.haproxy?.[w];
      const value = (x: Figures | undefined): number | null => (x ? (w === 'new_conns_c16' ? x.conns_per_s : w === 'bulk_c1' ? x.mb_per_s : x.rps) : null);
      const ratio = (a: number | null, b: number | null): number | null => (a !== null && b ? round(a / b, 2) : null);
      if (w !== 'idle' && p !== 'direct') f.x_direct = ratio(value(f), value(d));
      if (w !== 'idle' && p !== 'direct' && p !== 'haproxy') f.x_haproxy = ratio(value(f), value(h));
      const floor = p === 'knit_agents' ? out.node_h2?.[w] : p === 'knit_dev' ? out.node_tcp?.[w] : undefined;
      if (w !== 'idle' && floor) f.x_floor = ratio(value(f), value(floor));
      if (p !== 'direct' && d && f.p50_us !== null && d.p50_us !== null) f.p50_added_us = round(f.p50_us - d.p50_us);
      if (p !== 'direct' && d && f.p99_us !== null && d.p99_us !== null) f.p99_added_us = round(f.p99_us - d.p99_us);
    }
  }
  return out;
}

const n0 = (x: number | null | undefined): string => (x === null || x === undefined ? '-' : x.toFixed(0));
const n1 = (x: number | null | undefined): string => (x === null || x === undefined ? '-' : x.toFixed(1));
const ratios = (f: Figures | undefined, isDirect: boolean): string => {
  if (!f || isDirect) return '';
  const parts = [f.x_direct !== null ? `${f.x_direct.toFixed(2)}x direct` : '', f.x_haproxy !== null ? `${f.x_haproxy.toFixed(2)}x haproxy` : '', f.x_floor !== null ? `${f.x_floor.toFixed(2)}x floor` : ''].filter(Boolean);
  return parts.length ? ` (${parts.join(', ')})` : '';
};
const signed = (x: number | null | undefined): string => (x === null || x === undefined ? '' : ` (${x >= 0 ? '+' : ''}${x.toFixed(0)})`);

/** The table: one row per figure, one column per path. */
export function table(figs: Record<PathKey, Partial<Record<WorkloadKey, Figures>>>, order: PathKey[], labels: Record<PathKey, string>): string {
  const col = (f: (x: Partial<Record<WorkloadKey, Figures>>, p: PathKey) => string): string => order.map((p) => f(figs[p] ?? {}, p)).join(' | ');
  const rows: Array<[string, string]> = [
    ['req/s, keep-alive, 1 conn', col((x, p) => `${n0(x.keepalive_c1?.rps)}${ratios(x.keepalive_c1, p === 'direct')}`)],
    ['req/s, keep-alive, 16 conns', col((x, p) => `${n0(x.keepalive_c16?.rps)}${ratios(x.keepalive_c16, p === 'direct')}`)],
    ['req/s, keep-alive, 64 conns', col((x, p) => `${n0(x.keepalive_c64?.rps)}${ratios(x.keepalive_c64, p === 'direct')}`)],
    ['p50 us, 1 conn (added)', col((x) => `${n0(x.keepalive_c1?.p50_us)}${signed(x.keepalive_c1?.p50_added_us)}`)],
    ['p99 us, 1 conn (added)', col((x) => `${n0(x.keepalive_c1?.p99_us)}${signed(x.keepalive_c1?.p99_added_us)}`)],
    ['new conns/s, 16 concurrent', col((x, p) => `${n0(x.new_conns_c16?.conns_per_s)}${ratios(x.new_conns_c16, p === 'direct')}`)],
    ['bulk MiB/s, 1 conn', col((x, p) => `${n0(x.bulk_c1?.mb_per_s)}${ratios(x.bulk_c1, p === 'direct')}`)],
    ['proxy CPU ms / 1k req, 16 conns (vCPU per 1k rps)', col((x) => (x.keepalive_c16?.cpu_ms_per_1k == null ? '-' : `${x.keepalive_c16.cpu_ms_per_1k.toFixed(1)} (${x.keepalive_c16.vcpu_per_1k_rps!.toFixed(3)})`))],
    ['proxy CPU ms / 1k new conns', col((x) => (x.new_conns_c16?.cpu_ms_per_1k == null ? '-' : x.new_conns_c16.cpu_ms_per_1k.toFixed(0)))],
    ['proxy RSS MB, idle after start', col((x) => n1(x.idle?.rss_mb))],
    ['proxy RSS MB, peak in 64-conn run (VmHWM)', col((x) => n1(x.keepalive_c64?.rss_mb_peak))],
  ];
  return [
    `| workload | ${order.map((p) => labels[p]).join(' | ')} |`,
    `|---|${order.map(() => '---').join('|')}|`,
    ...rows.map(([k, v]) => `| ${k} | ${v} |`),
  ].join('\n');
}
