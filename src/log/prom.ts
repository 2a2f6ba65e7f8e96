/**
 * The parts of prom-client knit uses, loaded one by one.
 *
 * `import ... from 'prom-client'` loads the package's index, which loads
 * everything: Summary (and tdigest), the Pushgateway (http, https), the
 * cluster aggregator, and `collectDefaultMetrics`, whose CPU collector
 * requires @opentelemetry/api for exemplars knit never records. Measured on
 * Node 20: ~1 MB of resident memory for the registry and the three metric
 * types, against ~8 MB for the index, ~6.5 MB of it @opentelemetry/api.
 * Every agent pays it, so the agent loads only what it uses: the registry,
 * Counter, Gauge and Histogram, and each process collector of
 * `collectDefaultMetrics` but the CPU one, which is written here with the
 * same names and meaning.
 *
 * These are prom-client's own files (lib/*.js; the package has no
 * `exports` map), typed with the package's declarations. package.json
 * allows patch releases only (~15.1), and log/metrics.test.ts checks the
 * process metrics a Prometheus user expects are all there.
 */
import { createRequire } from 'node:module';
import type * as Prom from 'prom-client';

const require = createRequire(import.meta.url);

export const Registry = require('prom-client/lib/registry') as typeof Prom.Registry;
export const Counter = require('prom-client/lib/counter') as typeof Prom.Counter;
export const Gauge = require('prom-client/lib/gauge') as typeof Prom.Gauge;
export const Histogram = require('prom-client/lib/histogram') as typeof Prom.Histogram;
export type Registry = Prom.Registry;
export type Counter = Prom.Counter;
export type Gauge = Prom.Gauge;
export type Histogram = Prom.Histogram;

/** prom-client's process collectors (lib/metrics/*.js), in `collectDefaultMetrics`' order, without processCpuTotal. */
const COLLECTORS = [
  'processStartTime',
  'osMemoryHeap',
  'processOpenFileDescriptors',
  'processMaxFileDescriptors',
  'eventLoopLag',
  'processResources',
  'processHandles',
  'processRequests',
  'heapSizeAndUsed',
  'heapSpacesSizeAndUsed',
  'version',
  'gc',
] as const;

type Collector = (registry: Prom.Registry, config: { eventLoopMonitoringPrecision: number }) => void;

/**
 * What `collectDefaultMetrics({ register })` registers, with the same names
 * and help texts: process CPU (`process_cpu_seconds_total`, and its user
 * and system parts), resident memory, file descriptors, start time, event
 * loop lag, handles, heap and GC.
 */
export function collectProcessMetrics(register: Prom.Registry, o: { eventLoopMonitoringPrecision: number }): void {
  collectCpu(register);
  for (const name of COLLECTORS) (require(`prom-client/lib/metrics/${name}`) as Collector)(register, o);
}

/** process_cpu_{user,system,}_seconds_total, as prom-client's collector counts them (the delta since the last scrape). */
function collectCpu(register: Prom.Registry): void {
  let last = process.cpuUsage();
  const counter = (name: string, help: string, collect?: () => void): Prom.Counter => new Counter({ name, help, registers: [register], ...(collect ? { collect } : {}) });
  // One collect sets all three, as prom-client's does: the user counter is listed first, so it runs first.
  const user = counter('process_cpu_user_seconds_total', 'Total user CPU time spent in seconds.', () => {
    const now = process.cpuUsage();
    const [u, s] = [now.user - last.user, now.system - last.system];
    last = now;
    user.inc(u / 1e6);
    system.inc(s / 1e6);
    total.inc((u + s) / 1e6);
  });
  const system = counter('process_cpu_system_seconds_total', 'Total system CPU time spent in seconds.');
  const total = counter('process_cpu_seconds_total', 'Total user and system CPU time spent in seconds.');
}
