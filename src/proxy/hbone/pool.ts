/**
 * The HBONE client pool: long-lived mutual-TLS HTTP/2 connections
 * ("tunnels") to other agents, each carrying many application connections
 * as CONNECT streams, as ztunnel's pool does.
 *
 * - Keyed by {source identity, destination identity, destination agent}:
 *   a tunnel proves exactly one identity at each end, so the destination
 *   decides every stream on it with the identity the tunnel proved; a
 *   stream never borrows another service's identity.
 * - At most `maxStreams` streams per tunnel (or fewer if the server says
 *   so); a new tunnel only when every tunnel of the key is full.
 * - Exactly one dial per key at a time: under a burst of a thousand
 *   callers, one handshake, and the rest wait for it.
 * - A tunnel with no stream for `idleMs` is closed; a broken one (closed,
 *   GOAWAY, error) leaves the pool at once and is never handed out.
 * - A tunnel lives no longer than either certificate it was made with:
 *   it is closed `EXPIRY_LEAD_MS` before the earlier expiry. After a renewal of the source's
 *   certificate (`retire`), existing tunnels take no new streams and close
 *   when their last stream ends; new tunnels use the new certificate.
 */
import http2, { type ClientHttp2Session, type ClientHttp2Stream } from 'node:http2';
import type { TLSSocket } from 'node:tls';
import { KnitError } from '../../errors.js';
import { CONNECTION_WINDOW, DEFAULT_MAX_STREAMS, DEFAULT_TUNNEL_IDLE_MS, H2_SETTINGS } from './wire.js';

/** Who a tunnel is between. */
export interface TunnelKey {
  /** The source service's SPIFFE ID (the certificate the client presents). */
  source: string;
  /** The destination service's SPIFFE ID (the certificate the server must present). */
  destination: string;
  /** The destination agent's HBONE address, `host:port`. */
  agent: string;
}

/** A verified TLS connection to a destination agent, and how long its certificates are good for. */
export interface DialedTunnel {
  socket: TLSSocket;
  /** The earlier of the two certificates' expiry: the tunnel closes then. */
  notAfter: number;
  /**
   * Nagle as configured (TcpOptions.noDelay), set again once HTTP/2 has the
   * socket: Node's Http2Session turns Nagle off on every socket it is given,
   * which would silently override `noDelay: false`.
   */
  noDelay?: boolean;
}

export interface PoolOptions {
  /** Connects and verifies (TLS, ALPN h2, the destination's identity); rejects with a reason. */
  dial: (key: TunnelKey) => Promise<DialedTunnel>;
  maxStreams?: number;
  idleMs?: number;
  now?: () => number;
  /** Told when a tunnel opens or closes (metrics, logs). */
  onTunnel?: (event: 'open' | 'close', key: TunnelKey, streams: number, why?: string) => void;
}

interface Tunnel {
  key: TunnelKey;
  session: ClientHttp2Session;
  /** Streams open on it (counted when handed out, before the request). */
  active: number;
  /** Streams it may carry at once: ours, or the server's if lower. */
  limit: number;
  /** Takes no new stream (renewed certificate, GOAWAY); closes when its last stream ends. */
  retiring: boolean;
  closed: boolean;
  /** Streams it carried in all, for the streams-per-tunnel figure. */
  carried: number;
  idleTimer?: NodeJS.Timeout;
  expiryTimer?: NodeJS.Timeout;
}

/**
 * How long before the earlier certificate's expiry the client closes a
 * tunnel. The server ends the session at the client certificate's expiry
 * too (accept/hbone.ts): a client that waited for the same instant would
 * race it (and lose to a server clock a little ahead), and its tunnel would
 * end as a bare "closed" instead of "certificate expired". A second covers
 * the skew of NTP-synchronised hosts; renewals replace certificates long
 * before this matters.
 */
const EXPIRY_LEAD_MS = 1_000;

const keyString = (k: TunnelKey): string => `${k.source}\u0000${k.destination}\u0000${k.agent}`;

export class HbonePool {
  private readonly tunnels = new Map<string, Tunnel[]>();
  private readonly dialing = new Map<string, Promise<Tunnel>>();
  private readonly maxStreams: number;
  private readonly idleMs: number;
  private readonly now: () => number;
  private closing = false;

  constructor(private readonly o: PoolOptions) {
    this.maxStreams = o.maxStreams ?? DEFAULT_MAX_STREAMS;
    this.idleMs = o.idleMs ?? DEFAULT_TUNNEL_IDLE_MS;
    this.now = o.now ?? Date.now;
  }

  /**
   * Opens a CONNECT stream to `authority` through a tunnel of `key`,
   * dialling one if every tunnel of the key is full (one dial per key at a
   * time). Rejects when the tunnel cannot be had (the dial's reason).
   */
  async open(key: TunnelKey, authority: string, headers: Record<string, string> = {}): Promise<{ stream: ClientHttp2Stream; tunnel: string }> {
    if (this.closing) throw new KnitError('KNIT_ERR_CLOSED', 'the HBONE pool is closed');
    const t = await this.checkout(key);
    let stream: ClientHttp2Stream;
    try {
      stream = t.session.request({ ':method': 'CONNECT', ':authority': authority, ...headers }, { endStream: false });
    } catch (e) {
      this.release(t);
      this.drop(t, `request failed: ${(e as Error).message}`);
      throw new KnitError('KNIT_ERR_NO_ENDPOINT', `HBONE tunnel to ${key.agent} broke: ${(e as Error).message}`, { cause: e });
    }
    t.carried++;
    stream.once('close', () => this.release(t));
    return { stream, tunnel: `${key.source} -> ${key.destination} @ ${key.agent}` };
  }

