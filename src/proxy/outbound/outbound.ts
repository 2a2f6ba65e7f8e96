/**
 * The outbound proxy of one upstream: a plain TCP listener on
 * 127.0.0.1:<local_bind_port> that the application dials, forwarding each
 * connection over mTLS to a healthy instance of the destination, picked
 * round-robin. The server must prove the destination's SPIFFE ID.
 *
 *   accept -> route (pick endpoint) -> tls connect + verify identity -> forward
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
import { PeerIdentityReader, secureContext, type ServiceTls } from '../tls.js';
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
   * Dropped on renewal so new sessions carry the new leaf.
   */
  private readonly sessions = new Map<string, { ticket: Buffer; peer: string }>();
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
        if (e instanceof KnitError && e.code === 'KNIT_ERR_CERT') return this.fail(app, 'identity', `refusing ${ep.address}:${ep.port}: ${e.message}`);
      }
    }
    this.fail(app, 'connect_error', `cannot reach ${this.o.destination}: ${lastErr}`);
  }

  private connect(ep: Instance): Promise<TLSSocket> {
    return new Promise((resolve, reject) => {
      const key = `${ep.address}:${ep.port}`;
      const ctx = this.ctx;
      const s = tls.connect({
        host: ep.address,
        port: ep.port,
        secureContext: ctx,
        session: this.sessions.get(key)?.ticket,
        rejectUnauthorized: true,
        minVersion: 'TLSv1.3',
        // Identity is a SPIFFE URI, checked below; Node's check only knows DNS names.
        checkServerIdentity: () => undefined,
        servername: undefined,
      });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new KnitError('KNIT_ERR_TIMEOUT', `connect timed out after ${this.o.connectTimeoutMs ?? 5000} ms`));
      }, this.o.connectTimeoutMs ?? 5000);
      let verified: string | undefined;
      s.on('session', (ticket: Buffer) => {
        if (verified && ctx === this.ctx) this.sessions.set(key, { ticket, peer: verified });
      });
      s.once('error', (e: Error) => {
        clearTimeout(timer);
        this.sessions.delete(key);
        reject(e);
      });
      s.once('secureConnect', () => {
        clearTimeout(timer);
        const resumed = s.isSessionReused() ? this.sessions.get(key)?.peer : undefined;
        const peer = resumed ? ({ ok: true, uri: resumed } as const) : this.peers.read(s, this.o.trustDomain);
        const uri = peer.ok ? ('uri' in peer ? peer.uri : peer.id.uri) : undefined;
        if (!peer.ok || uri !== this.expected) {
          this.sessions.delete(key);
          s.destroy();
          reject(new KnitError('KNIT_ERR_CERT', peer.ok ? `server is ${uri}, expected ${this.expected}` : peer.reason));
          return;
        }
        verified = uri;
        s.removeAllListeners('error');
        s.on('error', () => undefined);
        resolve(s);
      });
    });
  }

  async close(drainMs = 0): Promise<void> {
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    const deadline = Date.now() + drainMs;
    while (this.open.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    for (const s of this.open) reset(s);
    await closed;
  }
}
