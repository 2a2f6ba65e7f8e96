/**
 * The mesh's DNS server for transparent mode. Applications on the host ask it
 * for every name: mesh names (`<service>.knit`, and Consul's
 * `<service>.service.consul` so that applications moved from Consul keep
 * working) are answered here with the service's virtual IP, and every other
 * name is forwarded to the resolvers the host had before (/etc/resolv.conf).
 *
 * It is built to be wired in by the agent, not to reach out on its own: the
 * service table (`lookup`, `reverse`), the upstream list, the upstream
 * sockets and the clock are injected, and each query is reported through
 * `onQuery` and counted in `stats` for the agent's metrics.
 *
 * Wire format is dns-packet's; this module only reads the two header words
 * it needs before a full decode (the query id and flags, so that even a
 * message dns-packet rejects can get a FORMERR carrying its id). Forwarded
 * queries are relayed as the client's own bytes with a fresh random id, so
 * EDNS options, DNSSEC bits and record types unknown here pass through
 * untouched, and the answer goes back with the client's id.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import { once } from 'node:events';
import { randomInt } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import dnsPacket from 'dns-packet';
import type { Answer, DecodedPacket, OptAnswer, Packet, Question } from 'dns-packet';
import { KnitError } from '../../errors.js';
import { formatIp, inRange, parseIp, type VipRange } from './vips.js';

/** The address the server listens on by default: loopback only, as it answers for this host alone. */
export const DEFAULT_DNS_HOST = '127.0.0.1';
/**
 * The default port: unprivileged, next to the capture ports (15001/15006);
 * the transparent-mode rules redirect port 53 to it.
 */
export const DEFAULT_DNS_PORT = 15053;
/** The mesh's own zone: `<service>.knit`. */
export const DEFAULT_MESH_DOMAIN = 'knit';
/** Consul's zone, answered for `<service>.service.consul` compatibility. */
export const DEFAULT_CONSUL_DOMAIN = 'consul';
/**
 * TTL of mesh answers, and of their negative answers (the SOA minimum). VIPs
 * are sticky, so a cached address rarely goes stale; what a short TTL bounds
 * is how long a client keeps a cached NXDOMAIN after a service is created,
 * and keeps resolving a service after it is removed. 5 s keeps caching stubs
 * (systemd-resolved, nscd, the JVM) from asking again on every connection
 * while a change is seen within seconds.
 */
export const MESH_TTL_SECONDS = 5;
/**
 * Per-try upstream timeout when none is given: well under the 5 s a glibc
 * client waits for us by default, so that a dead first upstream still leaves
 * time to try the next one within the client's own try.
 */
export const DEFAULT_UPSTREAM_TIMEOUT_MS = 2000;
/** Rounds over the upstream list when none is given (glibc's default `attempts`). */
export const DEFAULT_UPSTREAM_ATTEMPTS = 2;
/** An idle TCP client connection is closed after this long (RFC 7766 6.2.3 asks servers for a timeout of seconds). */
export const DEFAULT_TCP_IDLE_MS = 10_000;
/** TCP client connections open at once; past it new ones are closed at once. Local clients only, so a few hundred is plenty. */
export const DEFAULT_MAX_TCP_CONNECTIONS = 256;
/** Forwarded queries in flight at once; past it a query gets SERVFAIL rather than another upstream socket. */
export const DEFAULT_MAX_INFLIGHT = 1024;
/** Queries of one TCP connection in flight at once; past it the connection is not read until one completes. */
const TCP_PIPELINE = 32;
/** The UDP answer size every client accepts (RFC 1035); larger needs the client's EDNS size. */
const CLASSIC_UDP_LIMIT = 512;
/** The EDNS UDP size advertised in our own answers (DNS flag day 2020: no IP fragmentation). */
const EDNS_UDP_SIZE = 1232;
/** glibc uses only the first three `nameserver` lines (MAXNS); so do we, to forward where the host would have asked. */
const MAX_NAMESERVERS = 3;

const RCODE = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5 } as const;
const QR = 0x8000;
const RD = dnsPacket.RECURSION_DESIRED;
const RA = dnsPacket.RECURSION_AVAILABLE;
const AA = dnsPacket.AUTHORITATIVE_ANSWER;
const TC = dnsPacket.TRUNCATED_RESPONSE;

// ---------------------------------------------------------------------------
// resolv.conf

/** What the host's resolver configuration says, as far as forwarding needs it. */
export interface ResolvConf {
  /** `nameserver` addresses in file order, at most three (glibc's MAXNS). */
  nameservers: string[];
  /** The search list (`search`, or `domain`; the last such line wins, as in glibc). */
  search: string[];
  /** `options timeout:n`, in milliseconds (glibc default 5 s, capped at 30 s). */
  timeoutMs: number;
  /** `options attempts:n` (glibc default 2, capped at 5). */
  attempts: number;
  /** `options rotate`. */
  rotate: boolean;
  /** `options ndots:n` (default 1, capped at 15). */
  ndots: number;
}

