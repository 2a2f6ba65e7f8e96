/**
 * The inbound proxy of one local service: an mTLS listener that only
 * accepts peers whose certificate chains to the trust bundle and is a
 * valid X.509-SVID for a client (see ../tls.ts), reads the peer's SPIFFE
 * ID, asks the policy, and pipes allowed connections to the application on
 * this host.
 *
 *   accept (TLS, client cert required) -> verify chain -> identify -> authorize -> forward
 *
 * Identify compares the whole ID: trust domain, namespace and service; the
 * policy then sees only service names, so a `web -> api` intention can never
 * be met by `web` from another namespace. Every refusal is closed at once,
 * logged with its reason (OpenSSL's code or knit's SVID rule) and counted
 * in `knit_inbound_rejected_total{reason}`. Open connections are
 * re-authorized when intentions change, and the ones now denied are closed.
 * A refusal or denial is a TCP reset (the L4 form of "no"), and the
 * outbound proxy on the other side passes it on to its application.
 *
 * Before TLS, a plain TCP listener admits the connection (per-listener and
 * per-host caps: over a cap it is reset at once, counted in
 * `knit_inbound_over_limit_total{limit}`) and tunes its socket (Nagle off,
 * keepalive), then hands it to the TLS server. The forwarded pair behaves
 * like TCP (../forward/splice.ts): half-close, resets passed on as resets,
 * an idle timeout. Refusals are counted one by one and logged at a bounded
 * rate (../../log/ratelimit.ts), so that a port scan costs a few lines.
 */
import tls, { type TLSSocket } from 'node:tls';
import net, { type Socket } from 'node:net';
import { once } from 'node:events';
import { EVENTS, type Logger } from '../../log/logger.js';
import type { Metrics } from '../../log/metrics.js';
import { RateLimitedLog } from '../../log/ratelimit.js';
import { KnitError } from '../../errors.js';
import type { SpiffeId } from '../../identity/spiffe.js';
import type { Decision } from '../../policy/intentions.js';
import { PeerIdentityReader, peerChainVerdict, tlsOptions, verdictDetail, type ServiceTls } from '../tls.js';
import { reset, splice } from '../forward/splice.js';
import { ConnectionLimit, DEFAULT_MAX_CONNECTIONS, isOverLimit, tcpOptions, tuneSocket, type TcpOptions } from '../limits.js';

/** Dials the local application; injectable for tests and for transparent mode. */
export type Dial = (host: string, port: number) => Socket;

/** What a service's inbound listener needs; every field with a default may be left out. */
export interface InboundOptions {
  /** The local service this listener fronts (the destination of every connection). */
  service: string;
  trustDomain: string;
  /**
   * The namespace whose services may call this one; a peer service ID from
   * any other namespace is refused before the policy is asked. 'default'
   * unless told.
   */
  namespace?: string;
  listenHost: string;
  /** 0 picks a free port. */
  listenPort: number;
  targetHost: string;
  targetPort: number;
  /** Material to serve; absent until the first leaf arrives (handshakes fail until setTls). */
  tls?: ServiceTls;
  /** Decides a connection from `source` to this service. */
  authorize: (source: SpiffeId) => Decision;
  log: Logger;
  metrics: Metrics;
  dial?: Dial;
  /** How long a TLS handshake may take before the socket is dropped. Default 10 000 ms (Consul's `handshake_timeout_ms`). */
  handshakeTimeoutMs?: number;
  /** Nagle, keepalive and idle timeout of the mesh and application sockets (defaults in ../limits.ts). */
  tcp?: Partial<TcpOptions>;
  /** Connections (in handshake or forwarded) this listener may hold at once. Default 4096. */
  maxConnections?: number;
  /** The host's limit, shared by every proxy of the agent; this listener's limit is nested in it. */
  hostLimit?: ConnectionLimit;
  /** Rate-limited logging; pass one to share its budget between proxies. Default: one per proxy. */
  logLimit?: RateLimitedLog;
}

