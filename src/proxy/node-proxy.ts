/**
 * The node proxy: one per host, carrying every mesh connection of the
 * host's services, laid out as ztunnel lays out its own.
 *
 * Outbound (an application here connects to one of its upstream ports):
 *   accept (accept/upstream.ts: the port names the source service)
 *   -> route (route.ts: a healthy endpoint, outlier-aware)
 *   -> forward: same host: authorize here and hand the connection to the
 *               local application (no TLS, no tunnel);
 *               another host: a CONNECT stream through a pooled HBONE
 *               tunnel (hbone/pool.ts) proving the source's identity to
 *               the destination's agent, which decides.
 * Inbound (a stream arrives over HBONE):
 *   accept (accept/hbone.ts: TLS with the SNI's certificate, the client's
 *           SVID checked: identify.ts)
 *   -> the stream's :authority must name an instance here of the service
 *      whose identity the tunnel proved
 *   -> authorize (intentions, per stream) -> forward to the local app.
 *
 * Every connection is a Flow (flow.ts). When intentions change, every flow
 * this host enforces is decided again and the denied ones are closed
 * (reset both ways). Refusals are counted in full and logged at a bounded
 * rate; every decision names its rule.
 */
import http2, { type ClientHttp2Stream, type IncomingHttpHeaders, type ServerHttp2Stream } from 'node:http2';
import net, { type Socket } from 'node:net';
import { networkInterfaces } from 'node:os';
import tls from 'node:tls';
import { KnitError } from '../errors.js';
import { PeerIdentityReader } from '../identity/peer.js';
import { serviceId, type SpiffeId } from '../identity/spiffe.js';
import { secureContext, type ServiceTls } from '../identity/tls.js';
import { splitPem } from '../identity/x509.js';
import { EVENTS, type Logger } from '../log/logger.js';
import type { Metrics } from '../log/metrics.js';
import { RateLimitedLog } from '../log/ratelimit.js';
import type { Decision, Evaluator } from '../policy/intentions.js';
import type { Instance } from '../registry/registry.js';
import { HboneServer, type StreamOrigin } from './accept/hbone.js';
import { Upstream } from './accept/upstream.js';
import { Flow, FlowTable } from './flow.js';
import { DialError, dialTls } from './forward/dial.js';
import { reset, splice } from './forward/splice.js';
import { cancel, spliceStream } from './forward/stream.js';
import { HbonePool, type DialedTunnel, type TunnelKey } from './hbone/pool.js';
import { authorityOf, DEFAULT_HBONE_PORT, HBONE_ALPN, parseAuthority, REASON_HEADER, sniFor, STATUS } from './hbone/wire.js';
import { identifyPeer } from './identify.js';
import { ConnectionLimit, DEFAULT_MAX_HOST_CONNECTIONS, isOverLimit, overLimitReason, tcpOptions, tuneSocket, type TcpOptions } from './limits.js';
import { Router, type OutlierOptions } from './route.js';
import { CaptureListener, type OriginalDestination } from './accept/capture.js';
import { X509Certificate } from 'node:crypto';

/** Dials a local application; injectable for tests and for transparent mode. */
export type DialApp = (host: string, port: number) => Socket;

export interface NodeProxyOptions {
  node: string;
  trustDomain: string;
  namespace?: string;
  /** Where the HBONE listener binds, and its port (0: any free port). */
  listenHost: string;
  hbonePort?: number;
  /** The address other hosts reach this one at (instances register it). */
  advertise: string;
  /** The intentions in force; undefined until the first arrive (everything is denied). */
  policy: () => Evaluator | undefined;
  log: Logger;
  metrics: Metrics;
  logLimit?: RateLimitedLog;
  hostLimit?: ConnectionLimit;
  tcp?: Partial<TcpOptions>;
  maxStreams?: number;
  tunnelIdleMs?: number;
  /** Deadline for TCP connect + TLS handshake of a new tunnel. */
  connectTimeoutMs?: number;
  /** Endpoints tried for one application connection. */
  maxAttempts?: number;
  outlier?: Partial<OutlierOptions>;
  dialApp?: DialApp;
  now?: () => number;
  random?: () => number;
}

/** A service of this host, as the proxy knows it. */
export interface LocalService {
  name: string;
  /** The port it is registered with: a stream's :authority names it. 0 for a client-only service. */
  port: number;
  /** Where its application listens. */
  target?: { host: string; port: number };
  /**
   * Transparent mode, a client outside the mesh calling the service's own
   * port: refused (`strict`, the default) or carried and counted as
   * unauthenticated (`permissive`, while clients migrate).
   */
  inbound?: 'strict' | 'permissive';
}

/** Where an outbound connection goes: the service it speaks as, the service it wants, and that service's endpoints. */
export interface OutboundRoute {
  readonly source: string;
  readonly destination: string;
  readonly router: Router<Instance>;
}

/** What transparent mode needs from the agent: the mesh as the registry and the control plane see it. */
export interface TransparentRouting {
  /** The mesh service an original destination names (its virtual IP, or an instance's address:port). */
  destination(address: string, port: number): { service: string; instance?: Instance } | undefined;
  /** Routable instances of a mesh service: the same array until they change. */
  endpoints(service: string): readonly Instance[];
  /** The local service a captured outbound connection speaks as, or why there is none. */
  source(app: Socket): { service: string } | { error: string };
  /** A destination outside the mesh: connected to unchanged, or refused. */
  outbound: 'passthrough' | 'deny';
  /** A client outside the mesh reached a permissive service (for `knit check`). */
  onUnauthenticated?(service: string, remote: string): void;
}