/** One resolver to forward to. resolv.conf has no ports (always 53); tests and agents may use others. */
export interface DnsUpstream {
  readonly address: string;
  readonly port: number;
}

/**
 * Parses resolv.conf(5) text. Unknown lines and options are ignored, as the
 * C library ignores them; a `nameserver` that is not an IP address is
 * skipped. No `nameserver` line gives an empty list: glibc would then ask
 * 127.0.0.1, but forwarding there could be forwarding to ourselves, so the
 * caller decides (an empty list makes the server answer SERVFAIL).
 */
export function parseResolvConf(text: string): ResolvConf {
  const conf: ResolvConf = { nameservers: [], search: [], timeoutMs: 5000, attempts: 2, rotate: false, ndots: 1 };
  for (const raw of text.split('\n')) {
    const line = raw.replace(/[#;].*$/, '').trim();
    const [key, ...args] = line.split(/\s+/);
    if (key === 'nameserver' && args[0] !== undefined) {
      const address = args[0];
      if (net.isIP(address.split('%')[0] ?? '') !== 0 && conf.nameservers.length < MAX_NAMESERVERS) conf.nameservers.push(address);
    } else if (key === 'search') {
      conf.search = args;
    } else if (key === 'domain' && args[0] !== undefined) {
      conf.search = [args[0]];
    } else if (key === 'options') {
      for (const opt of args) {
        const [name, value] = opt.split(':');
        const n = value !== undefined && /^\d+$/.test(value) ? Number(value) : undefined;
        if (name === 'timeout' && n !== undefined) conf.timeoutMs = Math.min(Math.max(n, 1), 30) * 1000;
        else if (name === 'attempts' && n !== undefined) conf.attempts = Math.min(Math.max(n, 1), 5);
        else if (name === 'ndots' && n !== undefined) conf.ndots = Math.min(n, 15);
        else if (name === 'rotate') conf.rotate = true;
      }
    }
  }
  return conf;
}

/** The upstreams a resolv.conf names, each on port 53. */
export function upstreamsFromResolvConf(conf: ResolvConf): DnsUpstream[] {
  return conf.nameservers.map((address) => ({ address, port: 53 }));
}

/**
 * Reads and parses a resolv.conf. A missing file reads as empty (no
 * upstreams), as on a host without one; any other read error rejects with
 * KNIT_ERR_CONFIG naming the path.
 */
export async function readResolvConf(
  path = '/etc/resolv.conf',
  read: (path: string) => Promise<string> = (p) => readFile(p, 'utf8'),
): Promise<ResolvConf> {
  try {
    return parseResolvConf(await read(path));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return parseResolvConf('');
    throw new KnitError('KNIT_ERR_CONFIG', `cannot read ${path}: ${(e as Error).message}`, { cause: e });
  }
}

// ---------------------------------------------------------------------------
// Names

/** The zones the server is authoritative for. */
export interface MeshZones {
  /** The mesh zone, e.g. `knit`. */
  mesh: string;
  /** Consul's zone, e.g. `consul`; undefined to leave Consul names to the upstreams. */
  consul: string | undefined;
}

/** What a query name is to the mesh. */
export type MeshName =
  /** `<service>.<mesh>`, or Consul's `[<tag>.]<service>.service[.<dc>].<consul>`. */
  | { kind: 'service'; zone: string; service: string; tag?: string; datacenter?: string }
  /** The zone itself. */
  | { kind: 'apex'; zone: string }
  /** Under a mesh zone but not a service name: NXDOMAIN. */
  | { kind: 'unknown'; zone: string }
  /** A full reverse name (`d.c.b.a.in-addr.arpa`, 32-nibble `ip6.arpa`), with the address it names. */
  | { kind: 'reverse'; ip: string }
  /** Not the mesh's: forwarded. */
  | { kind: 'outside' };

/** Lower case, without the trailing dot; the root is ''. */
function normalize(name: string): string {
  const n = name.toLowerCase();
  if (n === '.') return '';
  return n.endsWith('.') ? n.slice(0, -1) : n;
}

/** The labels of `name` before `zone`, or undefined when `name` is not in `zone`. */
function labelsUnder(name: string, zone: string): string[] | undefined {
  if (name === zone) return [];
  if (!name.endsWith(`.${zone}`)) return undefined;
  return name.slice(0, -zone.length - 1).split('.');
}

/**
 * Says what a query name is to the mesh. Pure; case-insensitive (the service
 * names it returns are lower case). Consul forms: the service is the label
 * before `service`; a label before it is a tag, a label after it a
 * datacenter. Tags and datacenters are returned but the server does not
 * filter on them: one mesh has one VIP per service.
 */
export function classifyName(name: string, zones: MeshZones): MeshName {
  const n = normalize(name);
  const mesh = normalize(zones.mesh);
  const under = labelsUnder(n, mesh);
  if (under !== undefined) {
    if (under.length === 0) return { kind: 'apex', zone: mesh };
    const [service] = under;
    if (under.length === 1 && service) return { kind: 'service', zone: mesh, service };
    return { kind: 'unknown', zone: mesh };
  }
  if (zones.consul !== undefined) {
    const consul = normalize(zones.consul);
    const c = labelsUnder(n, consul);
    if (c !== undefined) return classifyConsul(c, consul);
  }
  return classifyReverse(n) ?? { kind: 'outside' };
}

function classifyConsul(labels: string[], zone: string): MeshName {
  if (labels.length === 0) return { kind: 'apex', zone };
  // [tag.]svc.service[.dc]: find `service` second to last (no dc) or third to last (dc).
  const last = labels.length - 1;
  let at: number;
  let datacenter: string | undefined;
  if (labels[last] === 'service') at = last;
  else if (labels[last - 1] === 'service') {
    at = last - 1;
    datacenter = labels[last];
  } else return { kind: 'unknown', zone };
  const before = labels.slice(0, at);
  const service = before[before.length - 1];
  if (!service || before.length > 2 || (before.length === 2 && !before[0])) return { kind: 'unknown', zone };
  const out: MeshName = { kind: 'service', zone, service };
  if (before.length === 2 && before[0]) out.tag = before[0];
  if (datacenter) out.datacenter = datacenter;
  return out;
}

function classifyReverse(n: string): MeshName | undefined {
  const v4 = labelsUnder(n, 'in-addr.arpa');
  if (v4 !== undefined) {
    const ip = v4.slice().reverse().join('.');
    return v4.length === 4 && net.isIPv4(ip) ? { kind: 'reverse', ip } : undefined;
  }
  const v6 = labelsUnder(n, 'ip6.arpa');
  if (v6 !== undefined && v6.length === 32 && v6.every((l) => /^[0-9a-f]$/.test(l))) {
    return { kind: 'reverse', ip: formatIp(6, BigInt(`0x${v6.slice().reverse().join('')}`)) };
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// Server

/** How a query ended, for counters. Upstream answers count as `forwarded` whatever their rcode. */
export type QueryKind =
  /** Answered from the mesh (an address, a PTR, or NOERROR with no record of the asked type). */
  | 'mesh'
  /** A mesh name that is no service: NXDOMAIN, authoritative. */
  | 'nxdomain'
  /** Relayed an upstream's answer. */
  | 'forwarded'
  /** No upstream answered, none is configured, the server was overloaded, or `lookup` threw. */
  | 'servfail'
  /** The query could not be decoded, or had other than one question. */
  | 'formerr'
  /** An opcode other than QUERY. */
  | 'notimp'
  /** Not answered: shorter than a header, or a response rather than a query (answering could ping-pong). */
  | 'dropped';

/** Counts of queries by how they ended. */
export type DnsStats = Record<QueryKind, number>;

/** One finished query, for logs and metrics. */
export interface QueryEvent {
  kind: QueryKind;
  transport: 'udp' | 'tcp';
  /** The question, when there was one. */
  name?: string;
  type?: string;
  /** Why, for servfail/formerr/dropped/notimp (e.g. `timeout`, `no-upstream`, `unparseable`). */
  reason?: string;
  /** The upstream whose answer was relayed. */
  upstream?: DnsUpstream;
  durationMs: number;
}

/** How the server reaches upstreams: injected so tests and the agent can choose sockets. */
export interface UpstreamDialer {
  /** A fresh, unbound UDP socket for one exchange; the server connects it and closes it. */
  udp(type: 'udp4' | 'udp6'): dgram.Socket;
  /** A TCP connection to an upstream, for an answer that was truncated over UDP; the server ends it. */
  tcp(address: string, port: number): net.Socket;
}

/** Node's own sockets. */
export const nodeDialer: UpstreamDialer = {
  udp: (type) => dgram.createSocket({ type }),
  tcp: (address, port) => net.connect({ host: address, port }),
};

/** What a MeshDns is built from; only `lookup` and `upstreams` have no default. */
export interface MeshDnsOptions {
  /** A service's VIP, or undefined when there is no such service. Called with the lower-case service name. Must not block. */
  lookup: (service: string) => string | undefined;
  /** The service a VIP belongs to, for PTR queries; undefined when it is none. */
  reverse?: (ip: string) => string | undefined;
  /** The VIP range: PTR queries for its addresses are answered here (NXDOMAIN when `reverse` knows none) instead of forwarded. */
  vipRange?: VipRange;
  /** Where other names go, in order; a function is called per query, so the agent can follow resolv.conf changes. */
  upstreams: readonly DnsUpstream[] | (() => readonly DnsUpstream[]);
  /**
   * Upstreams never to forward to, besides the server's own listening
   * addresses (which are always left out): e.g. an address that the capture
   * rules redirect to this server, which would loop.
   */
  avoid?: readonly DnsUpstream[];
  /** Addresses to listen on, each over UDP and TCP on the same port. Default `['127.0.0.1']`; add `'::1'` for IPv6 clients. */
  hosts?: readonly string[];
  /** Default DEFAULT_DNS_PORT; 0 picks a free port (the same one for UDP and TCP on every host). */
  port?: number;
  /** Default DEFAULT_MESH_DOMAIN. */
  domain?: string;
  /** Default DEFAULT_CONSUL_DOMAIN; false to forward Consul names instead. */
  consulDomain?: string | false;
  /** Default MESH_TTL_SECONDS. */
  ttlSeconds?: number;
  /** Per try of one upstream over one transport; default DEFAULT_UPSTREAM_TIMEOUT_MS (an agent may pass ResolvConf.timeoutMs). */
  timeoutMs?: number;
  /** Rounds over the upstream list; default DEFAULT_UPSTREAM_ATTEMPTS (an agent may pass ResolvConf.attempts). */
  attempts?: number;
  /** Default DEFAULT_TCP_IDLE_MS. */
  tcpIdleMs?: number;
  /** Default DEFAULT_MAX_TCP_CONNECTIONS. */
  maxTcpConnections?: number;
  /** Default DEFAULT_MAX_INFLIGHT. */
  maxInflight?: number;
  /** Default nodeDialer. */
  dialer?: UpstreamDialer;
  /** Milliseconds on a monotonic clock, for QueryEvent.durationMs. */
  now?: () => number;
  /** Called once per query with how it ended. Must not throw (what it throws is swallowed). */
  onQuery?: (event: QueryEvent) => void;
}

/** The result of asking one upstream: an answer, or why there is none. */
type Exchange = { ok: true; answer: Buffer } | { ok: false; reason: string };

/** What handling one query produced: the reply to send (if any) and how to count it. */
interface Outcome {
  reply: Buffer | undefined;
  kind: QueryKind;
  reason?: string;
  upstream?: DnsUpstream;
  question?: Question;
}

const errnoReason = (e: unknown): string => ((e as NodeJS.ErrnoException).code ?? 'error').toLowerCase();

/**
 * The DNS server. `start()` listens; `close()` stops listening, drops TCP
 * clients, abandons forwarded queries and frees their sockets. It never
 * throws or rejects from a query: a malformed one gets FORMERR (or is
 * dropped when it has no header), and any failure of the upstreams SERVFAIL.
 */
export class MeshDns {
  private readonly zones: MeshZones;
  private readonly ttl: number;
  private readonly timeoutMs: number;
  private readonly attempts: number;
  private readonly dialer: UpstreamDialer;
  private readonly now: () => number;
  private readonly counts: DnsStats = { mesh: 0, nxdomain: 0, forwarded: 0, servfail: 0, formerr: 0, notimp: 0, dropped: 0 };
  private readonly udpSockets: dgram.Socket[] = [];
  private readonly tcpServers: net.Server[] = [];
  private readonly tcpClients = new Set<net.Socket>();
  /** Aborts of the upstream exchanges in flight, run by close(). */
  private readonly cancels = new Set<() => void>();
  private inflight = 0;
  private boundPort = 0;
  private bound: DnsUpstream[] = [];
  private closed = false;

  constructor(private readonly o: MeshDnsOptions) {
    this.zones = { mesh: o.domain ?? DEFAULT_MESH_DOMAIN, consul: o.consulDomain === false ? undefined : (o.consulDomain ?? DEFAULT_CONSUL_DOMAIN) };
    this.ttl = o.ttlSeconds ?? MESH_TTL_SECONDS;
    this.timeoutMs = o.timeoutMs ?? DEFAULT_UPSTREAM_TIMEOUT_MS;
    this.attempts = Math.max(1, o.attempts ?? DEFAULT_UPSTREAM_ATTEMPTS);
    this.dialer = o.dialer ?? nodeDialer;
    this.now = o.now ?? (() => performance.now());
  }

  /** The port listened on (after start). */
  get port(): number {
    return this.boundPort;
  }

  /** The addresses listened on (after start), each over UDP and TCP. */
  get addresses(): readonly DnsUpstream[] {
    return this.bound;
  }

  /** Counts so far, by how each query ended. A copy. */
  get stats(): DnsStats {
    return { ...this.counts };
  }

  /**
   * Listens over UDP and TCP on every host, on one port. With port 0 it
   * picks a port free for both transports on all hosts (retrying when TCP
   * finds the port UDP got taken). Resolves with the port; rejects with
   * KNIT_ERR_LISTEN naming the address.
   */
  async start(): Promise<number> {
    if (this.closed) throw new KnitError('KNIT_ERR_CLOSED', 'DNS server is closed');
    if (this.bound.length > 0) return this.boundPort; // already listening
    const hosts = this.o.hosts ?? [DEFAULT_DNS_HOST];
    const wanted = this.o.port ?? DEFAULT_DNS_PORT;
    // With port 0 the port UDP got may be taken for TCP (or on another host): pick again, a few times.
    const tries = wanted === 0 ? 8 : 1;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.listenAll(hosts, wanted);
        return this.boundPort;
      } catch (e) {
        await this.closeListeners();
        const inUse = (e as NodeJS.ErrnoException).code === 'EADDRINUSE';
        if (!(inUse && attempt < tries)) {
          throw new KnitError('KNIT_ERR_LISTEN', `DNS server cannot listen on ${hosts.join(', ')} port ${wanted}: ${(e as Error).message}`, { cause: e });
        }
      }
    }
  }

  private async listenAll(hosts: readonly string[], wanted: number): Promise<void> {
    let port = wanted;
    for (const host of hosts) {
      const udp = dgram.createSocket({ type: net.isIPv6(host) ? 'udp6' : 'udp4', ipv6Only: net.isIPv6(host) });
      this.udpSockets.push(udp);
      udp.bind({ address: host, port, exclusive: true });
      await once(udp, 'listening');
      port = udp.address().port;
      // Send failures (a client gone away) must not become uncaught 'error's.
      udp.on('error', () => undefined);
      udp.on('message', (msg, rinfo) => this.onDatagram(udp, msg, rinfo));

      const tcp = net.createServer({ allowHalfOpen: true }, (s) => this.onConnection(s));
      this.tcpServers.push(tcp);
      tcp.listen({ host, port, exclusive: true });
      await once(tcp, 'listening');
      tcp.on('error', () => undefined);
    }
    this.boundPort = port;
    this.bound = hosts.map((address) => ({ address, port }));
  }

  private async closeListeners(): Promise<void> {
    const udps = this.udpSockets.splice(0);
    const tcps = this.tcpServers.splice(0);
    await Promise.all([
      ...udps.map((u) => new Promise<void>((resolve) => {
        try {
          u.close(() => resolve());
        } catch {
          resolve(); // never bound, or already closed
        }
      })),
      ...tcps.map((t) => new Promise<void>((resolve) => (t.listening ? t.close(() => resolve()) : resolve()))),
    ]);
  }

  /** Stops listening, closes TCP clients and abandons forwarded queries. Idempotent. */
  async close(): Promise<void> {
    this.closed = true;
    for (const cancel of [...this.cancels]) cancel();
    for (const s of this.tcpClients) s.destroy();
    this.tcpClients.clear();
    await this.closeListeners();
  }

  // --- transports -----------------------------------------------------------

  private onDatagram(udp: dgram.Socket, msg: Buffer, rinfo: dgram.RemoteInfo): void {
    void this.handle(msg, 'udp').then((reply) => {
      if (!reply || this.closed) return;
      try {
        udp.send(reply, rinfo.port, rinfo.address, () => undefined);
      } catch {
        // The socket closed meanwhile: the client will retry.
      }
    });
  }

  private onConnection(s: net.Socket): void {
    const max = this.o.maxTcpConnections ?? DEFAULT_MAX_TCP_CONNECTIONS;
    if (this.closed || this.tcpClients.size >= max) {
      s.destroy();
      return;
    }
    this.tcpClients.add(s);
    s.setNoDelay(true);
    s.setTimeout(this.o.tcpIdleMs ?? DEFAULT_TCP_IDLE_MS, () => s.destroy());
    s.on('error', () => undefined);
    s.on('close', () => this.tcpClients.delete(s));
    let pending: Buffer = Buffer.alloc(0);
    let inflight = 0;
    let ended = false;
    // Takes whole length-prefixed messages off the buffer while the pipeline has room.
    const pump = (): void => {
      while (inflight < TCP_PIPELINE && pending.length >= 2) {
        const len = pending.readUInt16BE(0);
        if (pending.length < 2 + len) break;
        const frame = pending.subarray(2, 2 + len);
        pending = pending.subarray(2 + len);
        inflight++;
        void this.handle(frame, 'tcp').then((reply) => {
          inflight--;
          if (reply && !s.destroyed) s.write(frame2(reply));
          pump();
        });
      }
      if (inflight >= TCP_PIPELINE) s.pause();
      else if (!ended) s.resume();
      // The client sent its last query (half-close): answer what is left, then end.
      if (ended && inflight === 0 && !s.destroyed && !s.writableEnded) s.end();
    };
    s.on('data', (chunk: Buffer) => {
      pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
      pump();
    });
    s.on('end', () => {
      ended = true;
      pump();
    });
  }

  // --- queries --------------------------------------------------------------

  /** Handles one message from a client; resolves with the reply to send, if any. Never rejects. */
  private async handle(msg: Buffer, transport: 'udp' | 'tcp'): Promise<Buffer | undefined> {
    const started = this.now();
    let out: Outcome;
    try {
      out = await this.answer(msg, transport);
    } catch (e) {
      // A bug or a throwing lookup(): the client still gets an answer.
      out = { reply: msg.length >= 12 ? servfailFor(msg, undefined) : undefined, kind: 'servfail', reason: `internal: ${(e as Error).message}` };
    }
    this.counts[out.kind]++;
    if (this.o.onQuery) {
      const event: QueryEvent = { kind: out.kind, transport, durationMs: this.now() - started };
      if (out.question) {
        event.name = out.question.name;
        event.type = out.question.type;
      }
      if (out.reason !== undefined) event.reason = out.reason;
      if (out.upstream) event.upstream = out.upstream;
      try {
        this.o.onQuery(event);
      } catch {
        // A metrics callback must not take DNS down.
      }
    }
    return out.reply;
  }

  private async answer(msg: Buffer, transport: 'udp' | 'tcp'): Promise<Outcome> {
    // The header is read by hand only to decide whether and how to answer at all.
    if (msg.length < 12) return { reply: undefined, kind: 'dropped', reason: 'short' };
    const flags = msg.readUInt16BE(2);
    if (flags & QR) return { reply: undefined, kind: 'dropped', reason: 'response' };
    let query: DecodedPacket;
    try {
      query = dnsPacket.decode(msg);
    } catch {
      return { reply: encodeReply(msg, RCODE.FORMERR, {}), kind: 'formerr', reason: 'unparseable' };
    }
    const opcode = (flags >> 11) & 0xf;
    if (opcode !== 0) return { reply: encodeReply(msg, RCODE.NOTIMP, {}), kind: 'notimp', reason: `opcode ${opcode}` };
    const question = query.questions?.length === 1 ? query.questions[0] : undefined;
    if (!question) return { reply: encodeReply(msg, RCODE.FORMERR, {}), kind: 'formerr', reason: 'not one question' };
    const opt = query.additionals?.find((a): a is OptAnswer => a.type === 'OPT');
    const cls = question.class ?? 'IN';
    const name = cls === 'IN' || cls === 'ANY' ? classifyName(question.name, this.zones) : ({ kind: 'outside' } as const);

    switch (name.kind) {
      case 'service': {
        const vip = this.o.lookup(name.service);
        if (vip === undefined) return this.authoritative(msg, question, opt, RCODE.NXDOMAIN, [], name.zone);
        const ip = parseIp(vip);
        if (!ip) return { reply: servfailFor(msg, question, opt), kind: 'servfail', reason: `lookup returned ${JSON.stringify(vip)}`, question };
        // A string: dns-packet's RecordType has no 'ANY', but a query may ask for it.
        const want: string = question.type;
        const records: Answer[] = [];
        if (ip.family === 4 && (want === 'A' || want === 'ANY')) records.push({ name: question.name, type: 'A', class: 'IN', ttl: this.ttl, data: vip });
        if (ip.family === 6 && (want === 'AAAA' || want === 'ANY')) {
          records.push({ name: question.name, type: 'AAAA', class: 'IN', ttl: this.ttl, data: formatIp(6, ip.value) });
        }
        return this.authoritative(msg, question, opt, RCODE.NOERROR, records, name.zone);
      }
      case 'apex': {
        const want: string = question.type;
        const records = want === 'SOA' || want === 'ANY' ? [this.soa(name.zone, question.name)] : [];
        return this.authoritative(msg, question, opt, RCODE.NOERROR, records, name.zone);
      }
      case 'unknown':
        return this.authoritative(msg, question, opt, RCODE.NXDOMAIN, [], name.zone);
      case 'reverse': {
        const service = this.o.reverse?.(name.ip);
        if (service !== undefined) {
          const want: string = question.type;
          const records: Answer[] =
            want === 'PTR' || want === 'ANY'
              ? [{ name: question.name, type: 'PTR', class: 'IN', ttl: this.ttl, data: `${service}.${normalize(this.zones.mesh)}` }]
              : [];
          return this.authoritative(msg, question, opt, RCODE.NOERROR, records, undefined);
        }
        if (this.o.vipRange && inRange(this.o.vipRange, name.ip)) return this.authoritative(msg, question, opt, RCODE.NXDOMAIN, [], undefined);
        return this.forward(msg, question, opt, transport);
      }
      case 'outside':
        return this.forward(msg, question, opt, transport);
    }
  }

  /** A synthetic SOA for a mesh zone: what resolvers take the negative-caching TTL from (RFC 2308). */
  private soa(zone: string, owner = zone): Answer {
    return {
      name: owner,
      type: 'SOA',
      class: 'IN',
      ttl: this.ttl,
      data: { mname: `ns.${zone}`, rname: `hostmaster.${zone}`, serial: 1, refresh: 3600, retry: 600, expire: 86400, minimum: this.ttl },
    };
  }

  /** An answer from the mesh's own data; NXDOMAIN and NODATA carry the zone's SOA so clients cache them for the TTL only. */
  private authoritative(msg: Buffer, question: Question, opt: OptAnswer | undefined, rcode: number, answers: Answer[], zone: string | undefined): Outcome {
    const authorities = answers.length === 0 && zone !== undefined ? [this.soa(zone)] : [];
    const reply = encodeReply(msg, rcode, { question, answers, authorities, opt, aa: true });
    return { reply, kind: rcode === RCODE.NXDOMAIN ? 'nxdomain' : 'mesh', question };
  }

  /** The upstreams to use now: the configured ones less our own addresses and the avoided ones. */
  private upstreams(): DnsUpstream[] {
    const list = typeof this.o.upstreams === 'function' ? this.o.upstreams() : this.o.upstreams;
    const same = (a: DnsUpstream, b: DnsUpstream): boolean => {
      if (a.port !== b.port) return false;
      if (b.address === '0.0.0.0' || b.address === '::') return true; // a wildcard listener is every local address
      const x = parseIp(a.address);
      const y = parseIp(b.address);
      return x !== undefined && y !== undefined ? x.family === y.family && x.value === y.value : a.address === b.address;
    };
    const never = [...this.bound, ...(this.o.avoid ?? [])];
    return list.filter((u) => !never.some((n) => same(u, n)));
  }

  /**
   * Forwards to the upstreams: each in turn over UDP, over TCP again when
   * the UDP answer was truncated, for `attempts` rounds. An upstream that
   * answers SERVFAIL, REFUSED or NOTIMP is passed over like one that does
   * not answer (as glibc does), but its answer is relayed if no other
   * upstream does better.
   */
  private async forward(msg: Buffer, question: Question, opt: OptAnswer | undefined, transport: 'udp' | 'tcp'): Promise<Outcome> {
    const servers = this.upstreams();
    if (servers.length === 0) return { reply: servfailFor(msg, question, opt), kind: 'servfail', reason: 'no-upstream', question };
    if (this.inflight >= (this.o.maxInflight ?? DEFAULT_MAX_INFLIGHT)) {
      return { reply: servfailFor(msg, question, opt), kind: 'servfail', reason: 'overloaded', question };
    }
    this.inflight++;
    try {
      let fallback: { answer: Buffer; upstream: DnsUpstream } | undefined;
      let reason = 'no answer';
      for (let round = 0; round < this.attempts; round++) {
        for (const upstream of servers) {
          if (this.closed) return { reply: undefined, kind: 'dropped', reason: 'closed', question };
          const r = await this.exchangeUdp(msg, question, upstream);
          if (!r.ok) {
            reason = `${upstream.address}:${upstream.port} over udp: ${r.reason}`;
            continue;
          }
          let answer = r.answer;
          if (answer.readUInt16BE(2) & TC) {
            const t = await this.exchangeTcp(msg, question, upstream);
            // Without the full answer the truncated one still tells the client to retry over TCP itself.
            if (t.ok) answer = t.answer;
          }
          const rcode = answer.readUInt16BE(2) & 0xf;
          if (rcode === RCODE.SERVFAIL || rcode === RCODE.REFUSED || rcode === RCODE.NOTIMP) {
            fallback = { answer, upstream };
            reason = `${upstream.address}:${upstream.port} answered rcode ${rcode}`;
            continue;
          }
          return { reply: this.relay(msg, answer, question, opt, transport), kind: 'forwarded', upstream, question };
        }
      }
      if (fallback) return { reply: this.relay(msg, fallback.answer, question, opt, transport), kind: 'forwarded', upstream: fallback.upstream, question };
      return { reply: servfailFor(msg, question, opt), kind: 'servfail', reason, question };
    } finally {
      this.inflight--;
    }
  }

  /** The upstream's answer with the client's id; over UDP, a truncated stub when it exceeds what the client accepts. */
  private relay(msg: Buffer, answer: Buffer, question: Question, opt: OptAnswer | undefined, transport: 'udp' | 'tcp'): Buffer {
    const limit = Math.max(CLASSIC_UDP_LIMIT, opt?.udpPayloadSize ?? 0);
    if (transport === 'udp' && answer.length > limit) {
      return encodeReply(msg, answer.readUInt16BE(2) & 0xf, { question, opt, tc: true });
    }
    const out = Buffer.from(answer);
    out.writeUInt16BE(msg.readUInt16BE(0), 0);
    return out;
  }

  /** The client's query with a fresh random id (so answers for other clients, or spoofed ones, do not match). */
  private static rewrite(msg: Buffer): { wire: Buffer; id: number } {
    const wire = Buffer.from(msg);
    const id = randomInt(0, 0x10000);
    wire.writeUInt16BE(id, 0);
    return { wire, id };
  }

  /**
   * Whether `m` answers our query: the id and question must match (else it
   * is ignored, as a stale or spoofed datagram); one that matches but cannot
   * be decoded fails this upstream.
   */
  private static check(m: Buffer, id: number, question: Question): Exchange | 'ignore' {
    if (m.length < 12 || m.readUInt16BE(0) !== id || !(m.readUInt16BE(2) & QR)) return 'ignore';
    let p: DecodedPacket;
    try {
      p = dnsPacket.decode(m);
    } catch {
      return { ok: false, reason: 'malformed answer' };
    }
    const q = p.questions?.[0];
    if (p.questions?.length !== 1 || !q || normalize(q.name) !== normalize(question.name) || q.type !== question.type) return 'ignore';
    return { ok: true, answer: m };
  }

  /** Runs one upstream exchange with the timeout, registered so close() can abandon it. */
  private exchange(run: (finish: (r: Exchange) => void) => () => void): Promise<Exchange> {
    return new Promise<Exchange>((resolve) => {
      let done = false;
      let release: () => void = () => undefined;
      const finish = (r: Exchange): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        this.cancels.delete(cancel);
        release();
        resolve(r);
      };
      const cancel = (): void => finish({ ok: false, reason: 'closed' });
      const timer = setTimeout(() => finish({ ok: false, reason: 'timeout' }), this.timeoutMs);
      this.cancels.add(cancel);
      try {
        release = run(finish);
      } catch (e) {
        finish({ ok: false, reason: errnoReason(e) });
      }
      if (done) release();
    });
  }

  private exchangeUdp(msg: Buffer, question: Question, upstream: DnsUpstream): Promise<Exchange> {
    const { wire, id } = MeshDns.rewrite(msg);
    return this.exchange((finish) => {
      const sock = this.dialer.udp(net.isIPv6(upstream.address.split('%')[0] ?? '') ? 'udp6' : 'udp4');
      // An ICMP port-unreachable arrives as ECONNREFUSED on a connected socket: that upstream is down, move on at once.
      sock.on('error', (e) => finish({ ok: false, reason: errnoReason(e) }));
      sock.on('message', (m) => {
        const r = MeshDns.check(m, id, question);
        if (r !== 'ignore') finish(r);
      });
      // Connected, so the kernel drops datagrams from anyone but the upstream.
      try {
        sock.connect(upstream.port, upstream.address, () => {
          try {
            sock.send(wire, (err) => {
              if (err) finish({ ok: false, reason: errnoReason(err) });
            });
          } catch (e) {
            finish({ ok: false, reason: errnoReason(e) }); // closed by close() while connecting
          }
        });
      } catch (e) {
        finish({ ok: false, reason: errnoReason(e) }); // e.g. a port out of range; the socket is still released below
      }
      return () => {
        try {
          sock.close();
        } catch {
          // already closed
        }
      };
    });
  }

  private exchangeTcp(msg: Buffer, question: Question, upstream: DnsUpstream): Promise<Exchange> {
    const { wire, id } = MeshDns.rewrite(msg);
    return this.exchange((finish) => {
      const sock = this.dialer.tcp(upstream.address, upstream.port);
      let pending: Buffer = Buffer.alloc(0);
      sock.on('error', (e) => finish({ ok: false, reason: errnoReason(e) }));
      sock.on('close', () => finish({ ok: false, reason: 'closed by upstream' }));
      sock.on('data', (chunk: Buffer) => {
        pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
        while (pending.length >= 2) {
          const len = pending.readUInt16BE(0);
          if (pending.length < 2 + len) return;
          const r = MeshDns.check(pending.subarray(2, 2 + len), id, question);
          pending = pending.subarray(2 + len);
          if (r !== 'ignore') {
            // Copied: the frame is a view of a buffer that is released with the socket.
            finish(r.ok ? { ok: true, answer: Buffer.from(r.answer) } : r);
            return;
          }
        }
      });
      sock.write(frame2(wire));
      return () => sock.destroy();
    });
  }
}

/** A message with its two-byte length prefix, as DNS over TCP sends it. */
function frame2(m: Buffer): Buffer {
  const len = Buffer.alloc(2);
  len.writeUInt16BE(m.length);
  return Buffer.concat([len, m]);
}

interface ReplyParts {
  question?: Question;
  answers?: Answer[];
  authorities?: Answer[];
  /** The client's OPT record: when present, the reply carries ours (RFC 6891 6.1.1). */
  opt?: OptAnswer | undefined;
  aa?: boolean;
  tc?: boolean;
}

/**
 * Encodes a reply to the query `msg`: its id, its RD bit echoed, RA set (we
 * recurse, through the upstreams). Falls back to a bare header when the
 * question cannot be encoded again (a name dns-packet decoded but will not
 * write back).
 */
function encodeReply(msg: Buffer, rcode: number, parts: ReplyParts): Buffer {
  const id = msg.readUInt16BE(0);
  const flags = (msg.readUInt16BE(2) & RD) | RA | (parts.aa ? AA : 0) | (parts.tc ? TC : 0) | rcode;
  const packet: Packet = {
    type: 'response',
    id,
    flags,
    questions: parts.question ? [parts.question] : [],
    answers: parts.answers ?? [],
    authorities: parts.authorities ?? [],
    additionals: parts.opt ? [{ type: 'OPT', name: '.', udpPayloadSize: EDNS_UDP_SIZE, extendedRcode: 0, ednsVersion: 0, flags: 0, flag_do: false, options: [] }] : [],
  };
  try {
    return dnsPacket.encode(packet);
  } catch {
    return dnsPacket.encode({ type: 'response', id, flags });
  }
}

function servfailFor(msg: Buffer, question: Question | undefined, opt?: OptAnswer): Buffer {
  return encodeReply(msg, RCODE.SERVFAIL, { question, opt });
}
