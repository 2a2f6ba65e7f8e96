/**
 * What transparent mode redirects, as a value: the `RedirectSpec` callers
 * give (the agent, `knit redirect-traffic`), its checked and canonical form
 * (`RedirectPlan`, which the nft and iptables renderers turn into rules),
 * the contract every netfilter backend keeps, and the one error type they
 * throw.
 *
 * Every address and CIDR is parsed and re-printed here before it reaches a
 * ruleset: mesh destinations come from the registry, and a string pasted
 * into an `nft -f` script unchecked could add or delete any rule on the
 * host. Canonical text (masked networks, compressed IPv6) is also what nft
 * and iptables-save print back, so that `status` can compare the rules it
 * reads with the rules it would write.
 */
import { isIP, SocketAddress } from 'node:net';
import { KnitError, type KnitErrorCode } from '../../errors.js';

/** Which tool holds knit's rules. */
export type BackendName = 'nft' | 'iptables';

/** What to redirect on one host (or in one network namespace). */
export interface RedirectSpec {
  /** The agent's uid: its own connections are never redirected (else they would loop into its own capture). */
  agentUid: number;
  /** Outbound capture port (15001): where applications' redirected connections land. */
  outboundPort: number;
  /** Inbound capture port (15006): where connections to the host's mesh service ports land. */
  inboundPort: number;
  /** The agent's DNS resolver port (15053) on 127.0.0.1 / ::1. */
  dnsPort: number;
  /** The HBONE port (15008): arrives untouched, never redirected. */
  hbonePort: number;
  /** The host's mesh service ports: inbound TCP to them goes to `inboundPort`. */
  inboundPorts: number[];
  /** Instances of mesh services (kept current by the agent): outbound TCP to them goes to `outboundPort`. */
  meshDestinations: Array<{ address: string; port: number }>;
  /** Virtual IP ranges of mesh services (e.g. `240.240.0.0/16`): every TCP port in them is captured. */
  vipCidrs: string[];
  /**
   * `passthrough`: only mesh destinations and VIPs are redirected; anything
   * else never touches the proxy, so a dead agent breaks only mesh traffic
   * (which fails closed: connection refused, never plaintext).
   * `deny`: all outbound TCP but the exclusions is redirected and the proxy
   * refuses what is not mesh; a dead agent then blocks all outbound TCP but
   * the exclusions.
   */
  outbound: 'passthrough' | 'deny';
  /** Ports never captured inbound (22: keep SSH reachable when the agent is down). */
  excludeInboundPorts: number[];
  /** Destination ports never captured outbound (22). */
  excludeOutboundPorts: number[];
  /** Destination networks never captured outbound (`10.0.0.0/8`, `fd00::/8`, or a bare address). */
  excludeCidrs: string[];
  /** Processes of these uids are never redirected (besides the agent's). */
  excludeUids: number[];
  /** Redirect DNS (UDP and TCP port 53) of every other uid to `dnsPort`. */
  captureDns: boolean;
}

/** The spec with knit's default ports and exclusions; `agentUid` and what differs are given. */
export function redirectSpec(given: Partial<RedirectSpec> & { agentUid: number }): RedirectSpec {
  return {
    outboundPort: 15001,
    inboundPort: 15006,
    dnsPort: 15053,
    hbonePort: 15008,
    inboundPorts: [],
    meshDestinations: [],
    vipCidrs: ['240.240.0.0/16'],
    outbound: 'passthrough',
    excludeInboundPorts: [22],
    excludeOutboundPorts: [22],
    excludeCidrs: [],
    excludeUids: [],
    captureDns: true,
    ...given,
  };
}

/** A network in canonical form: the address with its host bits cleared, as nft and iptables print it. */
export interface Cidr {
  family: 4 | 6;
  address: string;
  prefix: number;
}

/** One mesh destination in canonical form. */
export interface Destination {
  family: 4 | 6;
  address: string;
  port: number;
}

/**
 * A checked spec in the order the rules are written: every list sorted and
 * without duplicates, so that the same spec always renders the same text.
 */
export interface RedirectPlan {
  /** The agent's uid first, then the excluded ones. */
  skipUids: number[];
  outboundPort: number;
  inboundPort: number;
  dnsPort: number;
  hbonePort: number;
  /** Service ports captured inbound: the spec's minus excluded ports, the HBONE port and the capture ports. */
  inboundPorts: number[];
  excludeOutboundPorts: number[];
  excludeCidrs: Cidr[];
  vipCidrs: Cidr[];
  destinations: Destination[];
  outbound: 'passthrough' | 'deny';
  captureDns: boolean;
}