interface ServiceIdentity {
  id: SpiffeId;
  ctx: tls.SecureContext;
  notAfter: number;
}

/** Fail closed until the first intentions arrive. */
const NO_POLICY: Decision = { allow: false, reason: 'default', rule: 'default (deny: intentions not loaded yet)' };

const M = {
  decisions: ['knit_inbound_connections_total', 'Mesh connections decided at their destination, by decision and the rule that made it'],
  rejected: ['knit_inbound_rejected_total', 'Inbound HBONE connections or streams refused before authorization (TLS, identity, limits, misdirected), by reason'],
  closedByPolicy: ['knit_inbound_closed_by_policy_total', 'Open connections closed because intentions changed to deny them'],
  appErrors: ['knit_inbound_app_errors_total', 'Inbound connections whose local application could not be reached'],
  outbound: ['knit_outbound_connections_total', 'Application connections leaving through an upstream, by result'],
  outboundRejected: ['knit_outbound_rejected_total', 'Endpoints refused by the outbound side (identity, chain), by reason'],
  endpointFailures: ['knit_outbound_endpoint_failures_total', 'Attempts to one endpoint that failed (the next endpoint is tried), by reason'],
  ejections: ['knit_outbound_ejections_total', 'Endpoints ejected by passive outlier detection after consecutive failures'],
  opened: ['knit_tcp_connections_opened_total', 'Connections opened, by reporter (source or destination side), source and destination service, and path'],
  closed: ['knit_tcp_connections_closed_total', 'Connections closed, by reporter, source and destination service, and how they ended'],
  sent: ['knit_tcp_sent_bytes_total', 'Bytes an application sent over the mesh, by reporter, source and destination service'],
  received: ['knit_tcp_received_bytes_total', 'Bytes an application received over the mesh, by reporter, source and destination service'],
  tunnels: ['knit_hbone_tunnels_total', 'HBONE tunnels (client side) opened and closed, by event and reason'],
  tunnelsOpen: ['knit_hbone_tunnels_open', 'HBONE tunnels open now, by side (client: this host dialled; server: another host did)'],
  handshake: ['knit_hbone_dials_total', 'HBONE tunnel dials, by result'],
  captured: ['knit_captured_connections_total', 'Connections taken by transparent capture, by direction and what became of them (mesh, passthrough, denied_outside_mesh, unauthenticated, strict_refused, refused)'],
  unauthenticated: ['knit_inbound_unauthenticated_total', 'Plaintext connections from clients outside the mesh that a permissive service accepted, by service'],
} as const;

/**
 * A destination agent whose TLS identity was refused (chain, SVID shape,
 * not the destination's ID, not HBONE): the reason to count (a short
 * phrase), and OpenSSL's code and message for the log line when OpenSSL
 * refused the chain.
 */
class IdentityRefused extends KnitError {
  constructor(
    readonly reason: string,
    readonly fields: Record<string, unknown> = {},
    readonly detail = '',
  ) {
    super('KNIT_ERR_CERT', `${reason}${detail}`);
    this.name = 'IdentityRefused';
  }
}

export class NodeProxy {
  readonly flows = new FlowTable();
  private readonly services = new Map<string, LocalService>();
  private readonly identities = new Map<string, ServiceIdentity>();
  private readonly upstreams = new Set<Upstream>();
  private readonly pool: HbonePool;
  private readonly server: HboneServer;
  private readonly peers = new PeerIdentityReader();
  private readonly logLimit: RateLimitedLog;
  private readonly hostLimit: ConnectionLimit;
  private readonly tcp: TcpOptions;
  private readonly dialApp: DialApp;
  private readonly namespace: string;
  private readonly localAddresses: Set<string>;
  private port = 0;
  private readonly captures: CaptureListener[] = [];
  private routing: TransparentRouting | undefined;
  /** Per destination service: its router and the endpoint list it was last given. */
  private readonly captureRouters = new Map<string, { router: Router<Instance>; from: readonly Instance[] }>();
  private trustBundle: string[] = [];
  private clientTunnels = 0;
  private readonly ids = new Map<string, string>();

  constructor(private readonly o: NodeProxyOptions) {
    this.namespace = o.namespace ?? 'default';
    this.tcp = tcpOptions(o.tcp);
    this.logLimit = o.logLimit ?? new RateLimitedLog(o.log);
    this.hostLimit = o.hostLimit ?? new ConnectionLimit('host', DEFAULT_MAX_HOST_CONNECTIONS);
    this.dialApp = o.dialApp ?? ((host, port) => net.connect({ host, port, allowHalfOpen: true }));
    this.localAddresses = hostAddresses(o.advertise, o.listenHost);
    this.pool = new HbonePool({
      dial: (key) => this.dialTunnel(key),
      maxStreams: o.maxStreams,
      idleMs: o.tunnelIdleMs,
      now: o.now,
      onTunnel: (event, key, streams, why) => {
        this.clientTunnels += event === 'open' ? 1 : -1;
        this.o.metrics.inc(M.tunnels[0], M.tunnels[1], { event, reason: event === 'open' ? '' : (why ?? '') });
        this.o.metrics.set(M.tunnelsOpen[0], M.tunnelsOpen[1], { side: 'client' }, this.clientTunnels);
        this.o.log.debug({ event: event === 'open' ? EVENTS.tunnelOpened : EVENTS.tunnelClosed, source: key.source, destination: key.destination, agent: key.agent, streams, why }, `HBONE tunnel ${event} to ${key.agent}`);
      },
    });
    this.server = new HboneServer({
      host: o.listenHost,
      port: o.hbonePort ?? DEFAULT_HBONE_PORT,
      trustDomain: o.trustDomain,
      namespace: this.namespace,
      trustBundle: this.trustBundle,
      contextFor: (service) => this.identities.get(service)?.ctx,
      onStream: (stream, headers, origin) => this.inbound(stream, headers, origin),
      onRefused: (reason, remote, service, fields, detail) => this.refusedInbound(reason, remote, service, fields, detail),
      limit: new ConnectionLimit('listener', Number.MAX_SAFE_INTEGER, this.hostLimit),
      tcp: this.tcp,
      maxStreams: o.maxStreams,
    });
  }

