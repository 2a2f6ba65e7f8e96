/**
 * Counters, gauges and histograms with labels, rendered in the Prometheus
 * text format on the agent's admin API (`GET /metrics`), plus the process
 * metrics an operator wants from a long-running agent: resident memory,
 * CPU, event-loop lag, GC, open file descriptors.
 *
 * Built on prom-client (the parts loaded by prom.ts), with a Registry owned by each `Metrics` instance:
 * prom-client's global default registry is never used (no module-level
 * state; two agents in one test process do not share counts). Families are
 * created on first use, so call sites name a metric where they count it and
 * nothing has to declare it up front.
 */
import { Counter, Gauge, Histogram, Registry, collectProcessMetrics } from './prom.js';

/** Label name -> value. */
export type Labels = Record<string, string>;

type Kind = 'counter' | 'gauge' | 'histogram';

interface Family {
  kind: Kind;
  /** Fixed at first use, sorted: the exposition lists labels in this order. */
  labelNames: readonly string[];
  metric: Counter | Gauge | Histogram;
  /** Counters: each series' increments not yet handed to prom-client, by `seriesKey`. */
  pending?: Map<string, PendingSeries>;
}

/**
 * A counter series as knit adds to it between scrapes. prom-client's `inc`
 * builds a labels object, hashes and validates it on every call (about a
 * tenth of the outbound agent's JavaScript time per new connection, which
 * makes five of them); knit adds to this instead and hands the sum to
 * prom-client when the registry collects (a scrape, `render()`, `get()`).
 */
interface PendingSeries {
  labels: Labels;
  by: number;
  /** prom-client holds the series already (so a 0 increment need not be handed over). */
  known: boolean;
}

/** What `new Metrics()` collects besides knit's own families. */
export interface MetricsOptions {
  /**
   * prom-client's default process metrics (prom.ts) on this instance's registry
   * (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
   * `nodejs_eventloop_lag_*`, `nodejs_gc_duration_seconds`, heap, handles,
   * file descriptors). Default true; tests that compare exposition text
   * turn them off.
   */
  processMetrics?: boolean;
}

/**
 * How often the event-loop delay monitor samples, in ms. prom-client's
 * default is 10 ms, i.e. 100 wake-ups a second for an otherwise idle agent
 * (~0.5% of a core measured on Node 20); 50 ms costs ~0.1% and still
 * records every stall longer than 50 ms, and shorter ones in proportion.
 */
const EVENT_LOOP_SAMPLE_MS = 50;

/**
 * Default histogram buckets, in seconds: prom-client's defaults (5 ms to
 * 10 s), which fit what knit times (TLS and HBONE handshakes, dials).
 */
export const DEFAULT_BUCKETS: readonly number[] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/**
 * The state of a prom-client metric that `render()` and `get()` read.
 * prom-client only exposes it through async methods (`get()`, `Registry.metrics()`,
 * because a collect callback may be async), and `render()` must stay
 * synchronous for its callers, so these read the same fields directly.
 * metrics.test.ts checks that `render()` equals `await registry.metrics()`
 * byte for byte: a prom-client release that moves them fails there, and
 * package.json allows patch releases only (~15.1).
 */
interface MetricState {
  name: string;
  help: string;
  type: string;
  collect?: () => unknown;
  upperBounds?: readonly number[];
  hashMap: Record<string, SeriesState>;
}
interface SeriesState {
  labels: Record<string, string | number>;
  /** Counters and gauges. */
  value?: number;
  /** Histograms: observations per upper bound (not cumulative), their sum and count. */
  bucketValues?: Record<string, number>;
  sum?: number;
  count?: number;
}

const state = (m: Counter | Gauge | Histogram | object): MetricState => m as unknown as MetricState;