  /** A tunnel of `key` with a free stream, reserved for the caller. */
  private async checkout(key: TunnelKey): Promise<Tunnel> {
    const k = keyString(key);
    for (;;) {
      const free = (this.tunnels.get(k) ?? []).find((t) => !t.closed && !t.retiring && t.active < t.limit && !t.session.destroyed && !t.session.closed);
      if (free) {
        free.active++;
        clearTimeout(free.idleTimer);
        return free;
      }
      let pending = this.dialing.get(k);
      if (!pending) {
        pending = this.dial(key).finally(() => this.dialing.delete(k));
        this.dialing.set(k, pending);
      }
      // Everyone waiting on the same dial loops back: the new tunnel, if not full, is theirs.
      await pending;
    }
  }

  private async dial(key: TunnelKey): Promise<Tunnel> {
    const { socket, notAfter, noDelay } = await this.o.dial(key);
    const session = http2.connect(`https://${key.agent}`, {
      createConnection: () => socket,
      settings: { ...H2_SETTINGS, enablePush: false },
    });
    // On the socket HTTP/2 was given (a TLS socket passes it to the TCP socket under it).
    if (noDelay !== undefined) socket.setNoDelay(noDelay);
    const t: Tunnel = { key, session, active: 0, limit: this.maxStreams, retiring: false, closed: false, carried: 0 };
    session.on('error', () => undefined);
    session.once('close', () => this.drop(t, 'closed'));
    session.once('goaway', () => {
      t.retiring = true;
      if (t.active === 0) this.drop(t, 'GOAWAY');
    });
    session.on('remoteSettings', (s: http2.Settings) => {
      if (s.maxConcurrentStreams !== undefined) t.limit = Math.max(1, Math.min(this.maxStreams, s.maxConcurrentStreams));
    });
    session.once('connect', () => session.setLocalWindowSize(CONNECTION_WINDOW));
    // The tunnel dies with the earlier of its certificates, a little before it (see EXPIRY_LEAD_MS).
    t.expiryTimer = setTimeout(() => this.drop(t, 'certificate expired'), Math.max(0, Math.min(notAfter - EXPIRY_LEAD_MS - this.now(), 2 ** 31 - 1)));
    t.expiryTimer.unref();
    const k = keyString(key);
    const list = this.tunnels.get(k) ?? [];
    list.push(t);
    this.tunnels.set(k, list);
    this.o.onTunnel?.('open', key, 0);
    this.idle(t);
    return t;
  }

  private release(t: Tunnel): void {
    t.active = Math.max(0, t.active - 1);
    if (t.active > 0) return;
    if (t.retiring) this.drop(t, 'retired');
    else this.idle(t);
  }

  private idle(t: Tunnel): void {
    clearTimeout(t.idleTimer);
    t.idleTimer = setTimeout(() => {
      if (t.active === 0) this.drop(t, 'idle');
    }, this.idleMs);
    t.idleTimer.unref();
  }

  /** Takes a tunnel out of the pool and closes it (its open streams are reset). */
  private drop(t: Tunnel, why: string): void {
    if (t.closed) return;
    t.closed = true;
    clearTimeout(t.idleTimer);
    clearTimeout(t.expiryTimer);
    const k = keyString(t.key);
    const list = (this.tunnels.get(k) ?? []).filter((x) => x !== t);
    if (list.length) this.tunnels.set(k, list);
    else this.tunnels.delete(k);
    if (!t.session.destroyed) t.session.destroy();
    this.o.onTunnel?.('close', t.key, t.carried, why);
  }

  /** After a renewal of `source`'s certificate: its tunnels take no new stream and close once idle. */
  retire(source: string): void {
    for (const list of this.tunnels.values()) {
      for (const t of list) {
        if (t.key.source !== source) continue;
        t.retiring = true;
        if (t.active === 0) this.drop(t, 'retired');
      }
    }
  }

  /** Closes every tunnel matching `pred` now (a service stopped, a node revoked). */
  closeWhere(pred: (k: TunnelKey) => boolean, why: string): void {
    for (const list of [...this.tunnels.values()]) for (const t of [...list]) if (pred(t.key)) this.drop(t, why);
  }

  /** Tunnels and their streams, for the admin API and tests. */
  stats(): Array<{ key: TunnelKey; active: number; carried: number; retiring: boolean }> {
    return [...this.tunnels.values()].flat().map((t) => ({ key: t.key, active: t.active, carried: t.carried, retiring: t.retiring }));
  }

  close(): void {
    this.closing = true;
    for (const list of [...this.tunnels.values()]) for (const t of [...list]) this.drop(t, 'pool closed');
  }
}
