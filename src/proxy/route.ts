/**
 * Choosing an endpoint for a connection: round-robin over the healthy
 * instances, from a random start (so that many proxies, or many
 * connections at once, do not all begin on the same instance), skipping
 * the ones passive outlier detection has ejected.
 *
 * Outlier detection, as Envoy's `consecutive_*` detectors and Linkerd's
 * consecutive-failure accrual do it: an endpoint that fails
 * `consecutiveFailures` attempts in a row (refused, timed out, wrong
 * identity) is ejected for a backoff period that doubles with each
 * ejection (`baseEjectionMs`, 2x, 4x, ... capped at `maxEjectionMs`, plus
 * up to `jitter` of it at random so that proxies do not probe in step).
 * When its period is over the endpoint is on probation: one connection at
 * a time may try it; a failure ejects it again at once for the next, longer
 * period; a success restores it fully. A black-holed endpoint therefore
 * costs a few connections the connect timeout, not every one.
 *
 * Never all of them: when every endpoint not yet tried for a connection is
 * ejected, the one that failed least recently is tried anyway (Envoy's
 * `max_ejection_percent` and Linkerd's fail-open serve the same purpose):
 * an outlier detector must not turn a partial outage into a total one.
 *
 * Pure bookkeeping: no sockets, an injected clock and random source.
 */

/** How endpoints are ejected. */
export interface OutlierOptions {
  /** Failures in a row that eject an endpoint. Default 5 (Envoy's consecutive_local_origin_failure). */
  consecutiveFailures: number;
  /** First ejection period, in ms. Default 1 000 (Linkerd's failure-accrual minimum penalty). */
  baseEjectionMs: number;
  /** Longest ejection period, in ms. Default 60 000 (Linkerd's maximum penalty). */
  maxEjectionMs: number;
  /** Up to this fraction of the period is added at random. Default 0.5 (Linkerd's jitter ratio). */
  jitter: number;
}

/** See OutlierOptions for where each value comes from. */
export const DEFAULT_OUTLIER: Readonly<OutlierOptions> = Object.freeze({ consecutiveFailures: 5, baseEjectionMs: 1_000, maxEjectionMs: 60_000, jitter: 0.5 });

/** How a Router keys endpoints, its outlier settings, and its clock and random source. */
export interface RouterOptions<E> {
  /** A stable key of an endpoint (address:port); state follows the key across endpoint updates. */
  key: (e: E) => string;
  outlier?: Partial<OutlierOptions>;
  /** The clock, in ms. Default Date.now. */
  now?: () => number;
  /** A number in [0, 1). Default Math.random. */
  random?: () => number;
}

/** What `failure` did to the endpoint. */
export type FailureOutcome = { ejected: false; consecutive: number } | { ejected: true; forMs: number; ejections: number };

/** An endpoint's state, for the admin API and tests. */
export interface EndpointState {
  key: string;
  consecutiveFailures: number;
  /** Ejections since its last success (0: healthy). */
  ejections: number;
  /** Until when it is skipped, if it is ejected now. */
  ejectedUntil?: number;
}

interface State {
  consecutive: number;
  ejections: number;
  ejectedUntil: number;
  lastFailure: number;
  /** A probation attempt is in flight: other connections skip the endpoint until it reports. */
  probing: boolean;
}

/** Round-robin endpoint choice with passive outlier detection (see the module doc). */
export class Router<E> {
  private list: E[] = [];
  private readonly state = new Map<string, State>();
  private next = 0;
  private readonly o: OutlierOptions;
  private readonly now: () => number;
  private readonly random: () => number;

  constructor(private readonly opts: RouterOptions<E>) {
    this.o = { ...DEFAULT_OUTLIER, ...Object.fromEntries(Object.entries(opts.outlier ?? {}).filter(([, v]) => v !== undefined)) };
    if (!Number.isInteger(this.o.consecutiveFailures) || this.o.consecutiveFailures < 1) throw new RangeError(`consecutiveFailures must be a positive integer, got ${this.o.consecutiveFailures}`);
    this.now = opts.now ?? Date.now;
    this.random = opts.random ?? Math.random;
  }

