/**
 * Health checks: http (2xx passing, 429 warning, anything else critical),
 * tcp (connect = passing) and ttl (passing until the TTL runs out without a
 * fresh report). A service's health is the worst of its checks; a service
 * without checks is passing.
 *
 * HTTP checks use node:http/node:https, one connection per probe, as
 * Consul's do (its transport disables keep-alive): a probe then also
 * exercises the service's accept path, no pooled socket races the
 * server's idle timeout into a false critical, and an idle agent holds no
 * sockets. (An HTTP client library would cost every agent ~20 MB.)
 */
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
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

/** How much of a check's answer is read before the connection is dropped: the status is all that counts. */
const MAX_DRAIN_BYTES = 64 * 1024;

/** One probe: resolves with the status code once the answer is read (or MAX_DRAIN_BYTES of it), rejects on error or timeout. */
function probeHttp(c: CheckDefinition): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const url = new URL(c.target!);
    const mod = url.protocol === 'https:' ? https : url.protocol === 'http:' ? http : undefined;
    if (!mod) {
      reject(new Error(`unsupported protocol ${url.protocol}`));
      return;
    }
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries(c.headers ?? {})) headers[k] = v.join(', ');
    let settled = false;
    const finish = (err: Error | undefined, status?: number): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err) reject(err);
      else resolve(status!);
    };
    let req: http.ClientRequest;
    try {
      // agent: false is a fresh connection, closed after the answer (see the module doc).
      req = mod.request(url, { method: c.method ?? 'GET', headers, agent: false, ...(c.tlsSkipVerify ? { rejectUnauthorized: false } : {}) });
    } catch (e) {
      // An invalid header value or method: node refuses it before sending.
      reject(e instanceof Error ? e : new Error(String(e)));
      return;
    }
    const timer = setTimeout(() => {
      finish(Object.assign(new Error(`timed out after ${c.timeoutMs} ms`), { name: 'TimeoutError' }));
      req.destroy();
    }, c.timeoutMs);
    // `on`, not `once`: a destroyed request may report more than one error, and an unheard one would crash the process.
    req.on('error', (e) => finish(e));
    req.once('response', (res) => {
      const status = res.statusCode ?? 0;
      let size = 0;
      res.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_DRAIN_BYTES) {
          finish(undefined, status);
          req.destroy();
        }
      });
      res.on('error', () => finish(undefined, status));
      res.once('end', () => finish(undefined, status));
      // The status line and headers arrived whole: the answer counts even if the body is cut short.
      res.once('close', () => finish(undefined, status));
    });
    req.end();
  });
}

/** Runs an http check once. */
export async function runHttpCheck(c: CheckDefinition): Promise<CheckResult> {
  try {
    const status = await probeHttp(c);
    return { status: httpStatusToHealth(status), output: `HTTP ${c.method ?? 'GET'} ${c.target}: ${status}` };
  } catch (e) {
    return { status: 'critical', output: `HTTP ${c.method ?? 'GET'} ${c.target}: ${(e as Error).message}` };
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

  constructor(
    readonly def: CheckDefinition,
    private readonly onChange: (r: CheckResult) => void,
  ) {
    this.state = { status: def.initialStatus, output: 'not yet run' };
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
    const r = this.def.kind === 'http' ? await runHttpCheck(this.def) : await runTcpCheck(this.def);
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
  }
}