  /** Starts the HBONE listener; resolves with its port. */
  async start(): Promise<number> {
    this.port = await this.server.start();
    this.o.log.info({ event: EVENTS.listening, role: 'hbone', address: `${this.o.listenHost}:${this.port}` }, `HBONE listening on ${this.o.listenHost}:${this.port}`);
    return this.port;
  }

  get hbonePort(): number {
    return this.port;
  }

  /** Adds or replaces a local service (its registered port and application). */
  setService(key: string, svc: LocalService): void {
    this.services.set(key, svc);
  }

  /**
   * The service's current certificate: presented to clients asking for it
   * by SNI and to servers when it calls out. Open tunnels keep theirs; its
   * client tunnels take no new stream and close once idle, so new
   * connections use the new certificate.
   */
  setServiceTls(service: string, t: ServiceTls): void {
    const leaf = new X509Certificate(splitPem(t.certChainPem)[0]!);
    const prev = this.identities.get(service);
    this.identities.set(service, { id: serviceId(this.o.trustDomain, service, this.namespace), ctx: secureContext(t), notAfter: Date.parse(leaf.validTo) });
    if (JSON.stringify(t.trustBundlePem) !== JSON.stringify(this.trustBundle)) {
      this.trustBundle = t.trustBundlePem;
      this.server.setTrustBundle(t.trustBundlePem);
    }
    if (prev) this.pool.retire(prev.id.uri);
  }

