/**
 * A TCP proxy for fault tests: put it in front of a real server, point a
 * client at it, and make the network fail at the moment the test chooses:
 *
 * - cut() resets every open connection and closes new ones at once (a
 *   partition, as the client sees it) until heal();
 * - cutOn(match) resets the connection instead of forwarding a chosen
 *   client packet, so exactly that request is lost with its connection;
 * - tap(fn) sees each client packet before it goes on, so a test can act
 *   while a chosen request is in flight.
 *   Packets are length-prefixed (a 4-byte big-endian length, then the
 *   body), which is ZooKeeper's wire format; `match` gets each whole packet
 *   with its index on its connection (0 is ZooKeeper's connect request);
 * - stall(n) accepts the next n connections and then leaves them silent:
 *   nothing forwarded, nothing answered, never closed (as ZooKeeper 3.8
 *   leaves a connection that arrives while it loads its database).
 *
 * Listens on 127.0.0.1, port 0.
 */
import net from 'node:net';
import { once } from 'node:events';

/** A packet rule: resets the connection instead of forwarding the next `times` packets it matches. */
export interface CutRule {
  readonly times: number;
  /** How many packets it has dropped so far. */
  hits: number;
}

export class TcpProxy {
  /** Connections accepted so far, including those closed at once while cut. */
  accepted = 0;
  /** Client packets forwarded to the server so far (a ZooKeeper session starts with one). */
  forwarded = 0;
  private severed = false;
  private stalls = 0;
  /** Connections held by stall(), still open. */
  readonly stalled = new Set<net.Socket>();
  private readonly pairs = new Set<{ client: net.Socket; upstream: net.Socket }>();
  private readonly rules: Array<CutRule & { match: (packet: Buffer, index: number) => boolean }> = [];
  private readonly taps = new Set<(packet: Buffer, index: number) => void>();

  private constructor(private readonly server: net.Server, private readonly target: { host: string; port: number }) {
    server.on('connection', (client) => this.accept(client));
  }

  static async start(target: { host: string; port: number }): Promise<TcpProxy> {
    const server = net.createServer();
    const proxy = new TcpProxy(server, target);
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    return proxy;
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  /** `127.0.0.1:port`, a ZooKeeper connect string. */
  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Connections open now. */
  get open(): number {
    return this.pairs.size;
  }

  /** Resets every open connection and closes new ones at once, until heal(). */
  cut(): void {
    this.severed = true;
    for (const p of [...this.pairs]) this.drop(p);
  }

  heal(): void {
    this.severed = false;
  }

  /**
   * Calls `fn` with each client packet, just before it is forwarded: a test
   * can act at the exact moment a request is on its way. Returns how to stop.
   */
  tap(fn: (packet: Buffer, index: number) => void): () => void {
    this.taps.add(fn);
    return () => void this.taps.delete(fn);
  }

  /** Resets the connection instead of forwarding the next `times` client packets that `match`. */
  cutOn(match: (packet: Buffer, index: number) => boolean, times = 1): CutRule {
    const rule = { match, times, hits: 0 };
    this.rules.push(rule);
    return rule;
  }

  /** The next `n` connections are accepted and left silent (see the module doc); close() ends them. */
  stall(n = 1): void {
    this.stalls += n;
  }

  async close(): Promise<void> {
    this.cut();
    for (const s of this.stalled) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private drop(p: { client: net.Socket; upstream: net.Socket }): void {
    this.pairs.delete(p);
    p.client.resetAndDestroy();
    p.upstream.destroy();
  }

  private accept(client: net.Socket): void {
    this.accepted++;
    if (this.severed) {
      client.resetAndDestroy();
      return;
    }
    if (this.stalls > 0) {
      this.stalls--;
      this.stalled.add(client);
      client.on('error', () => undefined).on('close', () => this.stalled.delete(client));
      client.resume();
      return;
    }
    const upstream = net.connect(this.target);
    const pair = { client, upstream };
    this.pairs.add(pair);
    const end = (): void => {
      if (this.pairs.has(pair)) this.drop(pair);
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
    upstream.on('data', (d: Buffer) => client.write(d));
    let pending = Buffer.alloc(0);
    let index = 0;
    client.on('data', (d: Buffer) => {
      pending = Buffer.concat([pending, d]);
      while (pending.length >= 4) {
        const size = pending.readInt32BE(0);
        if (pending.length < 4 + size) break;
        const packet = pending.subarray(0, 4 + size);
        pending = pending.subarray(4 + size);
        const rule = this.rules.find((r) => r.hits < r.times && r.match(packet, index));
        const at = index++;
        if (rule) {
          rule.hits++;
          end();
          return;
        }
        for (const tap of [...this.taps]) tap(packet, at);
        this.forwarded++;
        upstream.write(packet);
      }
    });
  }
}

/** A ZooKeeper request as the proxy sees it: header and, for path operations, the path. */
export interface ZkRequest {
  xid: number;
  /** ZooKeeper op code: 1 create, 2 delete, 3 exists, 4 getData, 5 setData, 12 getChildren2, ... */
  type: number;
  path?: string;
  /** getData, exists, getChildren: whether it sets a watch. */
  watch?: boolean;
}

/** ZooKeeper op codes used by the tests. */
export const ZK_OP = { create: 1, delete: 2, exists: 3, getData: 4, setData: 5, getChildren2: 12 } as const;

/** Decodes a client packet (after the connect request, index 0); undefined for one that is not a request. */
export function zkRequest(packet: Buffer, index: number): ZkRequest | undefined {
  if (index === 0 || packet.length < 12) return undefined;
  const xid = packet.readInt32BE(4);
  const type = packet.readInt32BE(8);
  const withPath: number[] = [ZK_OP.create, ZK_OP.delete, ZK_OP.exists, ZK_OP.getData, ZK_OP.setData, ZK_OP.getChildren2];
  if (!withPath.includes(type) || packet.length < 16) return { xid, type };
  const len = packet.readInt32BE(12);
  const path = packet.toString('utf8', 16, 16 + len);
  const reads: number[] = [ZK_OP.exists, ZK_OP.getData, ZK_OP.getChildren2];
  return reads.includes(type) ? { xid, type, path, watch: packet[16 + len] === 1 } : { xid, type, path };
}