/** Why a netfilter operation failed; callers branch on this, the message is for people. */
export type NetfilterFailure =
  /** nft, iptables or ip is not installed. */
  | 'missing-tool'
  /** No CAP_NET_ADMIN. */
  | 'permission'
  /** The tool is there but the kernel cannot do it (no nf_tables, no nat). */
  | 'unsupported'
  /** The tool refused the ruleset or failed otherwise. */
  | 'rejected'
  /** The spec holds a value that cannot be written as a rule. */
  | 'invalid-spec'
  /** Nothing of knit's is installed where something was expected (updating destinations). */
  | 'not-installed'
  /** The network namespace asked for does not exist. */
  | 'netns'
  /** The command did not finish in time. */
  | 'timeout';

/**
 * The stable code for each failure. errors.ts has no netfilter code yet, so
 * each maps to the closest one by what a caller should do: a bad spec is a
 * bad request, a missing capability is "not allowed", nothing installed is
 * "not found", a timeout may pass; the rest (tool missing, kernel unable,
 * ruleset refused) stop transparent capture from being set up at all, the
 * way a capture port that cannot be bound does, hence KNIT_ERR_LISTEN.
 */
const CODES: Record<NetfilterFailure, KnitErrorCode> = {
  'missing-tool': 'KNIT_ERR_LISTEN',
  permission: 'KNIT_ERR_UNAUTHORIZED',
  unsupported: 'KNIT_ERR_LISTEN',
  rejected: 'KNIT_ERR_LISTEN',
  'invalid-spec': 'KNIT_ERR_BAD_REQUEST',
  'not-installed': 'KNIT_ERR_NOT_FOUND',
  netns: 'KNIT_ERR_LISTEN',
  timeout: 'KNIT_ERR_TIMEOUT',
};

/** A netfilter failure, as one line that names the command and what to do. */
export class NetfilterError extends KnitError {
  readonly reason: NetfilterFailure;
  /** The command that failed (`nft -f -`), when one did. */
  readonly command?: string;
  constructor(reason: NetfilterFailure, message: string, options: { cause?: unknown; command?: string } = {}) {
    super(CODES[reason], message, { cause: options.cause });
    this.name = 'NetfilterError';
    this.reason = reason;
    this.command = options.command;
  }
}

/** What one backend has installed, as `status` reports it. */
export interface InstalledState {
  backend: BackendName;
  /** iptables' own backend, as `iptables -V` says: `nf_tables` or `legacy`. */
  variant?: string;
  /** knit's objects found, e.g. `table inet knit`, `ip nat KNIT_OUTPUT`. */
  objects: string[];
  /** Rules in knit's chains, mesh destination rules excluded. */
  rules: number;
  /** Mesh destinations currently redirected (set elements or per-destination rules). */
  destinations: number;
  /** Whether the rules equal those `spec` renders (destinations not compared: the agent keeps them); absent without a spec. */
  matches?: boolean;
  /** When not matching: each rule missing (`- ...`) or unexpected (`+ ...`). */
  differences?: string[];
  /** Things the caller should know (IPv6 unavailable, ...). */
  notes: string[];
}

/** How a backend came out of its probe. */
export type BackendProbe = { usable: true; variant?: string } | { usable: false; missing: boolean; reason: string };

/**
 * One way of writing knit's redirect into the kernel: nftables (one table
 * `inet knit`) or iptables (knit's own chains in the nat tables of
 * iptables and ip6tables). Every method touches knit's objects only: other
 * tables, chains and rules stay byte-for-byte as they were.
 */
