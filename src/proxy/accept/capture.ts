/**
 * The accept stage of transparent mode: the ports netfilter redirects to
 * (outbound capture 15001, inbound capture 15006). A connection arrives
 * here with its destination rewritten; the original one is read back from
 * the kernel (SO_ORIGINAL_DST, transparent/original-dst.ts). A connection
 * that was not redirected (someone dialled the capture port itself, or
 * the redirect rules are gone) is refused rather than looped back into
 * the proxy. Admission applies the same caps and socket options as every
 * other listener; what the flow is for is the node proxy's decision.
 */
import net, { type Socket } from 'node:net';
import { once } from 'node:events';
import { KnitError } from '../../errors.js';
import { reset } from '../forward/splice.js';
import { admitSocket, type ConnectionLimit, type TcpOptions } from '../limits.js';
import { notRedirected, originalDestination } from '../transparent/original-dst.js';

/** Where a captured connection was headed. */
export interface OriginalDestination {
  address: string;
  port: number;
  family: 4 | 6;
}

export interface CaptureOptions {
  /** 'outbound' (15001: applications here calling out) or 'inbound' (15006: clients outside the mesh calling in). */
  direction: 'outbound' | 'inbound';
  /** Addresses to bind: loopback for outbound (REDIRECT in OUTPUT lands there), every address for inbound. */
  hosts: string[];
  port: number;
  tcp: TcpOptions;
  hostLimit: ConnectionLimit;
  /** A redirected connection, admitted, with where it was going. */
  onConnection: (app: Socket, dst: OriginalDestination) => void;
  /** Refused before anything else (not redirected, over a cap): counted and logged by the caller. */
  onRefused: (reason: string, remote: string) => void;
}

export class CaptureListener {
  private readonly servers: net.Server[] = [];
  private readonly open = new Set<Socket>();

  constructor(private readonly o: CaptureOptions) {}

  /**
   * Listens on every host in `hosts` that this machine has (an IPv6
   * loopback may be missing: skipped); rejects KNIT_ERR_LISTEN when none
   * could be bound, naming the port.
   */
  async start(): Promise<number> {
    const errors: string[] = [];
    let port = this.o.port;
    for (const host of this.o.hosts) {
      const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => this.admit(s));
      server.listen({ port, host, ipv6Only: host.includes(':') });
      try {
        await once(server, 'listening');
      } catch (e) {
        errors.push(`${host}: ${(e as Error).message}`);
        continue;
      }
      server.on('error', () => undefined);
      port = (server.address() as net.AddressInfo).port;
      this.servers.push(server);
    }
    if (this.servers.length === 0) throw new KnitError('KNIT_ERR_LISTEN', `${this.o.direction} capture cannot listen on port ${this.o.port}: ${errors.join('; ')}`);
    return port;
  }

  get port(): number {
    return (this.servers[0]?.address() as net.AddressInfo | null)?.port ?? 0;
  }

  private admit(app: Socket): void {
    app.on('error', () => undefined);
    const remote = `${app.remoteAddress ?? '?'}:${app.remotePort ?? '?'}`;
    const dst = originalDestination(app);
    if ('error' in dst) {
      this.o.onRefused(`no original destination (${dst.error})`, remote);
      return reset(app);
    }
    if (notRedirected(app, dst)) {
      this.o.onRefused(`not redirected: connected to the ${this.o.direction} capture port itself`, remote);
      return reset(app);
    }
    const a = admitSocket(app, this.o.hostLimit, this.o.tcp);
    if (!a.admitted) {
      this.o.onRefused(a.reason, remote);
      return reset(app);
    }
    this.open.add(app);
    app.once('close', () => this.open.delete(app));
    this.o.onConnection(app, dst);
  }

  /** Stops accepting and resets what is still open (the node proxy drains flows before). */
  async close(): Promise<void> {
    const closed = Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    for (const s of this.open) reset(s);
    await closed;
  }
}