// The exposition format's escaping, as prom-client's registry does it.
const escapeText = (v: string): string => v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');
const escapeValue = (v: string | number): string => (typeof v === 'string' ? escapeText(v).replace(/"/g, '\\"') : String(v));
const num = (v: number): string => (Number.isNaN(v) ? 'Nan' : v === Infinity ? '+Inf' : v === -Infinity ? '-Inf' : String(v));
const labelPairs = (l: Record<string, string | number>): string[] => Object.entries(l).map(([k, v]) => `${k}="${escapeValue(v)}"`);
const braces = (parts: string[]): string => (parts.length ? `{${parts.join(',')}}` : '');

/** One string per label set of a family: each value in `labelNames` order (absent ones '', as `fit` makes them), length-prefixed so no two sets meet. */
function seriesKey(labelNames: readonly string[], labels: Labels): string {
  let key = '';
  for (const k of labelNames) {
    const v = labels[k] ?? '';
    key += `${v.length}:${v}`;
  }
  return key;
}

/** Hands a counter's pending increments to prom-client. */
function flush(counter: Counter, pending: Map<string, PendingSeries>): void {
  for (const s of pending.values()) {
    if (s.by === 0 && s.known) continue;
    counter.inc(s.labels, s.by);
    s.by = 0;
    s.known = true;
  }
}

/** A set of metric families and the registry that holds them. */
export class Metrics {
  /**
   * This instance's prom-client registry, for what the methods below do
   * not cover (`await registry.metrics()`, OpenMetrics, merging). Register
   * nothing on prom-client's global registry instead.
   */
  readonly registry = new Registry();
  private readonly families = new Map<string, Family>();

  constructor(opts: MetricsOptions = {}) {
    if (opts.processMetrics ?? true) collectProcessMetrics(this.registry, { eventLoopMonitoringPrecision: EVENT_LOOP_SAMPLE_MS });
  }

  /**
   * The family `name`, created on first use as `kind` with the label names
   * of `labels`. Using one name as two kinds is a programming error: it
   * throws a TypeError (on the first call that does it, so any test that
   * reaches the call finds it).
   */
  private family(kind: Kind, name: string, help: string, labels: Labels, buckets?: readonly number[]): Family {
    const f = this.families.get(name);
    if (f) {
      if (f.kind !== kind) throw new TypeError(`metric ${name} is a ${f.kind}; it cannot be used as a ${kind}`);
      return f;
    }
    // Sorted, so that the text lists labels alphabetically whatever order a call site writes them in.
    const labelNames = Object.keys(labels).sort();
    const config = { name, help, labelNames, registers: [this.registry] };
    const pending = kind === 'counter' ? new Map<string, PendingSeries>() : undefined;
    const metric: Counter | Gauge | Histogram =
      kind === 'counter'
        ? new Counter({ ...config, collect(this: Counter): void { flush(this, pending!); } })
        : kind === 'gauge' ? new Gauge(config) : new Histogram({ ...config, buckets: [...(buckets ?? DEFAULT_BUCKETS)] });
    const created: Family = { kind, labelNames, metric, pending };
    this.families.set(name, created);
    return created;
  }

  /**
   * `labels` fitted to the family's label names, in their (sorted) order: a
   * label the family has and the call does not is '' ; a label the call has
   * and the family does not is dropped. The label names of a family are
   * those of its first use, and a later call with others must not throw in
   * the middle of a connection's handling.
   */
  private fit(f: Family, labels: Labels): Labels {
    const out: Labels = {};
    for (const k of f.labelNames) out[k] = labels[k] ?? '';
    return out;
  }

  /**
   * Adds `by` (default 1; anything but a finite number >= 0 throws a RangeError) to a
   * counter. The family's label names are those of its first use; see `fit`.
   */
  inc(name: string, help: string, labels: Labels = {}, by = 1): void {
    if (!(by >= 0) || by === Infinity) throw new RangeError(`counter ${name}: cannot add ${by}`);
    const f = this.family('counter', name, help, labels);
    const key = seriesKey(f.labelNames, labels);
    const series = f.pending!.get(key);
    if (series) series.by += by;
    else f.pending!.set(key, { labels: this.fit(f, labels), by, known: false });
  }

  /** Sets a gauge. The family's label names are those of its first use: missing ones are '', extra ones dropped. */
  set(name: string, help: string, labels: Labels, value: number): void {
    const f = this.family('gauge', name, help, labels);
    (f.metric as Gauge).set(this.fit(f, labels), value);
  }

  /**
   * Records `value` in a histogram (seconds, for durations: the Prometheus
   * convention). `buckets` (upper bounds, default `DEFAULT_BUCKETS`) and
   * label names are fixed at the family's first use; later values for
   * either are ignored (labels as in `set`).
   */
  observe(name: string, help: string, labels: Labels, value: number, buckets?: readonly number[]): void {
    const f = this.family('histogram', name, help, labels, buckets);
    (f.metric as Histogram).observe(this.fit(f, labels), value);
  }

  /**
   * Current value of one series of a knit family (tests and `knit check`):
   * a counter's or gauge's value, a histogram's number of observations; 0
   * for a series or family never used. Labels are fitted as in `inc`.
   */
  get(name: string, labels: Labels = {}): number {
    const f = this.families.get(name);
    if (!f) return 0;
    if (f.pending) flush(f.metric as Counter, f.pending);
    const want = this.fit(f, labels);
    for (const s of Object.values(state(f.metric).hashMap)) {
      if (f.labelNames.every((k) => String(s.labels[k] ?? '') === want[k])) return (f.kind === 'histogram' ? s.count : s.value) ?? 0;
    }
    return 0;
  }

  /**
   * Prometheus exposition text (format 0.0.4) of every family, the process
   * metrics included: what `await this.registry.metrics()` returns, made
   * synchronously. Families appear in the order they were first used, each
   * followed by a blank line; labels in alphabetical order.
   */
  render(): string {
    const blocks: string[] = [];
    for (const metric of this.registry.getMetricsAsArray()) {
      const m = state(metric);
      // prom-client's process metrics update themselves here; all of them are synchronous in 15.x.
      const pending = m.collect?.call(metric);
      if (pending instanceof Promise) pending.catch(() => undefined);
      const name = escapeText(m.name);
      const lines = [`# HELP ${name} ${escapeText(m.help)}`, `# TYPE ${name} ${m.type}`];
      for (const s of Object.values(m.hashMap)) {
        const own = labelPairs(s.labels);
        if (m.type === 'histogram') {
          let cumulative = 0;
          for (const bound of m.upperBounds ?? []) {
            cumulative += s.bucketValues?.[bound] ?? 0;
            lines.push(`${name}_bucket${braces([`le="${bound}"`, ...own])} ${num(cumulative)}`);
          }
          lines.push(`${name}_bucket${braces(['le="+Inf"', ...own])} ${num(s.count ?? 0)}`);
          lines.push(`${name}_sum${braces(own)} ${num(s.sum ?? 0)}`, `${name}_count${braces(own)} ${num(s.count ?? 0)}`);
        } else {
          lines.push(`${name}${braces(own)} ${num(s.value ?? 0)}`);
        }
      }
      blocks.push(lines.join('\n'));
    }
    return `${blocks.join('\n\n')}\n`;
  }

  /** The content type of `render()`'s text, for the `/metrics` response. */
  get contentType(): string {
    return this.registry.contentType;
  }
}