export interface NetfilterBackend {
  readonly name: BackendName;
  /**
   * Whether the tool is installed and the kernel answers it. Changes
   * nothing. Rejects only when the answer is "not allowed" (permission):
   * no other backend would do better then.
   */
  probe(): Promise<BackendProbe>;
  /**
   * Replaces whatever knit had installed with this backend by the rules of
   * `plan`, atomically (one transaction per address family; if IPv6 fails
   * after IPv4 succeeded, IPv4 is put back as it was). Idempotent. Rejects
   * with a NetfilterError.
   */
  apply(plan: RedirectPlan): Promise<InstalledState>;
  /** What knit has installed with this backend, compared with `plan` when given; undefined when nothing is. Changes nothing. */
  read(plan?: RedirectPlan): Promise<InstalledState | undefined>;
  /** Replaces only the mesh destinations, in one transaction; rejects with `not-installed` when knit's rules are absent. */
  setDestinations(plan: RedirectPlan): Promise<void>;
  /** Removes knit's objects and returns their names; [] (no change at all) when there are none. */
  remove(): Promise<string[]>;
}

/** Parses an IP address into its bytes; undefined when it is not one (zone ids are refused). */
function addressBytes(text: string): { family: 4 | 6; bytes: number[] } | undefined {
  const family = isIP(text);
  if (family === 4) return { family, bytes: text.split('.').map(Number) };
  if (family !== 6 || text.includes('%')) return undefined;
  // A trailing dotted quad (::ffff:1.2.3.4) is two more 16-bit groups.
  const hex = text.replace(/(\d+)\.(\d+)\.(\d+)\.(\d+)$/, (_m, a: string, b: string, c: string, d: string) =>
    `${((Number(a) << 8) | Number(b)).toString(16)}:${((Number(c) << 8) | Number(d)).toString(16)}`);
  const groups = (s: string): number[] => (s === '' ? [] : s.split(':').map((g) => parseInt(g, 16)));
  const at = hex.indexOf('::');
  const left = groups(at === -1 ? hex : hex.slice(0, at));
  const right = at === -1 ? [] : groups(hex.slice(at + 2));
  const words = [...left, ...new Array<number>(8 - left.length - right.length).fill(0), ...right];
  if (words.length !== 8) return undefined;
  return { family: 6, bytes: words.flatMap((w) => [w >> 8, w & 0xff]) };
}

/** Prints address bytes as nft and iptables do (inet_ntop: compressed, lowercase IPv6). */
function printAddress(family: 4 | 6, bytes: number[]): string {
  if (family === 4) return bytes.join('.');
  const words: string[] = [];
  for (let i = 0; i < 16; i += 2) words.push(((bytes[i]! << 8) | bytes[i + 1]!).toString(16));
  return new SocketAddress({ address: words.join(':'), family: 'ipv6' }).address;
}

/** An IP address in canonical text, or undefined when `text` is not one. */
export function canonicalAddress(text: string): { family: 4 | 6; address: string } | undefined {
  const a = addressBytes(text);
  return a && { family: a.family, address: printAddress(a.family, a.bytes) };
}

/**
 * A CIDR (`10.0.0.0/8`, `fd00::/8`; a bare address is a host) in canonical
 * form, host bits cleared; undefined when it is not one. Prefix 0 is
 * refused: "every address" is not an exclusion or a VIP range, and
 * iptables-save would print it as no match at all.
 */
export function parseCidr(text: string): Cidr | undefined {
  const slash = text.indexOf('/');
  const a = addressBytes(slash === -1 ? text : text.slice(0, slash));
  if (!a) return undefined;
  const max = a.family === 4 ? 32 : 128;
  const prefixText = slash === -1 ? String(max) : text.slice(slash + 1);
  if (!/^\d{1,3}$/.test(prefixText)) return undefined;
  const prefix = Number(prefixText);
  if (prefix < 1 || prefix > max) return undefined;
  const bytes = a.bytes.map((b, i) => {
    const keep = Math.max(0, Math.min(8, prefix - i * 8));
    return b & (0xff << (8 - keep)) & 0xff;
  });
  return { family: a.family, address: printAddress(a.family, bytes), prefix };
}

const isPort = (p: unknown): p is number => Number.isInteger(p) && (p as number) >= 1 && (p as number) <= 65535;
// The largest uid: (uid_t)-1 means "no uid" to the kernel.
const isUid = (u: unknown): u is number => Number.isInteger(u) && (u as number) >= 0 && (u as number) <= 4_294_967_294;
const sortedUnique = (xs: number[]): number[] => [...new Set(xs)].sort((a, b) => a - b);

/**
 * Checks a spec and puts it in canonical order; throws a NetfilterError
 * (`invalid-spec`) naming the first field that cannot be written as a rule.
 */
