/**
 * The outbound proxy of one upstream: a plain TCP listener on
 * 127.0.0.1:<local_bind_port> that the application dials, forwarding each
 * connection over mTLS to a healthy instance of the destination, picked
 * round-robin. The server must prove the destination's SPIFFE ID.
 *
 *   accept -> route (pick endpoint) -> tls connect -> verify chain + SVID + ID -> forward
 *
 * The TLS client lets the handshake finish (`rejectUnauthorized: false`)
 * and knit decides before any byte of the application's data is sent, so a
 * server that fails on identity (a chain that does not reach the trust
 * bundle, an expired leaf, a leaf that is not a valid X.509-SVID for a
 * server, or another ID than `spiffe://<td>/ns/<ns>/svc/<destination>`) is
 * a refusal of that endpoint, counted as result `identity` with its reason
 * in `knit_outbound_rejected_total{reason}`, not a "cannot reach".
 *
 * No healthy endpoint, a refused dial or a wrong identity resets the
 * application's connection at once: it fails fast, it does not hang.
 */
import tls, { type TLSSocket } from 'node:tls';
import net, { type Socket } from 'node:net';
import { once } from 'node:events';
import { EVENTS, type Logger } from '../../log/logger.js';
import type { Metrics } from '../../log/metrics.js';
import { KnitError } from '../../errors.js';
import { serviceId } from '../../identity/spiffe.js';
import type { Instance } from '../../registry/registry.js';
import { PeerIdentityReader, peerChainVerdict, secureContext, verdictDetail, type ChainVerdict, type ServiceTls } from '../tls.js';
import { reset, splice } from '../splice.js';

export interface OutboundOptions {
  /** The local service that owns this upstream (its identity is presented). */
  source: string;
  destination: string;
  trustDomain: string;
  namespace?: string;
  listenHost: string;
  listenPort: number;
  tls: ServiceTls;
  log: Logger;
  metrics: Metrics;
  connectTimeoutMs?: number;
  /** Endpoints tried for one connection before giving up. */
  maxAttempts?: number;
}

const M_CONN = 'knit_outbound_connections_total';
const M_HELP = 'Outbound mesh connections by result';
const M_REJECT = 'knit_outbound_rejected_total';
const M_REJECT_HELP = 'Outbound connections refused because the endpoint failed on identity (chain, expiry, SVID shape, ID), by reason';

/** A server whose identity was refused: no retry on another endpoint hides it, and the reason is counted. */
class IdentityRefused extends KnitError {
  /** OpenSSL's code and message, for the log line. */
  readonly detail: { verifyCode?: string; openssl?: string; text: string };
  constructor(readonly reason: string, chain?: ChainVerdict) {
    const detail = chain ? verdictDetail(chain) : { text: '' };
    super('KNIT_ERR_CERT', `${reason}${detail.text}`);
    this.detail = detail;
  }
}

/** A TLS session ticket and what its full handshake proved. */
interface Session {
  ticket: Buffer;
  /** The server's verified SPIFFE ID. */
  peer: string;
  /** The server leaf's expiry: a ticket is not used past it, as a resumed handshake shows no certificate to re-check. */
  notAfter: number;
}

/** One upstream listener. */
export class OutboundProxy {
  private readonly server: net.Server;
  private ctx: tls.SecureContext;
  private endpoints: Instance[] = [];
  private next = 0;
  private readonly peers = new PeerIdentityReader();
  private readonly open = new Set<Socket>();
  /**
   * TLS 1.3 session tickets per endpoint: a resumed handshake skips the
   * certificate exchange and its signatures, several times cheaper than a
   * full one. The server still knows the client's verified identity from
   * the ticket. A resumed session shows the client no certificate, so the
   * server identity proven in the full handshake is kept with the ticket:
   * only the server that holds that session's secret can resume it.
   * Dropped on renewal so new sessions carry the new leaf, on any refusal
   * of the endpoint, and once the server leaf it proved has expired.
   */
  private readonly sessions = new Map<string, Session>();
  private readonly expected: string;

  constructor(private readonly o: OutboundOptions) {
    this.ctx = secureContext(o.tls);
    this.expected = serviceId(o.trustDomain, o.destination, o.namespace).uri;
    this.server = net.createServer({ pauseOnConnect: true }, (s) => void this.handle(s));
  }

  async start(): Promise<number> {
    this.server.listen(this.o.listenPort, this.o.listenHost);
    try {
      await once(this.server, 'listening');
    } catch (e) {
      throw new KnitError('KNIT_ERR_LISTEN', `upstream ${this.o.destination} of ${this.o.source} cannot listen on ${this.o.listenHost}:${this.o.listenPort}: ${(e as Error).message}`, { cause: e });
    }
    const port = (this.server.address() as net.AddressInfo).port;
    this.o.log.info({ event: EVENTS.listening, service: this.o.source, role: 'outbound', upstream: this.o.destination, address: `${this.o.listenHost}:${port}` }, `upstream ${this.o.destination} listening`);
    return port;
  }

  /** Replaces the endpoint set (a registry snapshot of routable instances). */
  setEndpoints(list: Instance[]): void {
    this.endpoints = list;
    this.o.log.info({ event: EVENTS.endpointsChanged, service: this.o.source, upstream: this.o.destination, endpoints: list.map((i) => `${i.address}:${i.port}`) }, `${this.o.destination}: ${list.length} healthy endpoint(s)`);
  }

  /** Current endpoints, for the admin API. */
  get endpointList(): Instance[] {
    return this.endpoints;
  }

  setTls(t: ServiceTls): void {
    this.ctx = secureContext(t);
    this.sessions.clear();
  }