  /**
   * Replaces the endpoint set. Endpoints that stay keep their failure
   * state (an update from the registry does not pardon a black hole);
   * the ones that left are forgotten. Round-robin restarts at random.
   */
  setEndpoints(list: readonly E[]): void {
    this.list = [...list];
    const keep = new Set(list.map(this.opts.key));
    for (const k of [...this.state.keys()]) if (!keep.has(k)) this.state.delete(k);
    this.next = list.length ? Math.floor(this.random() * list.length) : 0;
  }

  /** The current endpoints. */
  get endpoints(): readonly E[] {
    return this.list;
  }

  /**
   * The endpoint for the next attempt of a connection that already tried
   * `tried` (keys): the next in round-robin that is neither tried, ejected
   * nor being probed; else, so that something is always tried, the
   * untried one that failed least recently. Undefined when every endpoint
   * was tried. Every endpoint returned must be reported to `success` or
   * `failure`.
   */
  pick(tried: ReadonlySet<string> = new Set()): E | undefined {
    const n = this.list.length;
    const t = this.now();
    for (let i = 0; i < n; i++) {
      const idx = (this.next + i) % n;
      const e = this.list[idx]!;
      const k = this.opts.key(e);
      if (tried.has(k)) continue;
      const st = this.state.get(k);
      if (st && (t < st.ejectedUntil || st.probing)) continue;
      this.next = (idx + 1) % n;
      if (st && st.ejections > 0) st.probing = true;
      return e;
    }
    let best: E | undefined;
    let bestAt = Infinity;
    for (const e of this.list) {
      const k = this.opts.key(e);
      if (tried.has(k)) continue;
      const at = this.state.get(k)?.lastFailure ?? -Infinity;
      if (at < bestAt) {
        best = e;
        bestAt = at;
      }
    }
    return best;
  }

  /** The endpoint carried a connection: it is healthy again. Returns true if it had been ejected. */
  success(e: E): boolean {
    const k = this.opts.key(e);
    const st = this.state.get(k);
    this.state.delete(k);
    return !!st && st.ejections > 0;
  }

  /** An attempt on the endpoint failed; ejects it when that makes too many in a row (see the module doc). */
  failure(e: E): FailureOutcome {
    const k = this.opts.key(e);
    if (!this.list.some((x) => this.opts.key(x) === k)) return { ejected: false, consecutive: 0 };
    const t = this.now();
    let st = this.state.get(k);
    if (!st) {
      st = { consecutive: 0, ejections: 0, ejectedUntil: 0, lastFailure: 0, probing: false };
      this.state.set(k, st);
    }
    st.lastFailure = t;
    st.probing = false;
    // Attempts begun before the ejection report late; they do not lengthen it.
    if (t < st.ejectedUntil) return { ejected: false, consecutive: st.consecutive };
    st.consecutive++;
    if (st.ejections === 0 && st.consecutive < this.o.consecutiveFailures) return { ejected: false, consecutive: st.consecutive };
    st.ejections++;
    st.consecutive = 0;
    const base = Math.min(this.o.maxEjectionMs, this.o.baseEjectionMs * 2 ** Math.min(st.ejections - 1, 30));
    const forMs = Math.round(base * (1 + this.o.jitter * this.random()));
    st.ejectedUntil = t + forMs;
    return { ejected: true, forMs, ejections: st.ejections };
  }

  /** Every endpoint's state, for the admin API and tests. */
  states(): EndpointState[] {
    const t = this.now();
    return this.list.map((e) => {
      const key = this.opts.key(e);
      const st = this.state.get(key);
      return {
        key,
        consecutiveFailures: st?.consecutive ?? 0,
        ejections: st?.ejections ?? 0,
        ...(st && t < st.ejectedUntil ? { ejectedUntil: st.ejectedUntil } : {}),
      };
    });
  }
}
