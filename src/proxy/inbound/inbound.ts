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
 */
import tls, { type TLSSocket } from 'node:tls';
import net, { type Socket } from 'node:net';
import { once } from 'node:events';
import { EVENTS, type Logger } from '../../log/logger.js';
import type { Metrics } from '../../log/metrics.js';
import { KnitError } from '../../errors.js';
import type { SpiffeId } from '../../identity/spiffe.js';
import type { Decision } from '../../policy/intentions.js';
import { PeerIdentityReader, peerChainVerdict, tlsOptions, verdictDetail, type ServiceTls } from '../tls.js';
import { reset, splice } from '../splice.js';

/** Dials the local application; injectable for tests and for transparent mode. */
export type Dial = (host: string, port: number) => Socket;

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
  /** How long a TLS handshake may take before the socket is dropped. */
  handshakeTimeoutMs?: number;
}

interface Open {
  socket: TLSSocket;
  source: SpiffeId;
}

const M_CONN = 'knit_inbound_connections_total';
const M_CONN_HELP = 'Inbound mesh connections by decision and the rule that made it';
const M_REJECT = 'knit_inbound_rejected_total';
const M_REJECT_HELP = 'Inbound connections refused before authorization (TLS or identity), by reason';

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
  private readonly server: tls.Server;
  private readonly open = new Set<Open>();
  private readonly peers = new PeerIdentityReader();
  private readonly dial: Dial;
  private readonly namespace: string;
  private authorizeFn: (source: SpiffeId) => Decision;

  constructor(private readonly o: InboundOptions) {
    this.dial = o.dial ?? ((host, port) => net.connect({ host, port }));
    this.namespace = o.namespace ?? 'default';
    this.authorizeFn = o.authorize;
    // A server takes its material as options (a `secureContext` option is ignored
    // for the server's own certificate); renewals go through setSecureContext.
    this.server = tls.createServer({
      ...(o.tls ? tlsOptions(o.tls) : {}),
      requestCert: true,
      // Verification still happens in OpenSSL; knit refuses unverified peers itself in
      // accept() so that every refusal is logged and counted with its reason (Node's
      // own rejection destroys the socket without telling anyone why).
      rejectUnauthorized: false,
      minVersion: 'TLSv1.3',
      handshakeTimeout: o.handshakeTimeoutMs ?? 10_000,
      pauseOnConnect: true,
    });
    this.server.on('secureConnection', (s) => this.accept(s));
    this.server.on('tlsClientError', (err: Error & { code?: string }, s) => this.reject(s, handshakeReason(err)));
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
    this.server.setSecureContext(tlsOptions(t));
  }

  /** Replaces the policy and closes the open connections it now denies. */
  setAuthorize(fn: (source: SpiffeId) => Decision): void {
    this.authorizeFn = fn;
    for (const c of [...this.open]) {
      const d = fn(c.source);
      if (d.allow) continue;
      this.o.log.warn({ event: EVENTS.connClosedByPolicy, service: this.o.service, source: c.source.uri, rule: d.rule }, `closing open connection from ${c.source.uri}: ${d.rule}`);
      this.o.metrics.inc('knit_inbound_closed_by_policy_total', 'Open connections closed because intentions changed to deny them', { service: this.o.service, rule: d.rule });
      c.socket.destroy();
    }
  }

  /** Open, authorized connections. */
  get connections(): number {
    return this.open.size;
  }

  /** Counts `reason` (a short fixed phrase), logs it with `detail` (e.g. OpenSSL's code and message) appended. */
  private reject(s: Socket | TLSSocket, reason: string, extra: Record<string, unknown> = {}, detail = ''): void {
    this.o.metrics.inc(M_REJECT, M_REJECT_HELP, { service: this.o.service, reason });
    this.o.log.warn({ event: EVENTS.connRejected, service: this.o.service, remote: `${s.remoteAddress}:${s.remotePort}`, reason, ...extra }, `refused inbound connection to ${this.o.service}: ${reason}${detail}`);
    s.destroy();
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
      this.o.log.warn({ event: EVENTS.connDenied, service: this.o.service, source: peer.id.uri, rule: d.rule }, `denied ${what.service} -> ${this.o.service}: ${d.rule}`);
      socket.destroy();
      return;
    }
    // forward
    const entry: Open = { socket, source: peer.id };
    this.open.add(entry);
    const app = this.dial(this.o.targetHost, this.o.targetPort);
    app.once('error', (err) => {
      this.o.log.warn({ event: EVENTS.connFailed, service: this.o.service, target: `${this.o.targetHost}:${this.o.targetPort}`, err: err.message }, `local app of ${this.o.service} unreachable`);
      this.o.metrics.inc('knit_inbound_app_errors_total', 'Inbound connections whose local application could not be reached', { service: this.o.service });
    });
    this.o.log.debug({ event: EVENTS.connAccepted, service: this.o.service, source: peer.id.uri, rule: d.rule }, 'accepted');
    void splice(socket, app).then(() => this.open.delete(entry));
  }

  /**
   * Stops accepting. Open connections may finish for `drainMs`, then are
   * closed; resolves when none is left.
   */
  async close(drainMs = 0): Promise<void> {
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    if (this.open.size && drainMs > 0) {
      const deadline = Date.now() + drainMs;
      while (this.open.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    }
    for (const c of this.open) reset(c.socket);
    await closed;
  }
}