interface Open {
  socket: TLSSocket;
  source: SpiffeId;
  /** Closes the forwarded pair in order (intentions changed). */
  close: AbortController;
}

const M_CONN = 'knit_inbound_connections_total';
const M_CONN_HELP = 'Inbound mesh connections by decision and the rule that made it';
const M_REJECT = 'knit_inbound_rejected_total';
const M_REJECT_HELP = 'Inbound connections refused before authorization (TLS or identity), by reason';
const M_OVER = 'knit_inbound_over_limit_total';
const M_OVER_HELP = 'Inbound connections refused before TLS because a connection cap was reached, by limit';
const M_IDLE = 'knit_inbound_idle_closed_total';
const M_IDLE_HELP = 'Inbound connections closed because nothing moved either way for the idle timeout';
const M_APP = 'knit_inbound_app_errors_total';
const M_APP_HELP = 'Inbound connections whose local application could not be reached';

/**
 * Classifies an OpenSSL handshake error (a handshake that did not finish,
 * `tlsClientError`) into a short reason users can act on. Certificate
 * verification failures do not come here: the handshake finishes and
 * `peerChainVerdict` names them.
 */
export function handshakeReason(err: Error & { code?: string }): string {
  const m = `${err.code ?? ''} ${err.message}`;
  if (/PEER_DID_NOT_RETURN_A_CERTIFICATE|certificate required/i.test(m)) return 'no client certificate';
  if (/CERT_HAS_EXPIRED|certificate expired|certificate has expired/i.test(m)) return 'client certificate expired';
  if (/NOT_YET_VALID|not yet valid/i.test(m)) return 'client certificate not yet valid';
  if (/UNABLE_TO_GET_ISSUER|UNABLE_TO_VERIFY_LEAF_SIGNATURE|CERT_SIGNATURE_FAILURE|unknown ca|self.signed|SELF_SIGNED|unable to verify|certificate verify failed/i.test(m)) return 'client certificate not signed by the trust bundle';
  if (/timeout|ETIMEDOUT/i.test(m)) return 'handshake timeout';
  if (/ECONNRESET|socket hang up/i.test(m)) return 'client closed during handshake';
  if (/wrong version|http request|unknown protocol|WRONG_VERSION_NUMBER|packet length/i.test(m)) return 'not a TLS client';
  return `handshake failed: ${err.message.slice(0, 120)}`;
}

/** One service's inbound listener. */
export class InboundProxy {
  /** Admits TCP connections (caps, socket options) and hands them to `tlsServer`. */
  private readonly server: net.Server;
  /** Never listens: it takes the admitted sockets (`emit('connection')`, as node:tls documents). */
  private readonly tlsServer: tls.Server;
  private readonly open = new Set<Open>();
  private readonly peers = new PeerIdentityReader();
  private readonly dial: Dial;
  private readonly namespace: string;
  private readonly limit: ConnectionLimit;
  private readonly tcp: TcpOptions;
  private readonly logLimit: RateLimitedLog;
  private authorizeFn: (source: SpiffeId) => Decision;

  constructor(private readonly o: InboundOptions) {
    this.dial = o.dial ?? ((host, port) => net.connect({ host, port, allowHalfOpen: true }));
    this.namespace = o.namespace ?? 'default';
    this.authorizeFn = o.authorize;
    this.tcp = tcpOptions(o.tcp);
    this.limit = new ConnectionLimit('listener', o.maxConnections ?? DEFAULT_MAX_CONNECTIONS, o.hostLimit);
    this.logLimit = o.logLimit ?? new RateLimitedLog(o.log);
    // A server takes its material as options (a `secureContext` option is ignored
    // for the server's own certificate); renewals go through setSecureContext.
    this.tlsServer = tls.createServer({
      ...(o.tls ? tlsOptions(o.tls) : {}),
      requestCert: true,
      // Verification still happens in OpenSSL; knit refuses unverified peers itself in
      // accept() so that every refusal is logged and counted with its reason (Node's
      // own rejection destroys the socket without telling anyone why).
      rejectUnauthorized: false,
      minVersion: 'TLSv1.3',
      handshakeTimeout: o.handshakeTimeoutMs ?? 10_000,
    });
    this.tlsServer.on('secureConnection', (s: TLSSocket) => this.accept(s));
    this.tlsServer.on('tlsClientError', (err: Error & { code?: string }, s: TLSSocket) => this.reject(s, handshakeReason(err)));
    // Not half-open during the handshake: a client that closes before finishing it (a port scan)
    // ends at once instead of waiting out the handshake timeout. accept() makes it half-open.
    this.server = net.createServer({ allowHalfOpen: false }, (raw) => this.admit(raw));
  }

