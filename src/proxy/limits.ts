/**
 * What every proxied TCP connection is held to: socket options (Nagle off,
 * keepalive probes), an idle timeout, and caps on how many connections a
 * listener and the whole host may hold at once.
 *
 * Defaults are the ones a Linkerd user already lives with:
 * - TCP_NODELAY on every socket knit copies between. A proxy that keeps
 *   Nagle on adds the peer's delayed-ACK time (40 ms on Linux) to any
 *   exchange of small writes; Linkerd, Envoy and HAProxy all disable it.
 *   Bulk-only services may keep Nagle (`noDelay: false`) to send fewer,
 *   fuller segments.
 * - Keepalive probes after 10 s idle, as Linkerd's proxy-injector sets
 *   (`LINKERD2_PROXY_INBOUND_ACCEPT_KEEPALIVE` and `..._OUTBOUND_CONNECT_KEEPALIVE`
 *   = 10000ms). Node (libuv 1.46) sets only the idle time (TCP_KEEPIDLE);
 *   the interval and count are the kernel's (75 s x 9 by default), so a
 *   peer that vanished is found after about 10 s + 11 min.
 * - An idle timeout of 1 h (Envoy's TCP proxy default): a connection on
 *   which no byte moved either way for that long is closed, so a peer that
 *   vanished without a RST cannot hold two file descriptors forever even
 *   where keepalive probes are dropped or answered by a middlebox.
 * - Caps: 4096 connections per upstream listener (each costs two file
 *   descriptors), 16384 per host, shared by every listener of the node
 *   proxy: each application connection accepted or dialled, each HBONE
 *   stream's connection to its application and each HBONE connection
 *   accepted takes a slot. Over a cap a connection is refused at once with a
 *   RST (an HBONE stream with a 503), counted and logged at a bounded rate.
 */
import type { Socket } from 'node:net';

/** Per-socket behaviour of a proxied connection. */
export interface TcpOptions {
  /** Disable Nagle's algorithm (TCP_NODELAY). Default true. */
  noDelay: boolean;
  /** TCP keepalive idle time before the first probe, in ms; 0 turns keepalive off. Default 10 000. */
  keepAliveMs: number;
  /** Close a connection on which nothing moved either way for this long, in ms; 0 never. Default 3 600 000. */
  idleTimeoutMs: number;
}

/** See the module doc for why these values. */
export const DEFAULT_TCP: Readonly<TcpOptions> = Object.freeze({ noDelay: true, keepAliveMs: 10_000, idleTimeoutMs: 3_600_000 });

/** Connections one upstream listener may hold. */
export const DEFAULT_MAX_CONNECTIONS = 4096;
/** Connections all of a host's proxies may hold together, when the agent shares one host limit. */
export const DEFAULT_MAX_HOST_CONNECTIONS = 16_384;

/** Fills in the defaults of a partial `TcpOptions`, rejecting nonsense early. */
export function tcpOptions(o: Partial<TcpOptions> = {}): TcpOptions {
  const t = { ...DEFAULT_TCP, ...stripUndefined(o) };
  for (const k of ['keepAliveMs', 'idleTimeoutMs'] as const) {
    if (!Number.isFinite(t[k]) || t[k] < 0) throw new RangeError(`${k} must be a non-negative number of ms, got ${t[k]}`);
  }
  return t;
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/**
 * Applies Nagle and keepalive settings to a TCP socket (not a TLS socket:
 * pass the TCP socket under it). Safe before the socket connects; Node
 * applies both once it does.
 */
export function tuneSocket(s: Socket, t: TcpOptions): void {
  s.setNoDelay(t.noDelay);
  if (t.keepAliveMs > 0) s.setKeepAlive(true, t.keepAliveMs);
}

/** A slot taken from a `ConnectionLimit` and every limit above it; release is idempotent. */
export interface Lease {
  release(): void;
}

/** Why a connection was refused: the name of the first limit that was full, and its size. */
export interface OverLimit {
  scope: string;
  max: number;
}

/**
 * A count of open connections with a cap, optionally nested in a wider
 * one (a listener's limit inside the host's). Taking a slot takes one at
 * every level or none.
 */
export class ConnectionLimit {
  private n = 0;
  /** This limit and every one above it, innermost first. */
  private readonly levels: readonly ConnectionLimit[];

  /**
   * @param scope a name for logs and metric labels: 'listener', 'host'
   * @param max connections allowed at once; must be at least 1
   * @param parent a wider limit every slot is also taken from
   */
  constructor(
    readonly scope: string,
    readonly max: number,
    readonly parent?: ConnectionLimit,
  ) {
    if (!Number.isInteger(max) || max < 1) throw new RangeError(`a ${scope} connection limit must be a positive integer, got ${max}`);
    this.levels = [this, ...(parent?.levels ?? [])];
  }

  /** A limit nested in this one. */
  child(scope: string, max: number): ConnectionLimit {
    return new ConnectionLimit(scope, max, this);
  }

  /** Open connections counted here. */
  get open(): number {
    return this.n;
  }

  /** Takes a slot here and in every parent, or none and says which limit was full. */
  acquire(): Lease | OverLimit {
    const full = this.levels.find((l) => l.n >= l.max);
    if (full) return { scope: full.scope, max: full.max };
    for (const l of this.levels) l.n++;
    let held = true;
    return {
      release: () => {
        if (!held) return;
        held = false;
        for (const l of this.levels) l.n--;
      },
    };
  }
}

/** True when `acquire` was refused. */
export function isOverLimit(r: Lease | OverLimit): r is OverLimit {
  return 'scope' in r;
}

/** The refusal every limit gives, for logs and HBONE reason headers. */
export function overLimitReason(o: OverLimit): string {
  return `${o.scope} connection limit (${o.max}) reached`;
}

/**
 * The admission every listener applies to a socket it accepted: a slot of
 * `limit` (given back when the socket closes) and the socket options. The
 * refusal is returned, not acted on: the caller counts, logs and resets.
 */
export function admitSocket(s: Socket, limit: ConnectionLimit, tcp: TcpOptions): { admitted: true } | { admitted: false; refusal: OverLimit; reason: string } {
  const lease = limit.acquire();
  if (isOverLimit(lease)) return { admitted: false, refusal: lease, reason: overLimitReason(lease) };
  s.once('close', () => lease.release());
  tuneSocket(s, tcp);
  return { admitted: true };
}
