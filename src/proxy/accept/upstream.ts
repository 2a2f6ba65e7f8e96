/**
 * The accept stage for traffic leaving this host: one plain TCP listener
 * per upstream (`local_bind_address:local_bind_port`, loopback unless the
 * agent allows otherwise). Whoever connects speaks as the local service that
 * owns the upstream: that is the identify stage on this side. The listener
 * applies the connection caps and socket options and hands each connection
 * on with its endpoints' router.
 */
import net, { type Socket } from 'node:net';
import { once } from 'node:events';
import { KnitError } from '../../errors.js';
import type { Instance } from '../../registry/registry.js';
import { reset } from '../forward/splice.js';
import { admitSocket, ConnectionLimit, DEFAULT_MAX_CONNECTIONS, type TcpOptions } from '../limits.js';
import { Router, type OutlierOptions } from '../route.js';

export interface UpstreamOptions {
  /** The local service that owns the upstream: every connection speaks as it. */
  source: string;
  destination: string;
  listenHost: string;
  listenPort: number;
  tcp: TcpOptions;
  /** The host's limit, shared by all listeners. */
  hostLimit?: ConnectionLimit;
  maxConnections?: number;
  outlier?: Partial<OutlierOptions>;
  now?: () => number;
  random?: () => number;
  /** A connection admitted: the rest of the pipeline. */
  onConnection: (app: Socket, upstream: Upstream) => void;
  /** A connection refused at admission (over a cap): counted and logged by the caller. */
  onRefused: (reason: string, app: Socket, upstream: Upstream) => void;
}

/** The key a router keeps state under: an instance's agent and port. */
const endpointKey = (i: Instance): string => `${i.address}:${i.port}`;

export class Upstream {
  readonly router: Router<Instance>;
  private readonly server: net.Server;
  private readonly limit: ConnectionLimit;
  /** Connections open through it, for the drain on close. */
  readonly open = new Set<Socket>();

  constructor(readonly o: UpstreamOptions) {
    this.router = new Router<Instance>({ key: endpointKey, outlier: o.outlier, now: o.now, random: o.random });
    this.limit = new ConnectionLimit('listener', o.maxConnections ?? DEFAULT_MAX_CONNECTIONS, o.hostLimit);
    this.server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => this.admit(s));
  }

  /** The port it listens on (after start). */
  get port(): number {
    return (this.server.address() as net.AddressInfo | null)?.port ?? 0;
  }

  get source(): string {
    return this.o.source;
  }

  get destination(): string {
    return this.o.destination;
  }

  /** Listens; resolves with the bound port. Rejects KNIT_ERR_LISTEN naming the address. */
  async start(): Promise<number> {
    this.server.listen(this.o.listenPort, this.o.listenHost);
    try {
      await once(this.server, 'listening');
    } catch (e) {
      throw new KnitError('KNIT_ERR_LISTEN', `upstream ${this.o.destination} of ${this.o.source} cannot listen on ${this.o.listenHost}:${this.o.listenPort}: ${(e as Error).message}`, { cause: e });
    }
    this.server.on('error', () => undefined);
    return (this.server.address() as net.AddressInfo).port;
  }

  /** Replaces the endpoint set (a registry snapshot of routable instances). */
  setEndpoints(list: Instance[]): void {
    this.router.setEndpoints(list);
  }

  get endpoints(): readonly Instance[] {
    return this.router.endpoints;
  }

  private admit(app: Socket): void {
    app.on('error', () => undefined);
    const a = admitSocket(app, this.limit, this.o.tcp);
    if (!a.admitted) {
      this.o.onRefused(a.reason, app, this);
      reset(app);
      return;
    }
    this.open.add(app);
    app.once('close', () => this.open.delete(app));
    this.o.onConnection(app, this);
  }

  /** Stops accepting; open connections may finish for `drainMs`, then are reset. */
  async close(drainMs = 0): Promise<void> {
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    const deadline = Date.now() + drainMs;
    while (this.open.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    for (const s of this.open) reset(s);
    await closed;
  }
}