  /** Listens; resolves with the bound port. Rejects KNIT_ERR_LISTEN naming the address. */
  async start(): Promise<number> {
    this.server.listen(this.o.listenPort, this.o.listenHost);
    try {
      await once(this.server, 'listening');
    } catch (e) {
      throw new KnitError('KNIT_ERR_LISTEN', `inbound proxy for ${this.o.service} cannot listen on ${this.o.listenHost}:${this.o.listenPort}: ${(e as Error).message}`, { cause: e });
    }
    const port = (this.server.address() as net.AddressInfo).port;
    this.o.log.info({ event: EVENTS.listening, service: this.o.service, role: 'inbound', address: `${this.o.listenHost}:${port}`, target: `${this.o.targetHost}:${this.o.targetPort}` }, `inbound ${this.o.service} listening`);
    return port;
  }

  /** New connections present this material; open ones keep theirs. */
  setTls(t: ServiceTls): void {
    this.tlsServer.setSecureContext(tlsOptions(t));
  }

  /**
   * Replaces the policy and closes the open connections it now denies, in
   * order: both sides get a FIN, as they always have. (A reset would tell an
   * application that reads until EOF that what it got is cut short; whether
   * to switch is a decision for the whole product, as clients see it.)
   */
  setAuthorize(fn: (source: SpiffeId) => Decision): void {
    this.authorizeFn = fn;
    for (const c of [...this.open]) {
      const d = fn(c.source);
      if (d.allow) continue;
      this.logLimit.warn(
        this.key(EVENTS.connClosedByPolicy, d.rule),
        { event: EVENTS.connClosedByPolicy, service: this.o.service, source: c.source.uri, rule: d.rule },
        `closing open connection from ${c.source.uri}: ${d.rule}`,
      );
      this.o.metrics.inc('knit_inbound_closed_by_policy_total', 'Open connections closed because intentions changed to deny them', { service: this.o.service, rule: d.rule });
      c.close.abort();
    }
  }

  /** Open, authorized connections. */
  get connections(): number {
    return this.open.size;
  }

  /** Rate-limit key: one budget per event, service and reason. */
  private key(event: string, reason: string): string {
    return `${event}|${this.o.service}|${reason}`;
  }

  /** accept: the caps and socket options, before a byte of TLS is spent on the connection. */
  private admit(raw: Socket): void {
    raw.on('error', () => undefined);
    const lease = this.limit.acquire();
    if (isOverLimit(lease)) {
      this.o.metrics.inc(M_OVER, M_OVER_HELP, { service: this.o.service, limit: lease.scope });
      this.logLimit.warn(
        this.key(EVENTS.connOverLimit, lease.scope),
        { event: EVENTS.connOverLimit, service: this.o.service, remote: `${raw.remoteAddress}:${raw.remotePort}`, limit: lease.scope, max: lease.max },
        `refusing a connection to ${this.o.service}: ${lease.scope} connection limit (${lease.max}) reached`,
      );
      reset(raw);
      return;
    }
    raw.once('close', () => lease.release());
    tuneSocket(raw, this.tcp);
    this.tlsServer.emit('connection', raw);
  }

