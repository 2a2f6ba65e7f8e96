/**
 * The outbound proxy of one upstream: a plain TCP listener on
 * 127.0.0.1:<local_bind_port> that the application dials, forwarding each
 * connection over mTLS to a healthy instance of the destination. The server
 * must prove the destination's SPIFFE ID.
 *
 *   accept (cap) -> route (pick endpoint) -> dial (tcp + tls, one deadline)
 *     -> verify chain + SVID + ID -> forward (splice)
 *          ^-- on refusal, timeout or wrong identity: next endpoint --'
 *
 * The TLS client lets the handshake finish (`rejectUnauthorized: false`)
 * and knit decides before any byte of the application's data is sent, so a
 * server that fails on identity (a chain that does not reach the trust
 * bundle, an expired leaf, a leaf that is not a valid X.509-SVID for a
 * server, or another ID than `spiffe://<td>/ns/<ns>/svc/<destination>`) is
 * a refusal of that endpoint, counted with its reason in
 * `knit_outbound_rejected_total{reason}`, not a "cannot reach".
 *
 * An endpoint that is refused on identity, refuses the connection or times
 * out is skipped and the next one tried, within the same application
 * connection (at most `maxAttempts` endpoints). Endpoints that keep failing
 * are ejected for a while (../route.ts), so a black-holed one does not cost
 * every new connection the connect timeout. When every attempt failed, the
 * application's connection is reset (result `identity` if the last endpoint
 * failed on identity, else `connect_error`); with no endpoint at all it is
 * reset at once (`no_endpoint`): it fails fast, it does not hang.
 *
 * The forwarded pair behaves like TCP (../forward/splice.ts): half-close,
 * resets passed on as resets, Nagle off, keepalive and an idle timeout
 * (../limits.ts). Refusals and failures are counted one by one and logged
 * at a bounded rate (../../log/ratelimit.ts).
 */
import tls, { type TLSSocket } from 'node:tls';
import net, { type Socket } from 'node:net';
import { once } from 'node:events';
import { EVENTS, type Logger } from '../../log/logger.js';
import type { Metrics } from '../../log/metrics.js';
import { RateLimitedLog } from '../../log/ratelimit.js';
import { KnitError } from '../../errors.js';
import { serviceId } from '../../identity/spiffe.js';
import type { Instance } from '../../registry/registry.js';
import { PeerIdentityReader, peerChainVerdict, secureContext, verdictDetail, type ChainVerdict, type ServiceTls } from '../tls.js';
import { reset, splice } from '../forward/splice.js';
import { dialTls, DialError, type MeshConnection } from '../forward/dial.js';
import { SessionCache, type Proven, type Resumption } from '../forward/sessions.js';
import { Router, type OutlierOptions } from '../route.js';
import { ConnectionLimit, DEFAULT_MAX_CONNECTIONS, isOverLimit, tcpOptions, tuneSocket, type TcpOptions } from '../limits.js';

/** What an upstream listener needs; every field with a default may be left out. */
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
  /** Deadline for the TCP connect plus TLS handshake to one endpoint. Default 5000 ms (Consul's upstream `connect_timeout_ms`). */
  connectTimeoutMs?: number;
  /** Endpoints tried for one application connection before giving up. Default 3. */
  maxAttempts?: number;
  /** Nagle, keepalive and idle timeout of the forwarded sockets (defaults in ../limits.ts). */
  tcp?: Partial<TcpOptions>;
  /** Connections this listener may hold at once. Default 4096. */
  maxConnections?: number;
  /** The host's limit, shared by every proxy of the agent; this listener's limit is nested in it. */
  hostLimit?: ConnectionLimit;
  /** Passive outlier detection of endpoints (defaults in ../route.ts). */
  outlier?: Partial<OutlierOptions>;
  /** Rate-limited logging; pass one to share its budget between proxies. Default: one per proxy. */
  logLimit?: RateLimitedLog;
  /** The clock (ms) and random source; injectable for tests. */
  now?: () => number;
  random?: () => number;
}