  /** Removes a local service: its flows are closed after `drainMs`, its tunnels at once. */
  async removeService(key: string, drainMs = 0): Promise<void> {
    const svc = this.services.get(key);
    this.services.delete(key);
    if (!svc) return;
    if (![...this.services.values()].some((s) => s.name === svc.name)) {
      const id = this.identities.get(svc.name)?.id.uri;
      this.identities.delete(svc.name);
      if (id) this.pool.closeWhere((k) => k.source === id, `${svc.name} stopped`);
    }
    const mine = (f: Flow): boolean => f.destination.service === svc.name && f.side !== 'outbound';
    const deadline = Date.now() + drainMs;
    while (this.flows.list().some(mine) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    this.flows.closeWhere(mine, `${svc.name} stopped`);
  }

  /** Opens an upstream listener for `source` to reach `destination`. */
  async addUpstream(o: { source: string; destination: string; listenHost: string; listenPort: number; maxConnections?: number }): Promise<Upstream> {
    const up = new Upstream({
      ...o,
      tcp: this.tcp,
      hostLimit: this.hostLimit,
      outlier: this.o.outlier,
      now: this.o.now,
      random: this.o.random,
      onConnection: (app, u) => void this.outbound(app, u),
      onRefused: (reason, app, u) => {
        this.o.metrics.inc(M.outbound[0], M.outbound[1], { service: u.source, upstream: u.destination, result: 'over_limit' });
        this.logLimit.warn(`${EVENTS.connOverLimit}|${u.source}|${reason}`, { event: EVENTS.connOverLimit, service: u.source, upstream: u.destination, reason }, `refusing a connection to upstream ${u.destination} of ${u.source}: ${reason}`);
      },
    });
    await up.start();
    this.upstreams.add(up);
    return up;
  }

  async removeUpstream(up: Upstream, drainMs = 0): Promise<void> {
    this.upstreams.delete(up);
    await up.close(drainMs);
  }

  /** Intentions changed: every flow this host enforces is decided again; the denied ones are closed. */
  reauthorize(): void {
    const closed = this.flows.reauthorize((f) => this.decide(f.source.service, f.destination.service));
    for (const { flow, decision } of closed) {
      this.o.metrics.inc(M.closedByPolicy[0], M.closedByPolicy[1], { service: flow.destination.service, rule: decision.rule });
      this.logLimit.warn(`${EVENTS.connClosedByPolicy}|${flow.destination.service}|${decision.rule}`, { event: EVENTS.connClosedByPolicy, service: flow.destination.service, source: flow.source.id ?? flow.source.service, rule: decision.rule }, `closing open connection ${flow.source.service} -> ${flow.destination.service}: ${decision.rule}`);
    }
  }

  /** HBONE tunnels this host holds as a client, and their streams. */
  tunnels(): ReturnType<HbonePool['stats']> {
    return this.pool.stats();
  }

  // ---- transparent capture ---------------------------------------------------

  /**
   * Starts the capture listeners netfilter redirects to: outbound on
   * loopback (REDIRECT in OUTPUT lands there), inbound on every address.
   * Resolves with the two ports.
   */
  async startCapture(o: { outboundPort: number; inboundPort: number; routing: TransparentRouting }): Promise<{ outbound: number; inbound: number }> {
    this.routing = o.routing;
    const common = { tcp: this.tcp, hostLimit: this.hostLimit };
    const refused = (direction: string) => (reason: string, remote: string): void => {
      this.o.metrics.inc(M.captured[0], M.captured[1], { direction, result: 'refused' });
      this.logLimit.warn(`${EVENTS.connRejected}|capture|${direction}|${reason.slice(0, 40)}`, { event: EVENTS.connRejected, direction, remote, reason }, `refused a connection on the ${direction} capture port from ${remote}: ${reason}`);
    };
    const out = new CaptureListener({ ...common, direction: 'outbound', hosts: ['127.0.0.1', '::1'], port: o.outboundPort, onConnection: (app, dst) => void this.capturedOutbound(app, dst), onRefused: refused('outbound') });
    const inb = new CaptureListener({ ...common, direction: 'inbound', hosts: ['0.0.0.0', '::'], port: o.inboundPort, onConnection: (app, dst) => this.capturedInbound(app, dst), onRefused: refused('inbound') });
    this.captures.push(out, inb);
    const ports = { outbound: await out.start(), inbound: await inb.start() };
    this.o.log.info({ event: EVENTS.listening, role: 'capture', ...ports }, `transparent capture listening: outbound ${ports.outbound}, inbound ${ports.inbound}`);
    return ports;
  }

  /** A connection an unmodified application here opened to an address netfilter sent to the proxy. */
  private async capturedOutbound(app: Socket, dst: OriginalDestination): Promise<void> {
    const routing = this.routing!;
    const target = routing.destination(dst.address, dst.port);
    const where = authorityOf(dst.address, dst.port);
    if (!target) {
      if (routing.outbound === 'deny') {
        this.o.metrics.inc(M.captured[0], M.captured[1], { direction: 'outbound', result: 'denied_outside_mesh' });
        this.logLimit.warn(`${EVENTS.connDenied}|capture|outside`, { event: EVENTS.connDenied, destination: where, rule: 'transparent.outbound: deny' }, `denied ${app.remoteAddress ?? '?'} -> ${where}: not a mesh destination (rule transparent.outbound: deny)`);
        return reset(app);
      }
      return this.passthrough(app, dst);
    }
    const who = routing.source(app);
    if ('error' in who) {
      this.o.metrics.inc(M.captured[0], M.captured[1], { direction: 'outbound', result: 'refused' });
      this.logLimit.warn(`${EVENTS.connFailed}|capture|source`, { event: EVENTS.connFailed, destination: target.service, err: who.error }, `cannot carry a connection to ${target.service} (${where}): ${who.error}`);
      return reset(app);
    }
    this.o.metrics.inc(M.captured[0], M.captured[1], { direction: 'outbound', result: 'mesh' });
    let cr = this.captureRouters.get(target.service);
    if (!cr) {
      cr = { router: new Router<Instance>({ key: (i) => `${i.address}:${i.port}`, outlier: this.o.outlier, now: this.o.now, random: this.o.random }), from: [] };
      this.captureRouters.set(target.service, cr);
    }
    // The agent hands out the same array until the registry changes it: only then is the router told.
    const eps = routing.endpoints(target.service);
    if (eps !== cr.from) {
      cr.router.setEndpoints(eps);
      cr.from = eps;
    }
    // An application that dialled one instance's own address gets that instance, as it asked.
    await this.outbound(app, { source: who.service, destination: target.service, router: cr.router }, target.instance);
  }

  /** A destination outside the mesh, allowed to pass: the agent connects to it unchanged (its own uid is not redirected). */
  private passthrough(app: Socket, dst: OriginalDestination): void {
    this.o.metrics.inc(M.captured[0], M.captured[1], { direction: 'outbound', result: 'passthrough' });
    const target = this.dialApp(dst.address, dst.port);
    tuneSocket(target, this.tcp);
    target.once('error', () => reset(app));
    void splice(app, target, { idleTimeoutMs: this.tcp.idleTimeoutMs });
  }

  /** A client outside the mesh called a service here on its own port (redirected to the inbound capture). */
  private capturedInbound(app: Socket, dst: OriginalDestination): void {
    const remote = app.remoteAddress ?? '?';
    const svc = [...this.services.values()].find((s) => s.port === dst.port && s.port > 0);
    if (!svc?.target) {
      this.o.metrics.inc(M.captured[0], M.captured[1], { direction: 'inbound', result: 'refused' });
      this.logLimit.warn(`${EVENTS.connRejected}|capture|inbound|${dst.port}`, { event: EVENTS.connRejected, port: dst.port, remote }, `refused ${remote} -> port ${dst.port}: no mesh service here has that port`);
      return reset(app);
    }
    if (svc.inbound !== 'permissive') {
      const rule = `connect.inbound: strict (${svc.name})`;
      this.o.metrics.inc(M.captured[0], M.captured[1], { direction: 'inbound', result: 'strict_refused' });
      this.o.metrics.inc(M.decisions[0], M.decisions[1], { service: svc.name, source: 'unauthenticated', decision: 'deny', rule });
      this.logLimit.warn(`${EVENTS.connDenied}|${svc.name}|strict`, { event: EVENTS.connDenied, service: svc.name, remote, rule }, `denied plaintext ${remote} -> ${svc.name}: ${rule}; mesh clients arrive over HBONE (set connect.inbound: permissive while clients migrate)`);
      return reset(app);
    }
    this.o.metrics.inc(M.captured[0], M.captured[1], { direction: 'inbound', result: 'unauthenticated' });
    this.o.metrics.inc(M.unauthenticated[0], M.unauthenticated[1], { service: svc.name });
    this.routing?.onUnauthenticated?.(svc.name, remote);
    this.logLimit.info(`${EVENTS.connAccepted}|${svc.name}|unauthenticated`, { event: EVENTS.connAccepted, service: svc.name, remote, unauthenticated: true }, `accepted plaintext ${remote} -> ${svc.name} (connect.inbound: permissive): a client outside the mesh`);
    const flow = this.flows.create('unauthenticated', { service: '', address: `${remote}:${app.remotePort ?? ''}` }, { service: svc.name, id: this.identities.get(svc.name)?.id.uri, address: authorityOf(dst.address, dst.port) }, app);
    flow.rule = `connect.inbound: permissive (${svc.name})`;
    this.toLocalApp(app, flow, svc, svc.target, () => this.flows.delete(flow));
  }

  /**
   * Hands an application connection to the local application of `svc`
   * at `to` (the same-host path, a permissive plaintext client): a second socket,
   * tuned like the first, reset with it when the flow is closed; `ended`
   * gets how the pair ended. Returns the socket to the application.
   */
  private toLocalApp(app: Socket, flow: Flow, svc: LocalService, to: { host: string; port: number }, ended: (end: string) => void): Socket {
    const target = this.dialApp(to.host, to.port);
    tuneSocket(target, this.tcp);
    const abort = new AbortController();
    flow.onClose(() => {
      reset(app);
      reset(target);
      abort.abort();
    });
    target.once('error', (err) => this.appUnreachable(svc.name, svc, err));
    void splice(app, target, { idleTimeoutMs: this.tcp.idleTimeoutMs, signal: abort.signal }).then((r) => ended(r.end));
    return target;
  }

  /** The SPIFFE ID of a service of this trust domain and namespace (made once per service: outbound asks per connection). */
  private idOf(service: string): string {
    let id = this.ids.get(service);
    if (id === undefined) {
      id = serviceId(this.o.trustDomain, service, this.namespace).uri;
      if (this.ids.size >= 4096) this.ids.clear();
      this.ids.set(service, id);
    }
    return id;
  }

  private decide(source: string, destination: string): Decision {
    const ev = this.o.policy();
    return ev ? ev.evaluate(source, destination) : NO_POLICY;
  }

  // ---- outbound ------------------------------------------------------------

  private async outbound(app: Socket, up: OutboundRoute, pinned?: Instance): Promise<void> {
    const source = up.source;
    const me = this.identities.get(source);
    const remote = app.remoteAddress;
    const flow = this.flows.create('outbound', { service: source, id: me?.id.uri, address: remote }, { service: up.destination }, app);
    const fail = (result: string, msg: string, fields: Record<string, unknown> = {}): void => {
      this.o.metrics.inc(M.outbound[0], M.outbound[1], { service: source, upstream: up.destination, result });
      this.logLimit.warn(`${EVENTS.connFailed}|${source}|${up.destination}|${result}`, { event: EVENTS.connFailed, service: source, upstream: up.destination, result, ...fields }, msg);
      this.flows.delete(flow);
      reset(app);
    };
    if (!me) return fail('no_identity', `${source} has no certificate yet: cannot reach ${up.destination}`);
    const tried = new Set<string>();
    const attempts = this.o.maxAttempts ?? 3;
    let last = '';
    let lastIdentity = false;
    for (let i = 0; i < attempts; i++) {
      const ep = pinned ? (tried.size ? undefined : pinned) : up.router.pick(tried);
      if (!ep) break;
      const key = `${ep.address}:${ep.port}`;
      tried.add(key);
      if (app.destroyed) return void this.flows.delete(flow);
      if (this.isLocal(ep)) return this.local(app, flow, up, ep);
      if (!ep.hbonePort || !ep.port) {
        last = `${key}: registered without an HBONE port`;
        lastIdentity = false;
        continue;
      }
      const tunnelKey: TunnelKey = { source: me.id.uri, destination: this.idOf(up.destination), agent: authorityOf(ep.address, ep.hbonePort) };
      let opened: { stream: ClientHttp2Stream; tunnel: string };
      try {
        opened = await this.pool.open(tunnelKey, authorityOf(ep.address, ep.port), { forwarded: `for="${remote ?? ''}"` });
      } catch (e) {
        last = `${key}: ${(e as Error).message}`;
        lastIdentity = e instanceof IdentityRefused;
        this.endpointFailed(up, ep, tunnelKey.agent, e as Error);
        continue;
      }
      if (up.router.success(ep)) {
        this.o.log.info({ event: EVENTS.endpointRestored, service: source, upstream: up.destination, endpoint: key, instance: ep.id }, `${up.destination} endpoint ${key} is back in rotation`);
      }
      if (app.destroyed) {
        cancel(opened.stream);
        return void this.flows.delete(flow);
      }
      this.o.metrics.inc(M.outbound[0], M.outbound[1], { service: source, upstream: up.destination, result: 'ok' });
      return this.forwardRemote(app, flow, up, ep, opened);
    }
    if (!pinned && up.router.endpoints.length === 0) return fail('no_endpoint', `no healthy instance of ${up.destination}`);
    // Named after the last failure: a server that proved the wrong identity is not "cannot reach".
    fail(lastIdentity ? 'identity' : 'connect_error', `cannot reach ${up.destination} after ${tried.size} endpoint(s): ${last}`, { attempts: tried.size });
  }

  /**
   * One endpoint failed for one application connection (the next is
   * tried): counted by kind, an identity refusal also by its reason, logged
   * at a bounded rate, and fed to outlier detection, whose ejections are
   * counted and logged too.
   */
  private endpointFailed(up: OutboundRoute, ep: Instance, agent: string, e: Error): void {
    const labels = { service: up.source, upstream: up.destination };
    const endpoint = `${ep.address}:${ep.port}`;
    const kind = e instanceof IdentityRefused ? 'identity' : e instanceof DialError ? e.kind : 'error';
    this.o.metrics.inc(M.endpointFailures[0], M.endpointFailures[1], { ...labels, reason: kind });
    if (e instanceof IdentityRefused) {
      this.o.metrics.inc(M.outboundRejected[0], M.outboundRejected[1], { ...labels, reason: e.reason });
      this.logLimit.warn(
        `${EVENTS.connRejected}|${up.source}|${up.destination}|${e.reason}`,
        { event: EVENTS.connRejected, ...labels, result: 'identity', endpoint, agent, instance: ep.id, reason: e.reason, ...e.fields },
        `refusing ${up.destination} endpoint ${endpoint} (agent ${agent}): ${e.reason}${e.detail}`,
      );
    } else {
      this.logLimit.warn(
        `${EVENTS.endpointFailed}|${up.source}|${endpoint}|${kind}`,
        { event: EVENTS.endpointFailed, ...labels, endpoint, agent, instance: ep.id, reason: kind, err: e.message },
        `${up.destination} endpoint ${endpoint} failed (${e.message}); trying the next`,
      );
    }
    const out = up.router.failure(ep);
    if (out.ejected) {
      this.o.metrics.inc(M.ejections[0], M.ejections[1], labels);
      this.logLimit.warn(
        `${EVENTS.endpointEjected}|${up.source}|${endpoint}`,
        { event: EVENTS.endpointEjected, ...labels, endpoint, instance: ep.id, reason: kind, forMs: out.forMs, ejections: out.ejections },
        `ejecting ${up.destination} endpoint ${endpoint} for ${out.forMs} ms after repeated failures (${kind})`,
      );
    }
  }

  /** An endpoint served by this very agent: the same-host path. */
  private isLocal(ep: Instance): boolean {
    return ep.node === this.o.node || (this.localAddresses.has(ep.address) && ep.hbonePort === this.port);
  }

  private forwardRemote(app: Socket, flow: Flow, up: OutboundRoute, ep: Instance, opened: { stream: ClientHttp2Stream; tunnel: string }): void {
    const { stream } = opened;
    flow.tunnel = opened.tunnel;
    flow.destination.address = authorityOf(ep.address, ep.port);
    const labels = { reporter: 'source', source_service: up.source, destination_service: up.destination };
    this.o.metrics.inc(M.opened[0], M.opened[1], { ...labels, path: 'hbone' });
    stream.on('error', () => undefined);
    stream.once('response', (headers) => {
      const status = Number(headers[':status']);
      if (status === STATUS.ok) return;
      const reason = String(headers[REASON_HEADER] ?? `HTTP ${status}`);
      this.o.metrics.inc(M.outbound[0], M.outbound[1], { service: up.source, upstream: up.destination, result: status === STATUS.denied ? 'denied' : 'refused' });
      this.logLimit.warn(`${EVENTS.connDenied}|${up.source}|${up.destination}|${reason}`, { event: status === STATUS.denied ? EVENTS.connDenied : EVENTS.connFailed, service: up.source, upstream: up.destination, status, reason }, `${up.destination} at ${flow.destination.address} refused ${up.source}: ${reason}`);
      cancel(stream);
      reset(app);
    });
    flow.onClose(() => {
      cancel(stream);
      reset(app);
    });
    void spliceStream(app, stream, { idleTimeoutMs: this.tcp.idleTimeoutMs }).then((r) => this.ended(flow, labels, r.end));
  }

  /** Same host: decided here with both identities known, then handed to the local application. */
  private local(app: Socket, flow: Flow, up: OutboundRoute, ep: Instance): void {
    const svc = [...this.services.values()].find((s) => s.name === up.destination && s.port === ep.port);
    if (!svc?.target) {
      this.o.metrics.inc(M.outbound[0], M.outbound[1], { service: up.source, upstream: up.destination, result: 'no_endpoint' });
      this.flows.delete(flow);
      return reset(app);
    }
    // The connection to the application is a second socket on this host: it takes its own host slot.
    const lease = this.hostLimit.acquire();
    if (isOverLimit(lease)) {
      const reason = overLimitReason(lease);
      this.o.metrics.inc(M.outbound[0], M.outbound[1], { service: up.source, upstream: up.destination, result: 'over_limit' });
      this.logLimit.warn(`${EVENTS.connOverLimit}|${up.source}|${reason}`, { event: EVENTS.connOverLimit, service: up.source, upstream: up.destination, reason }, `refusing a same-host connection ${up.source} -> ${up.destination}: ${reason}`);
      this.flows.delete(flow);
      return reset(app);
    }
    const d = this.decide(up.source, up.destination);
    this.countDecision(up.source, up.destination, d, 'local');
    if (!d.allow) {
      lease.release();
      this.o.metrics.inc(M.outbound[0], M.outbound[1], { service: up.source, upstream: up.destination, result: 'denied' });
      this.flows.delete(flow);
      return reset(app);
    }
    // The flow is now this host's to enforce: both ends are here.
    this.flows.delete(flow);
    const f = this.flows.create('local', { ...flow.source }, { service: up.destination, id: this.identities.get(up.destination)?.id.uri, address: authorityOf(ep.address, ep.port) }, app);
    f.rule = d.rule;
    this.o.metrics.inc(M.outbound[0], M.outbound[1], { service: up.source, upstream: up.destination, result: 'ok' });
    const labels = { reporter: 'source', source_service: up.source, destination_service: up.destination };
    this.o.metrics.inc(M.opened[0], M.opened[1], { ...labels, path: 'local' });
    const target = this.toLocalApp(app, f, svc, svc.target, (end) => this.ended(f, labels, end));
    target.once('close', () => lease.release());
  }

  // ---- inbound -------------------------------------------------------------

  private refusedInbound(reason: string, remote: string, service: string, fields: Record<string, unknown>, detail: string): void {
    this.o.metrics.inc(M.rejected[0], M.rejected[1], { service, reason });
    this.logLimit.warn(`${EVENTS.connRejected}|${service}|${reason}`, { event: EVENTS.connRejected, service, remote, reason, ...fields }, `refused inbound connection${service ? ` to ${service}` : ''}: ${reason}${detail}`);
  }

  private refuseStream(stream: ServerHttp2Stream, status: number, reason: string, origin: StreamOrigin): void {
    this.refusedInbound(reason, origin.remote, origin.service, { source: origin.peer.uri }, '');
    if (!stream.headersSent && !stream.destroyed) stream.respond({ ':status': status, [REASON_HEADER]: reason.slice(0, 200) }, { endStream: true });
  }

  private inbound(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, origin: StreamOrigin): void {
    if (headers[':method'] !== 'CONNECT') return this.refuseStream(stream, STATUS.badRequest, `not a CONNECT (${String(headers[':method'])})`, origin);
    const auth = parseAuthority(headers[':authority']);
    if (!auth) return this.refuseStream(stream, STATUS.badRequest, `malformed :authority ${String(headers[':authority']).slice(0, 100)}`, origin);
    // The authority must name an instance here of the service whose identity the tunnel proved.
    const svc = [...this.services.values()].find((s) => s.port === auth.port && s.port > 0);
    if (!svc || svc.name !== origin.service || !this.localAddresses.has(auth.address)) {
      const what = svc ? `${svc.name}, not ${origin.service}` : 'no service here';
      return this.refuseStream(stream, STATUS.misdirected, `:authority ${authorityOf(auth.address, auth.port)} names ${what} (the tunnel proved ${origin.service})`, origin);
    }
    // Each stream becomes a connection to the local application: it takes a slot of the host's limit,
    // as every application connection knit holds does (a tunnel's one TCP connection carries up to
    // maxStreams of them, so the tunnel's own slot does not bound them).
    const lease = this.hostLimit.acquire();
    if (isOverLimit(lease)) return this.refuseStream(stream, STATUS.unavailable, overLimitReason(lease), origin);
    const d = this.decide(origin.peerService, svc.name);
    this.countDecision(origin.peerService, svc.name, d, 'hbone');
    if (!d.allow) {
      lease.release();
      this.logLimit.warn(`${EVENTS.connDenied}|${svc.name}|${origin.peerService}|${d.rule}`, { event: EVENTS.connDenied, service: svc.name, source: origin.peer.uri, rule: d.rule }, `denied ${origin.peerService} -> ${svc.name}: ${d.rule}`);
      if (!stream.destroyed) stream.respond({ ':status': STATUS.denied, [REASON_HEADER]: d.rule }, { endStream: true });
      return;
    }
    if (!svc.target) {
      lease.release();
      return this.refuseStream(stream, STATUS.unavailable, `${svc.name} has no local application port`, origin);
    }
    const app = this.dialApp(svc.target.host, svc.target.port);
    app.once('close', () => lease.release());
    tuneSocket(app, this.tcp);
    const forwarded = /for="?([^";,]*)/.exec(String(headers.forwarded ?? ''))?.[1];
    const flow = this.flows.create('inbound', { service: origin.peerService, id: origin.peer.uri, address: forwarded || origin.remote }, { service: svc.name, id: this.identities.get(svc.name)?.id.uri, address: authorityOf(auth.address, auth.port) }, app);
    flow.rule = d.rule;
    const labels = { reporter: 'destination', source_service: origin.peerService, destination_service: svc.name };
    let connected = false;
    app.once('connect', () => {
      connected = true;
      if (stream.destroyed) return reset(app);
      stream.respond({ ':status': STATUS.ok });
      this.o.metrics.inc(M.opened[0], M.opened[1], { ...labels, path: 'hbone' });
      void spliceStream(app, stream, { idleTimeoutMs: this.tcp.idleTimeoutMs }).then((r) => this.ended(flow, labels, r.end));
    });
    app.once('error', (err) => {
      if (connected) return;
      this.appUnreachable(svc.name, svc, err);
      this.flows.delete(flow);
      if (!stream.headersSent && !stream.destroyed) stream.respond({ ':status': STATUS.unavailable, [REASON_HEADER]: `local application unreachable: ${(err as Error & { code?: string }).code ?? err.message}` }, { endStream: true });
    });
    flow.onClose(() => {
      cancel(stream, http2.constants.NGHTTP2_REFUSED_STREAM);
      reset(app);
    });
  }

  private appUnreachable(service: string, svc: LocalService, err: Error): void {
    this.o.metrics.inc(M.appErrors[0], M.appErrors[1], { service });
    this.logLimit.warn(`${EVENTS.connFailed}|${service}|app|${(err as Error & { code?: string }).code ?? 'error'}`, { event: EVENTS.connFailed, service, target: `${svc.target?.host}:${svc.target?.port}`, err: err.message }, `local app of ${service} unreachable: ${err.message}`);
  }

  private countDecision(source: string, destination: string, d: Decision, path: string): void {
    this.o.metrics.inc(M.decisions[0], M.decisions[1], { service: destination, source, decision: d.allow ? 'allow' : 'deny', rule: d.rule });
    if (d.allow) this.o.log.debug({ event: EVENTS.connAccepted, service: destination, source, rule: d.rule, path }, 'accepted');
  }

  private ended(flow: Flow, labels: Record<string, string>, end: string): void {
    this.flows.delete(flow);
    const bytes = flow.bytes();
    this.o.metrics.inc(M.closed[0], M.closed[1], { ...labels, end: flow.ended ? 'policy' : end });
    this.o.metrics.inc(M.sent[0], M.sent[1], labels, bytes.sent);
    this.o.metrics.inc(M.received[0], M.received[1], labels, bytes.received);
    if (end === 'idle_timeout') this.o.log.debug({ event: EVENTS.connIdleTimeout, source: flow.source.service, destination: flow.destination.service }, 'closed an idle connection');
  }

  // ---- tunnels -------------------------------------------------------------

  /** Dials a tunnel: TCP + TLS as the source service, SNI naming the destination, which must prove exactly that identity. */
  private async dialTunnel(key: TunnelKey): Promise<DialedTunnel> {
    const source = [...this.identities.values()].find((i) => i.id.uri === key.source);
    if (!source) throw new KnitError('KNIT_ERR_CERT', `no certificate for ${key.source}`);
    const dest = serviceId(this.o.trustDomain, key.destination.split('/svc/')[1]!, this.namespace);
    const target = parseAuthority(key.agent)!;
    const started = process.hrtime.bigint();
    let conn;
    try {
      conn = await dialTls({
        host: target.address,
        port: target.port,
        secureContext: source.ctx,
        timeoutMs: this.o.connectTimeoutMs ?? 5000,
        tcp: this.tcp,
        servername: sniFor(dest.what.kind === 'service' ? dest.what.service : '', this.namespace, this.o.trustDomain),
        alpn: [HBONE_ALPN],
      });
    } catch (e) {
      this.o.metrics.inc(M.handshake[0], M.handshake[1], { result: e instanceof DialError ? e.kind : 'error' });
      throw e;
    }
    // Checked before a byte is written: a server refused here never sees the HTTP/2 preface.
    const who = identifyPeer(conn.tls, 'server', this.peers, this.o.trustDomain, this.namespace, key.destination);
    if (!who.ok || conn.tls.alpnProtocol !== HBONE_ALPN) {
      conn.tls.destroy();
      conn.tcp.destroy();
      this.o.metrics.inc(M.handshake[0], M.handshake[1], { result: 'identity' });
      throw who.ok ? new IdentityRefused(`server does not speak HBONE (ALPN ${String(conn.tls.alpnProtocol)})`) : new IdentityRefused(who.reason, who.fields, who.detail);
    }
    this.o.metrics.inc(M.handshake[0], M.handshake[1], { result: 'ok' });
    this.o.metrics.observe('knit_hbone_handshake_seconds', 'Time to dial and verify a new HBONE tunnel (TCP + TLS), client side', {}, Number(process.hrtime.bigint() - started) / 1e9);
    return { socket: conn.tls, notAfter: Math.min(who.notAfter.getTime(), source.notAfter), noDelay: this.tcp.noDelay };
  }

  /** Stops everything: upstream listeners (draining up to `drainMs`), tunnels, the HBONE listener. */
  async close(drainMs = 0): Promise<void> {
    await Promise.all([...this.upstreams].map((u) => u.close(drainMs)));
    await Promise.all(this.captures.map((c) => c.close()));
    const deadline = Date.now() + drainMs;
    while (this.flows.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    this.flows.closeWhere(() => true, 'agent stopping');
    this.pool.close();
    await this.server.close();
    this.logLimit.flush();
  }
}

/** Every address of this host (and the advertised one): an :authority must name one of them. */
function hostAddresses(advertise: string, listenHost: string): Set<string> {
  const out = new Set<string>([advertise, '127.0.0.1', '::1', 'localhost']);
  if (listenHost !== '0.0.0.0' && listenHost !== '::') out.add(listenHost);
  for (const list of Object.values(networkInterfaces())) for (const a of list ?? []) out.add(a.address);
  return out;
}