  /** Counts `reason` (a short fixed phrase), logs it at a bounded rate with `detail` (e.g. OpenSSL's code and message) appended, resets. */
  private reject(s: Socket | TLSSocket, reason: string, extra: Record<string, unknown> = {}, detail = ''): void {
    this.o.metrics.inc(M_REJECT, M_REJECT_HELP, { service: this.o.service, reason });
    this.logLimit.warn(
      this.key(EVENTS.connRejected, reason),
      { event: EVENTS.connRejected, service: this.o.service, remote: `${s.remoteAddress}:${s.remotePort}`, reason, ...extra },
      `refused inbound connection to ${this.o.service}: ${reason}${detail}`,
    );
    reset(s);
  }

  private accept(socket: TLSSocket): void {
    socket.on('error', () => undefined);
    // verify chain: OpenSSL's verdict against the trust bundle, with its own code
    const chain = peerChainVerdict(socket, 'client');
    if (!chain.ok) {
      const { text, ...fields } = verdictDetail(chain);
      return this.reject(socket, chain.reason, fields, text);
    }
    // identify: an X.509-SVID for a client, a service of our trust domain and namespace
    const peer = this.peers.read(socket, this.o.trustDomain, 'client');
    if (!peer.ok) return this.reject(socket, peer.reason);
    const what = peer.id.what;
    if (what.kind !== 'service') return this.reject(socket, `peer ${peer.id.uri} is not a service identity`);
    if (what.namespace !== this.namespace) return this.reject(socket, `peer ${peer.id.uri} is in namespace ${what.namespace}, ${this.o.service} accepts only namespace ${this.namespace}`);
    // authorize
    const d = this.authorizeFn(peer.id);
    const labels = { service: this.o.service, source: what.service, decision: d.allow ? 'allow' : 'deny', rule: d.rule };
    this.o.metrics.inc(M_CONN, M_CONN_HELP, labels);
    if (!d.allow) {
      this.logLimit.warn(
        this.key(EVENTS.connDenied, `${what.service}|${d.rule}`),
        { event: EVENTS.connDenied, service: this.o.service, source: peer.id.uri, rule: d.rule },
        `denied ${what.service} -> ${this.o.service}: ${d.rule}`,
      );
      reset(socket);
      return;
    }
    // forward
    const entry: Open = { socket, source: peer.id, close: new AbortController() };
    this.open.add(entry);
    const app = this.dial(this.o.targetHost, this.o.targetPort);
    tuneSocket(app, this.tcp);
    let connected = false;
    app.once('connect', () => (connected = true));
    app.once('error', (err) => {
      // A failed connect is the app's absence; a later error is the app resetting, passed on by splice.
      if (!connected) {
        this.o.metrics.inc(M_APP, M_APP_HELP, { service: this.o.service });
        this.logLimit.warn(
          this.key(EVENTS.connFailed, (err as Error & { code?: string }).code ?? 'error'),
          { event: EVENTS.connFailed, service: this.o.service, target: `${this.o.targetHost}:${this.o.targetPort}`, err: err.message },
          `local app of ${this.o.service} unreachable: ${err.message}`,
        );
      }
    });
    this.o.log.debug({ event: EVENTS.connAccepted, service: this.o.service, source: peer.id.uri, rule: d.rule }, 'accepted');
    void splice(socket, app, { idleTimeoutMs: this.tcp.idleTimeoutMs, signal: entry.close.signal }).then((r) => {
      this.open.delete(entry);
      if (r.end === 'idle_timeout') {
        this.o.metrics.inc(M_IDLE, M_IDLE_HELP, { service: this.o.service });
        this.o.log.debug({ event: EVENTS.connIdleTimeout, service: this.o.service, source: peer.id.uri, idleTimeoutMs: this.tcp.idleTimeoutMs }, 'closed an idle connection');
      }
    });
  }

  /**
   * Stops accepting. Open connections may finish for `drainMs`, then are
   * reset; resolves when the listener is closed.
   */
  async close(drainMs = 0): Promise<void> {
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    if (this.open.size && drainMs > 0) {
      const deadline = Date.now() + drainMs;
      while (this.open.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    }
    for (const c of this.open) reset(c.socket);
    this.logLimit.flush();
    await closed;
  }
}