const M_CONN = 'knit_outbound_connections_total';
const M_HELP = 'Outbound application connections by result';
const M_REJECT = 'knit_outbound_rejected_total';
const M_REJECT_HELP = 'Outbound endpoint attempts refused because the endpoint failed on identity (chain, expiry, SVID shape, ID), by reason';
const M_ATTEMPT_FAIL = 'knit_outbound_endpoint_failures_total';
const M_ATTEMPT_FAIL_HELP = 'Attempts to one endpoint that failed (identity, refused, timeout, error); the next endpoint is tried';
const M_EJECT = 'knit_outbound_ejections_total';
const M_EJECT_HELP = 'Endpoints ejected by passive outlier detection after consecutive failures';
const M_OVER = 'knit_outbound_over_limit_total';
const M_OVER_HELP = 'Application connections refused because a connection cap was reached, by limit';
const M_IDLE = 'knit_outbound_idle_closed_total';
const M_IDLE_HELP = 'Outbound connections closed because nothing moved either way for the idle timeout';

/** A server whose identity was refused: counted with its reason; the next endpoint is tried. */
class IdentityRefused extends KnitError {
  /** OpenSSL's code and message, for the log line. */
  readonly detail: { verifyCode?: string; openssl?: string; text: string };
  constructor(
    readonly reason: string,
    chain?: ChainVerdict,
  ) {
    const detail = chain ? verdictDetail(chain) : { text: '' };
    super('KNIT_ERR_CERT', `${reason}${detail.text}`);
    this.detail = detail;
  }
}

const endpointKey = (ep: Instance): string => `${ep.address}:${ep.port}`;

/** One upstream listener. */
export class OutboundProxy {
  private readonly server: net.Server;
  private ctx: tls.SecureContext;
  private readonly peers = new PeerIdentityReader();
  private readonly open = new Set<Socket>();
  /** TLS session tickets per endpoint, each with the identity its full handshake proved (../forward/sessions.ts). */
  private readonly sessions: SessionCache;
  private readonly router: Router<Instance>;
  private readonly limit: ConnectionLimit;
  private readonly tcp: TcpOptions;
  private readonly logLimit: RateLimitedLog;
  private readonly expected: string;
  private readonly labels: { service: string; upstream: string };