  private fail(app: Socket, result: string, msg: string, extra: Record<string, unknown> = {}): void {
    this.o.metrics.inc(M_CONN, M_HELP, { service: this.o.source, upstream: this.o.destination, result });
    this.o.log.warn({ event: EVENTS.connFailed, service: this.o.source, upstream: this.o.destination, result, ...extra }, msg);
    reset(app);
  }

  /** An endpoint that failed on identity: counted as `identity` with its reason, logged as a refusal of that endpoint. */
  private refuse(app: Socket, ep: Instance, e: IdentityRefused): void {
    const endpoint = `${ep.address}:${ep.port}`;
    this.o.metrics.inc(M_CONN, M_HELP, { service: this.o.source, upstream: this.o.destination, result: 'identity' });
    this.o.metrics.inc(M_REJECT, M_REJECT_HELP, { service: this.o.source, upstream: this.o.destination, reason: e.reason });
    const { text, ...fields } = e.detail;
    this.o.log.warn(
      { event: EVENTS.connRejected, service: this.o.source, upstream: this.o.destination, result: 'identity', endpoint, instance: ep.id, reason: e.reason, ...fields },
      `refusing ${this.o.destination} endpoint ${endpoint}: ${e.reason}${text}`,
    );
    reset(app);
  }

  private async handle(app: Socket): Promise<void> {
    app.on('error', () => undefined);
    const eps = this.endpoints;
    if (eps.length === 0) return this.fail(app, 'no_endpoint', `no healthy instance of ${this.o.destination}`);
    const attempts = Math.min(eps.length, this.o.maxAttempts ?? 3);
    let lastErr = '';
    for (let i = 0; i < attempts; i++) {
      const ep = eps[this.next++ % eps.length]!;
      if (app.destroyed) return;
      try {
        const up = await this.connect(ep);
        if (app.destroyed) {
          up.destroy();
          return;
        }
        this.o.metrics.inc(M_CONN, M_HELP, { service: this.o.source, upstream: this.o.destination, result: 'ok' });
        this.open.add(app);
        void splice(app, up).then(() => this.open.delete(app));
        return;
      } catch (e) {
        lastErr = `${ep.address}:${ep.port}: ${(e as Error).message}`;
        if (e instanceof IdentityRefused) return this.refuse(app, ep, e);
      }
    }
    this.fail(app, 'connect_error', `cannot reach ${this.o.destination}: ${lastErr}`);
  }

  private connect(ep: Instance): Promise<TLSSocket> {
    return new Promise((resolve, reject) => {
      const key = `${ep.address}:${ep.port}`;
      const ctx = this.ctx;
      let cached = this.sessions.get(key);
      if (cached && cached.notAfter <= Date.now()) {
        this.sessions.delete(key);
        cached = undefined;
      }
      const s = tls.connect({
        host: ep.address,
        port: ep.port,
        secureContext: ctx,
        session: cached?.ticket,
        // OpenSSL still verifies the chain; knit reads its verdict on secureConnect (verifyServer),
        // so that a failure is an identity refusal with OpenSSL's reason, not a socket error.
        rejectUnauthorized: false,
        minVersion: 'TLSv1.3',
        // Identity is a SPIFFE URI, checked below; Node's check only knows DNS names.
        checkServerIdentity: () => undefined,
        servername: undefined,
      });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new KnitError('KNIT_ERR_TIMEOUT', `connect timed out after ${this.o.connectTimeoutMs ?? 5000} ms`));
      }, this.o.connectTimeoutMs ?? 5000);
      let verified: { peer: string; notAfter: number } | undefined;
      s.on('session', (ticket: Buffer) => {
        if (verified && ctx === this.ctx) this.sessions.set(key, { ticket, ...verified });
      });
      s.once('error', (e: Error) => {
        clearTimeout(timer);
        this.sessions.delete(key);
        reject(e);
      });
      s.once('secureConnect', () => {
        clearTimeout(timer);
        // Nothing has been written to `s` yet: the application's socket is still paused and not piped.
        const v = this.verifyServer(s, cached);
        if (v instanceof IdentityRefused) {
          this.sessions.delete(key);
          s.destroy();
          reject(v);
          return;
        }
        verified = v;
        s.removeAllListeners('error');
        s.on('error', () => undefined);
        resolve(s);
      });
    });
  }

  /**
   * Whether the server just handshaken with is the destination: OpenSSL's
   * verdict on its chain, its leaf as an X.509-SVID for a server, and its ID
   * equal to the expected URI in full (trust domain, namespace, service).
   * A resumed session shows no certificate; it was verified in the full
   * handshake that issued its ticket, whose proven ID came with the ticket.
   */
  private verifyServer(s: TLSSocket, cached: Session | undefined): { peer: string; notAfter: number } | IdentityRefused {
    // OpenSSL keeps the full handshake's verify result with a session, so a resumed one must still be `authorized`.
    const chain = peerChainVerdict(s, 'server');
    if (!chain.ok) return new IdentityRefused(chain.reason, chain);
    if (s.isSessionReused() && cached) {
      if (cached.peer !== this.expected) return new IdentityRefused(`server is ${cached.peer}, expected ${this.expected}`);
      return { peer: cached.peer, notAfter: cached.notAfter };
    }
    const peer = this.peers.read(s, this.o.trustDomain, 'server');
    if (!peer.ok) return new IdentityRefused(peer.reason);
    if (peer.id.uri !== this.expected) return new IdentityRefused(`server is ${peer.id.uri}, expected ${this.expected}`);
    return { peer: peer.id.uri, notAfter: peer.notAfter.getTime() };
  }

  async close(drainMs = 0): Promise<void> {
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    const deadline = Date.now() + drainMs;
    while (this.open.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    for (const s of this.open) reset(s);
    await closed;
  }
}
