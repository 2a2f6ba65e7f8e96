/**
 * Keeping each local service's leaf certificate fresh. The key is made
 * here and never leaves the host; the CSR goes to the control plane. A leaf
 * is renewed at a random point between 60% and 90% of its life (Consul's
 * window: spreads a fleet's renewals so a CA restart is not a stampede),
 * and retried with backoff on failure, long before it expires.
 */
import { createCsr, validateLeaf, type SignedLeaf } from './csr.js';
import type { SpiffeId } from './spiffe.js';
import type { ServiceTls } from './tls.js';
import { EVENTS, type Logger } from '../log/logger.js';

/** What the agent needs from the control plane to get certificates. */
export interface CertSigner {
  /**
   * Signs a CSR for a service registered on this agent's node. Rejects
   * KNIT_ERR_CA when refused, a retryable KnitError when unreachable.
   */
  signService(service: string, csrPem: string): Promise<SignedLeaf>;
  /** The roots a peer must chain to. */
  trustBundle(): Promise<string[]>;
}

/** Milliseconds from `now` until a leaf should be renewed; `rand` in [0, 1). */
export function renewalDelay(notBefore: Date, notAfter: Date, now: Date, rand: number): number {
  const life = notAfter.getTime() - notBefore.getTime();
  const at = notBefore.getTime() + life * (0.6 + 0.3 * rand);
  return Math.max(0, at - now.getTime());
}

/** Backoff for a failed renewal: doubling from 1 s, at most a minute, never past a tenth of what is left. */
export function retryDelay(attempt: number, msLeft: number): number {
  return Math.max(1000, Math.min(60_000, 1000 * 2 ** attempt, msLeft / 10));
}

export interface LeafManagerOptions {
  id: SpiffeId;
  /** Name for logs: the service, or `agent`. */
  service: string;
  /** Gets a CSR signed: a service leaf from the control plane, or the agent's own renewal. */
  sign: (csrPem: string) => Promise<SignedLeaf>;
  trustBundle: () => Promise<string[]>;
  /** Stores new material (the agent's identity survives restarts); absent for in-memory leaves. */
  persist?: (t: ServiceTls) => Promise<void>;
  /** Material issued earlier and still valid: used instead of a first issuance. */
  initial?: ServiceTls;
  log: Logger;
  /** Called with new material after every renewal. */
  onRenewed: (t: ServiceTls) => void;
  random?: () => number;
  now?: () => Date;
  /**
   * Schedules the next renewal (or retry) `ms` from now; default setTimeout,
   * unref'd and re-armed past setTimeout's 24.8-day limit. Tests pass one
   * they fire themselves, with `now`, to run a leaf's life in no time.
   */
  schedule?: (fn: () => void, ms: number) => { cancel(): void };
}

/** setTimeout as a canceller; setTimeout caps at 2^31-1 ms (24.8 days), so longer waits are re-armed. */
function scheduleWithTimers(fn: () => void, ms: number): { cancel(): void } {
  const MAX = 2 ** 31 - 1;
  let timer: NodeJS.Timeout;
  const arm = (left: number): void => {
    timer = setTimeout(() => (left > MAX ? arm(left - MAX) : fn()), Math.min(left, MAX));
    timer.unref();
  };
  arm(ms);
  return { cancel: () => clearTimeout(timer) };
}

/** One service's leaf: obtained once, then renewed forever until stopped. */
export class LeafManager {
  private material: ServiceTls | undefined;
  private notBefore = new Date(0);
  private notAfter = new Date(0);
  private timer: { cancel(): void } | undefined;
  private stopped = false;
  private attempt = 0;

  constructor(private readonly o: LeafManagerOptions) {}

  get current(): ServiceTls {
    if (!this.material) throw new Error(`no certificate for ${this.o.service} yet`);
    return this.material;
  }

  get expires(): Date {
    return this.notAfter;
  }

  /** Issues the first leaf (or adopts `initial`; rejects if it cannot) and schedules renewals. */
  async start(): Promise<ServiceTls> {
    const t = this.o.initial ? this.adopt(this.o.initial) : await this.issue();
    this.schedule();
    return t;
  }

  private now(): Date {
    return (this.o.now ?? (() => new Date()))();
  }

  private adopt(t: ServiceTls): ServiceTls {
    const info = validateLeaf(t.certChainPem, this.o.id, this.now());
    this.material = t;
    this.notBefore = info.notBefore;
    this.notAfter = info.notAfter;
    return t;
  }

  /** Issues a new leaf now. */
  async issue(): Promise<ServiceTls> {
    const now = this.now();
    const { keyPem, csrPem } = await createCsr(this.o.id);
    const signed = await this.o.sign(csrPem);
    const info = validateLeaf(signed.certPem, this.o.id, now);
    const bundle = await this.o.trustBundle();
    const material = { certChainPem: [signed.certPem, ...signed.chainPem].join('\n'), keyPem, trustBundlePem: bundle };
    await this.o.persist?.(material);
    this.material = material;
    this.notAfter = info.notAfter;
    this.notBefore = info.notBefore;
    this.o.log.info({ event: EVENTS.certIssued, service: this.o.service, id: this.o.id.uri, serial: info.serial, notAfter: info.notAfter.toISOString() }, `certificate for ${this.o.service} valid until ${info.notAfter.toISOString()}`);
    return this.material;
  }

  private schedule(delay?: number): void {
    if (this.stopped) return;
    const ms = delay ?? renewalDelay(this.notBefore, this.notAfter, this.now(), (this.o.random ?? Math.random)());
    this.timer?.cancel();
    this.timer = (this.o.schedule ?? scheduleWithTimers)(() => void this.renew(), ms);
  }

  private async renew(): Promise<void> {
    if (this.stopped) return;
    try {
      const t = await this.issue();
      this.attempt = 0;
      if (!this.stopped) this.o.onRenewed(t);
      this.schedule();
    } catch (e) {
      const left = this.notAfter.getTime() - this.now().getTime();
      const wait = retryDelay(this.attempt++, left);
      this.o.log.warn({ event: EVENTS.certRenewFailed, service: this.o.service, err: (e as Error).message, retryInMs: wait, expiresInMs: left }, `renewing certificate of ${this.o.service} failed: ${(e as Error).message}`);
      this.schedule(wait);
    }
  }

  stop(): void {
    this.stopped = true;
    this.timer?.cancel();
  }
}