export function planRedirect(spec: RedirectSpec): RedirectPlan {
  const bad = (field: string, value: unknown, what: string): never => {
    throw new NetfilterError('invalid-spec', `redirect spec: ${field} ${JSON.stringify(value)} is not ${what}`);
  };
  if (!isUid(spec.agentUid)) bad('agentUid', spec.agentUid, 'a uid');
  for (const f of ['outboundPort', 'inboundPort', 'dnsPort', 'hbonePort'] as const) if (!isPort(spec[f])) bad(f, spec[f], 'a port from 1 to 65535');
  const capture = new Set([spec.outboundPort, spec.inboundPort, spec.dnsPort, spec.hbonePort]);
  if (capture.size !== 4) throw new NetfilterError('invalid-spec', `redirect spec: outboundPort, inboundPort, dnsPort and hbonePort must differ (${[...capture].join(', ')})`);
  if (spec.outbound !== 'passthrough' && spec.outbound !== 'deny') bad('outbound', spec.outbound, '"passthrough" or "deny"');
  const ports = (field: 'inboundPorts' | 'excludeInboundPorts' | 'excludeOutboundPorts'): number[] => {
    spec[field].forEach((p, i) => isPort(p) || bad(`${field}[${i}]`, p, 'a port from 1 to 65535'));
    return sortedUnique(spec[field]);
  };
  const cidrs = (field: 'vipCidrs' | 'excludeCidrs'): Cidr[] => {
    const out = spec[field].map((c, i) => parseCidr(c) ?? bad(`${field}[${i}]`, c, 'a CIDR (e.g. 10.0.0.0/8, fd00::/8) with a prefix of at least 1'));
    const seen = new Set<string>();
    return out
      .filter((c) => !seen.has(`${c.address}/${c.prefix}`) && seen.add(`${c.address}/${c.prefix}`))
      .sort((a, b) => a.family - b.family || (a.address < b.address ? -1 : a.address > b.address ? 1 : a.prefix - b.prefix));
  };
  spec.excludeUids.forEach((u, i) => isUid(u) || bad(`excludeUids[${i}]`, u, 'a uid'));
  const excludedIn = new Set([...ports('excludeInboundPorts'), ...capture]);
  const seen = new Set<string>();
  const destinations: Destination[] = [];
  spec.meshDestinations.forEach((d, i) => {
    const a = canonicalAddress(d.address) ?? bad(`meshDestinations[${i}].address`, d.address, 'an IP address');
    if (!isPort(d.port)) bad(`meshDestinations[${i}].port`, d.port, 'a port from 1 to 65535');
    const key = `${a.address} ${d.port}`;
    if (seen.has(key)) return;
    seen.add(key);
    destinations.push({ ...a, port: d.port });
  });
  destinations.sort((a, b) => a.family - b.family || (a.address < b.address ? -1 : a.address > b.address ? 1 : a.port - b.port));
  return {
    skipUids: [spec.agentUid, ...sortedUnique(spec.excludeUids).filter((u) => u !== spec.agentUid)],
    outboundPort: spec.outboundPort,
    inboundPort: spec.inboundPort,
    dnsPort: spec.dnsPort,
    hbonePort: spec.hbonePort,
    inboundPorts: ports('inboundPorts').filter((p) => !excludedIn.has(p)),
    excludeOutboundPorts: ports('excludeOutboundPorts'),
    excludeCidrs: cidrs('excludeCidrs'),
    vipCidrs: cidrs('vipCidrs'),
    destinations,
    outbound: spec.outbound,
    captureDns: spec.captureDns,
  };
}

/** Lines of `want` missing from `got` (`- line`) and lines of `got` not in `want` (`+ line`). */
export function lineDifferences(want: string[], got: string[]): string[] {
  /** The lines of `xs` left over once each line of `ys` has used up one equal line. */
  const without = (xs: string[], ys: string[]): string[] => {
    const left = new Map<string, number>();
    for (const y of ys) left.set(y, (left.get(y) ?? 0) + 1);
    return xs.filter((x) => {
      const n = left.get(x) ?? 0;
      left.set(x, n - 1);
      return n <= 0;
    });
  };
  const out = [...without(want, got).map((x) => `- ${x}`), ...without(got, want).map((x) => `+ ${x}`)];
  // The same lines in another order differ too: rules are evaluated in order.
  if (out.length === 0 && want.join('\n') !== got.join('\n')) out.push('~ the same rules in a different order');
  return out;
}