  constructor(private readonly o: OutboundOptions) {
    this.ctx = secureContext(o.tls);
    this.expected = serviceId(o.trustDomain, o.destination, o.namespace).uri;
    this.tcp = tcpOptions(o.tcp);
    this.limit = new ConnectionLimit('listener', o.maxConnections ?? DEFAULT_MAX_CONNECTIONS, o.hostLimit);
    this.router = new Router<Instance>({ key: endpointKey, outlier: o.outlier, now: o.now, random: o.random });
    this.sessions = new SessionCache(o.now);
    this.logLimit = o.logLimit ?? new RateLimitedLog(o.log);
    this.labels = { service: o.source, upstream: o.destination };
    // Half-open from the start: the application may shut down its write side right after its request.
    this.server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (s) => void this.handle(s));
  }

  /** Listens; resolves with the bound port. Rejects KNIT_ERR_LISTEN naming the address. */
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

  /**
   * Replaces the endpoint set (a registry snapshot of routable instances).
   * Endpoints that stay keep their outlier state; the session tickets and
   * state of the ones that left are dropped.
   */
  setEndpoints(list: Instance[]): void {
    this.router.setEndpoints(list);
    this.sessions.retain(new Set(list.map(endpointKey)));
    this.o.log.info({ event: EVENTS.endpointsChanged, service: this.o.source, upstream: this.o.destination, endpoints: list.map(endpointKey) }, `${this.o.destination}: ${list.length} healthy endpoint(s)`);
  }

  /** Current endpoints, for the admin API. */
  get endpointList(): Instance[] {
    return [...this.router.endpoints];
  }

  /** Each endpoint's outlier state (consecutive failures, ejections, ejected until), for the admin API. */
  get endpointStates(): ReturnType<Router<Instance>['states']> {
    return this.router.states();
  }

  /** Open forwarded connections. */
  get connections(): number {
    return this.open.size;
  }

  /** Endpoints holding a session ticket (tests, admin API). */
  get sessionCount(): number {
    return this.sessions.size;
  }

  /** New connections present this material; tickets issued to the old one are dropped. */
  setTls(t: ServiceTls): void {
    this.ctx = secureContext(t);
    this.sessions.clear();
  }

  /** Rate-limit key: one budget per event, upstream and reason. */
  private key(event: string, reason: string): string {
    return `${event}|${this.o.source}|${this.o.destination}|${reason}`;
  }

  private fail(app: Socket, result: string, msg: string, extra: Record<string, unknown> = {}): void {
    this.o.metrics.inc(M_CONN, M_HELP, { ...this.labels, result });
    this.logLimit.warn(this.key(EVENTS.connFailed, result), { event: EVENTS.connFailed, ...this.labels, result, ...extra }, msg);
    reset(app);
  }

  /** One endpoint failed for this connection: counted, logged at a bounded rate, fed to outlier detection. */
  private endpointFailed(ep: Instance, e: IdentityRefused | DialError): void {
    const endpoint = endpointKey(ep);
    const kind = e instanceof IdentityRefused ? 'identity' : e.kind;
    this.sessions.forget(endpoint);
    this.o.metrics.inc(M_ATTEMPT_FAIL, M_ATTEMPT_FAIL_HELP, { ...this.labels, reason: kind });
    if (e instanceof IdentityRefused) {
      this.o.metrics.inc(M_REJECT, M_REJECT_HELP, { ...this.labels, reason: e.reason });
      const { text, ...fields } = e.detail;
      this.logLimit.warn(
        this.key(EVENTS.connRejected, e.reason),
        { event: EVENTS.connRejected, ...this.labels, result: 'identity', endpoint, instance: ep.id, reason: e.reason, ...fields },
        `refusing ${this.o.destination} endpoint ${endpoint}: ${e.reason}${text}`,
      );
    } else {
      this.logLimit.warn(
        this.key(EVENTS.endpointFailed, `${kind}|${endpoint}`),
        { event: EVENTS.endpointFailed, ...this.labels, endpoint, instance: ep.id, reason: kind, err: e.message },
        `${this.o.destination} endpoint ${endpoint} failed: ${e.message}`,
      );
    }
    const out = this.router.failure(ep);
    if (out.ejected) {
      this.o.metrics.inc(M_EJECT, M_EJECT_HELP, this.labels);
      this.logLimit.warn(
        this.key(EVENTS.endpointEjected, endpoint),
        { event: EVENTS.endpointEjected, ...this.labels, endpoint, instance: ep.id, reason: kind, forMs: out.forMs, ejections: out.ejections },
        `ejecting ${this.o.destination} endpoint ${endpoint} for ${out.forMs} ms after repeated failures (${kind})`,
      );
    }
  }

  private async handle(app: Socket): Promise<void> {
    app.on('error', () => undefined);
    // accept: the caps, before anything is spent on the connection
    const lease = this.limit.acquire();
    if (isOverLimit(lease)) {
      this.o.metrics.inc(M_OVER, M_OVER_HELP, { ...this.labels, limit: lease.scope });
      this.logLimit.warn(
        this.key(EVENTS.connOverLimit, lease.scope),
        { event: EVENTS.connOverLimit, ...this.labels, limit: lease.scope, max: lease.max },
        `refusing a connection to ${this.o.destination}: ${lease.scope} connection limit (${lease.max}) reached`,
      );
      reset(app);
      return;
    }
    app.once('close', () => lease.release());
    tuneSocket(app, this.tcp);
    if (this.router.endpoints.length === 0) return this.fail(app, 'no_endpoint', `no healthy instance of ${this.o.destination}`);
    // route -> dial -> verify, next endpoint on failure
    const maxAttempts = this.o.maxAttempts ?? 3;
    const tried = new Set<string>();
    let last: IdentityRefused | DialError | undefined;
    for (let i = 0; i < maxAttempts; i++) {
      const ep = this.router.pick(tried);
      if (!ep) break;
      tried.add(endpointKey(ep));
      let up: MeshConnection;
      try {
        up = await this.connect(ep);
      } catch (e) {
        const err = e instanceof IdentityRefused || e instanceof DialError ? e : new DialError('error', (e as Error).message, e);
        this.endpointFailed(ep, err);
        last = err;
        if (app.destroyed) return;
        continue;
      }
      if (this.router.success(ep)) {
        this.o.log.info({ event: EVENTS.endpointRestored, ...this.labels, endpoint: endpointKey(ep), instance: ep.id }, `${this.o.destination} endpoint ${endpointKey(ep)} is back in rotation`);
      }
      if (app.destroyed) {
        // The application gave up while we dialed: nothing to forward.
        up.tls.destroy();
        return;
      }
      // forward
      this.o.metrics.inc(M_CONN, M_HELP, { ...this.labels, result: 'ok' });
      this.open.add(app);
      void splice(app, up.tls, { idleTimeoutMs: this.tcp.idleTimeoutMs }).then((r) => {
        this.open.delete(app);
        if (r.end === 'idle_timeout') {
          this.o.metrics.inc(M_IDLE, M_IDLE_HELP, this.labels);
          this.o.log.debug({ event: EVENTS.connIdleTimeout, ...this.labels, endpoint: endpointKey(ep), idleTimeoutMs: this.tcp.idleTimeoutMs }, 'closed an idle connection');
        }
      });
      return;
    }
    if (!last) return this.fail(app, 'no_endpoint', `no healthy instance of ${this.o.destination}`);
    const result = last instanceof IdentityRefused ? 'identity' : 'connect_error';
    this.fail(app, result, `cannot reach ${this.o.destination} after ${tried.size} endpoint(s): ${last.message}`, { attempts: tried.size });
  }

  /**
   * Dials one endpoint and verifies it. The session ticket and the identity
   * it proved are taken together before the handshake; a ticket the
   * server sends is stored only with the identity this dial verified, and
   * only if no renewal happened meanwhile.
   */
  private async connect(ep: Instance): Promise<MeshConnection> {
    const key = endpointKey(ep);
    const { resume, generation } = this.sessions.take(key);
    // What this dial proved, once verified; a ticket may arrive before that (with the handshake's last
    // flight) and then waits for it.
    const got: { proven?: Proven; early?: Buffer } = {};
    const up = await dialTls({
      host: ep.address,
      port: ep.port,
      secureContext: this.ctx,
      session: resume?.ticket,
      timeoutMs: this.o.connectTimeoutMs ?? 5000,
      tcp: this.tcp,
      onSession: (ticket) => {
        if (got.proven) this.sessions.put(key, generation, ticket, got.proven);
        else got.early = ticket;
      },
    });
    // Nothing has been written to `up` yet: the application's socket is still paused and not piped.
    const v = this.verifyServer(up.tls, resume);
    if (v instanceof IdentityRefused) {
      up.tls.destroy();
      throw v;
    }
    got.proven = v;
    if (got.early) this.sessions.put(key, generation, got.early, v);
    return up;
  }

  /**
   * Whether the server just handshaken with is the destination: OpenSSL's
   * verdict on its chain, its leaf as an X.509-SVID for a server, and its ID
   * equal to the expected URI in full (trust domain, namespace, service).
   * A resumed session shows no certificate; it was verified in the full
   * handshake that issued its ticket, whose proof `resume` carries.
   */
  private verifyServer(s: TLSSocket, resume: Readonly<Resumption> | undefined): Proven | IdentityRefused {
    // OpenSSL keeps the full handshake's verify result with a session, so a resumed one must still be `authorized`.
    const chain = peerChainVerdict(s, 'server');
    if (!chain.ok) return new IdentityRefused(chain.reason, chain);
    if (s.isSessionReused()) {
      if (!resume) return new IdentityRefused('server resumed a TLS session knit did not offer');
      if (resume.peer !== this.expected) return new IdentityRefused(`server is ${resume.peer}, expected ${this.expected}`);
      return { peer: resume.peer, notAfter: resume.notAfter };
    }
    const peer = this.peers.read(s, this.o.trustDomain, 'server');
    if (!peer.ok) return new IdentityRefused(peer.reason);
    if (peer.id.uri !== this.expected) return new IdentityRefused(`server is ${peer.id.uri}, expected ${this.expected}`);
    return { peer: peer.id.uri, notAfter: peer.notAfter.getTime() };
  }

  /**
   * Stops accepting. Open connections may finish for `drainMs`, then are
   * reset; resolves when the listener is closed.
   */
  async close(drainMs = 0): Promise<void> {
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    const deadline = Date.now() + drainMs;
    while (this.open.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    for (const s of this.open) reset(s);
    this.logLimit.flush();
    await closed;
  }
}
