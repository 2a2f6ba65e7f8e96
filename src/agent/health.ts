/**
 * Health checks: http (2xx passing, 429 warning, anything else critical),
 * tcp (connect = passing) and ttl (passing until the TTL runs out without a
 * fresh report). A service's health is the worst of its checks; a service
 * without checks is passing.
 */
import net from 'node:net';
import { request, Agent as UndiciAgent, type Dispatcher } from 'undici';
import type { CheckDefinition } from '../config/services.js';
import type { HealthStatus } from '../registry/registry.js';
import { splitHostPort } from '../config/node-config.js';

const RANK: Record<HealthStatus, number> = { passing: 0, warning: 1, critical: 2 };

/** The worst of several statuses; passing when there are none. */
export function worst(list: HealthStatus[]): HealthStatus {
  return list.reduce<HealthStatus>((w, s) => (RANK[s] > RANK[w] ? s : w), 'passing');
}

/** Maps an HTTP status code to a check status, as Consul does. */
export function httpStatusToHealth(code: number): HealthStatus {
  if (code >= 200 && code < 300) return 'passing';
  if (code === 429) return 'warning';
  return 'critical';
}

/** One check's result with the output a user would want to see. */
export interface CheckResult {
  status: HealthStatus;
  output: string;
}

/**
 * Runs an http check once. `insecure` is the dispatcher for a check with
 * `tls_skip_verify`: its owner (the CheckRunner) makes it once and closes it.
 */
export async function runHttpCheck(c: CheckDefinition, insecure?: Dispatcher): Promise<CheckResult> {
  try {
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries(c.headers ?? {})) headers[k] = v.join(', ');
    const res = await request(c.target!, {
      method: (c.method ?? 'GET'),
      headers,
      signal: AbortSignal.timeout(c.timeoutMs),
      dispatcher: c.tlsSkipVerify ? insecure : undefined,
    });
    await res.body.dump();
    return { status: httpStatusToHealth(res.statusCode), output: `HTTP ${c.method ?? 'GET'} ${c.target}: ${res.statusCode}` };
  } catch (e) {
    const why = (e as Error).name === 'TimeoutError' ? `timed out after ${c.timeoutMs} ms` : (e as Error).message;
    return { status: 'critical', output: `HTTP ${c.method ?? 'GET'} ${c.target}: ${why}` };
  }
}

/** Runs a tcp check once. */
export function runTcpCheck(c: CheckDefinition): Promise<CheckResult> {
  const target = c.target!;
  const { host, port } = splitHostPort(target);
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    const done = (r: CheckResult): void => {
      clearTimeout(timer);
      s.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => done({ status: 'critical', output: `TCP ${target}: timed out after ${c.timeoutMs} ms` }), c.timeoutMs);
    s.once('connect', () => done({ status: 'passing', output: `TCP ${target}: connected` }));
    s.once('error', (e) => done({ status: 'critical', output: `TCP ${target}: ${e.message}` }));
  });
}

/** A running check: probes on its interval (or waits for TTL reports) and reports changes. */
export class CheckRunner {
  private state: CheckResult;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** Only for `tls_skip_verify` checks; never shared between checks. */
  private readonly insecure: UndiciAgent | undefined;

  constructor(
    readonly def: CheckDefinition,
    private readonly onChange: (r: CheckResult) => void,
  ) {
    this.state = { status: def.initialStatus, output: 'not yet run' };
    this.insecure = def.kind === 'http' && def.tlsSkipVerify ? new UndiciAgent({ connect: { rejectUnauthorized: false } }) : undefined;
  }

  get result(): CheckResult {
    return this.state;
  }

  private set(r: CheckResult): void {
    const changed = r.status !== this.state.status;
    this.state = r;
    if (changed && !this.stopped) this.onChange(r);
  }

  /** Starts probing; the first probe runs at once and is awaited, so a service starts with a real status. */
  async start(): Promise<void> {
    if (this.def.kind === 'ttl') {
      this.armTtl();
      return;
    }
    await this.probe();
  }

  private async probe(): Promise<void> {
    if (this.stopped) return;
    const r = this.def.kind === 'http' ? await runHttpCheck(this.def, this.insecure) : await runTcpCheck(this.def);
    this.set(r);
    if (!this.stopped) this.timer = setTimeout(() => void this.probe(), this.def.intervalMs);
  }

  private armTtl(): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.set({ status: 'critical', output: `TTL of ${this.def.ttlMs} ms expired without an update` }), this.def.ttlMs);
  }

  /** A TTL report (`knit` admin API, Consul's /v1/agent/check/pass|warn|fail). */
  report(status: HealthStatus, output = ''): void {
    if (this.def.kind !== 'ttl') throw new Error(`check ${this.def.id} is not a ttl check`);
    this.set({ status, output: output || `TTL report: ${status}` });
    this.armTtl();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    void this.insecure?.close();
  }
}
