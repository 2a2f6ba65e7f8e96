/**
 * `/etc/knit/agent.yaml` and `/etc/knit/server.yaml`: read, checked against
 * a schema (every problem with file, line and field), and normalised with
 * defaults. Durations are Go-style strings, addresses `host:port`.
 *
 * Every value that would make the process fail at start (a port out of
 * range, an address that cannot be bound, a registry knit cannot open) is
 * refused here, all at once: a wrong type does not hide the other problems
 * of the file. `knit validate` runs the same checks.
 */
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import { ConfigError, type FileProblem } from '../errors.js';
import { ajv, fieldPath, parseLocated, schemaProblems, type LocatedDocument } from './document.js';
import { parseDuration } from './duration.js';
import { parseRegistryUrl, type RegistryUrl } from './registry-url.js';
import { defaultNodeName } from './env.js';
import { validateSegment, validateTrustDomain } from '../identity/spiffe.js';
import { isHostOrAddress, isLoopback, parseHostPort } from './services.js';

/** The CA's shortest leaf (identity/ca.ts MIN_LEAF_TTL_MS), repeated so that config stays free of the x509 library. */
const MIN_LEAF_TTL_MS = 10_000;

// host:port is checked by parseHostPort (with the port's range), not by a pattern.
const hostPort = { type: 'string', minLength: 1 } as const;
const str = { type: 'string', minLength: 1 } as const;
const port = { type: 'integer', minimum: 0, maximum: 65535 } as const;
// A port netfilter redirects to or matches: 0 ("any free port") has no meaning there.
const fixedPort = { type: 'integer', minimum: 1, maximum: 65535 } as const;
// (uid_t)-1 means "no uid" to the kernel.
const uid = { type: 'integer', minimum: 0, maximum: 4_294_967_294 } as const;

/** `transparent:` in agent.yaml: the capture ports and what netfilter leaves alone. */
const transparentSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    enabled: { type: 'boolean' },
    outbound_port: fixedPort,
    inbound_port: fixedPort,
    dns_port: fixedPort,
    outbound: { enum: ['passthrough', 'deny'] },
    exclude_inbound_ports: { type: 'array', items: fixedPort },
    exclude_outbound_ports: { type: 'array', items: fixedPort },
    exclude_cidrs: { type: 'array', items: str },
    exclude_uids: { type: 'array', items: uid },
    capture_dns: { type: 'boolean' },
    vip_range: str,
    uid,
  },
} as const;

const agentSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['registry', 'server'],
  properties: {
    node: str,
    data_dir: str,
    registry: str,
    server: { type: 'string', pattern: '^https://', 'x-hint': 'must be an https:// URL (the control plane speaks only TLS), e.g. https://cp.example.com:7700' },
    join_token_file: str,
    services_dir: str,
    advertise: str,
    bind: str,
    admin: hostPort,
    admin_allow_remote: { type: 'boolean' },
    admin_token_file: str,
    allow_remote_upstreams: { type: 'boolean' },
    hbone_port: port,
    hbone_max_streams: { type: 'integer', minimum: 1, maximum: 10_000 },
    hbone_idle_timeout: str,
    max_connections_per_host: { type: 'integer', minimum: 1, maximum: 1_000_000 },
    drain: str,
    tcp_keepalive: str,
    idle_timeout: str,
    tcp_nodelay: { type: 'boolean' },
    log_level: { enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] },
    transparent: transparentSchema,
  },
} as const;

const serverSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['registry'],
  properties: {
    name: str,
    data_dir: str,
    registry: str,
    listen: hostPort,
    advertise: { type: 'array', items: str, minItems: 1 },
    trust_domain: str,
    default_intention: { enum: ['allow', 'deny'] },
    leaf_ttl: str,
    agent_ttl: str,
    rejoin_window: str,
    vip_range: str,
    log_level: { enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] },
  },
} as const;

const validateAgent = ajv.compile(agentSchema);
const validateServer = ajv.compile(serverSchema);

export interface AgentConfig {
  file: string;
  node: string;
  dataDir: string;
  registry: RegistryUrl;
  server: string;
  joinTokenFile: string;
  servicesDir: string;
  advertise: string;
  bind: string;
  adminHost: string;
  adminPort: number;
  /** Set when the admin API may listen beyond loopback: then every call needs this bearer token. */
  adminTokenFile?: string;
  /** Upstreams may bind non-loopback addresses (anyone reaching them speaks as the service). */
  allowRemoteUpstreams: boolean;
  /** The host's HBONE port (15008; 0: any free port), where other agents reach every service here. */
  hbonePort: number;
  /** Streams per HBONE tunnel (100) and how long an idle tunnel is kept (5m). */
  hboneMaxStreams?: number;
  hboneIdleMs?: number;
  /** Connections all of this host's proxies may hold at once (a flood cannot exhaust the host's file descriptors). */
  maxConnectionsPerHost?: number;
  drainMs: number;
  /** Socket settings of every proxied connection (defaults in proxy/limits.ts: keepalive 10s, idle 1h, no Nagle). */
  tcp: { keepAliveMs?: number; idleTimeoutMs?: number; noDelay?: boolean };
  logLevel: string;
  /** Transparent mode (off unless `transparent.enabled`), with its defaults filled in. */
  transparent: TransparentConfig;
}

/**
 * Transparent mode: which ports capture redirected connections and what
 * the netfilter rules leave alone (`knit redirect-traffic` installs them).
 */
export interface TransparentConfig {
  enabled: boolean;
  /** Outbound capture (15001): applications' connections to mesh destinations land here. */
  outboundPort: number;
  /** Inbound capture (15006): connections to this host's service ports land here. */
  inboundPort: number;
  /** The agent's DNS resolver (15053, on 127.0.0.1 and ::1). */
  dnsPort: number;
  /** `passthrough`: only mesh traffic meets the proxy; `deny`: all outbound TCP does, and non-mesh is refused. */
  outbound: 'passthrough' | 'deny';
  /** Never captured (default [22], so SSH survives a dead agent). */
  excludeInboundPorts: number[];
  excludeOutboundPorts: number[];
  /** Destination networks never captured outbound. */
  excludeCidrs: string[];
  /** Processes of these uids are never captured. */
  excludeUids: number[];
  /** Redirect other processes' DNS (port 53) to the agent's resolver. */
  captureDns: boolean;
  /** The mesh's virtual IPs (240.240.0.0/16). */
  vipRange: string;
  /** The uid the agent runs as: its own connections are never captured (default: this process's uid). */
  uid: number;
}

export interface ServerConfig {
  file: string;
  name: string;
  dataDir: string;
  registry: RegistryUrl;
  listenHost: string;
  listenPort: number;
  /** Names and addresses clients use to reach the server (its certificate's SANs). */
  advertise: string[];
  trustDomain?: string;
  defaultIntention: 'allow' | 'deny';
  leafTtlMs: number;
  agentTtlMs: number;
  /** How long after its certificate expired an agent may rejoin with its recorded key. */
  rejoinWindowMs: number;
  /** Transparent mode's virtual IPs, one per service, assigned by this control plane (240.240.0.0/16). */
  vipRange: string;
  logLevel: string;
}

/** The first non-internal IPv4 address, the usual address peers reach a VM on. */
export function primaryAddress(): string {
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) if (a.family === 'IPv4' && !a.internal) return a.address;
  }
  return '127.0.0.1';
}

/** `host:port` or `[v6]:port` into its parts. */
export function splitHostPort(v: string): { host: string; port: number } {
  const at = v.lastIndexOf(':');
  return { host: v.slice(0, at).replace(/^\[|\]$/g, ''), port: Number(v.slice(at + 1)) };
}

type Raw = Record<string, unknown>;

/** Reads a config file's text, or throws ConfigError naming it. */
async function readText(file: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (e) {
    throw new ConfigError([{ file, message: `cannot read: ${(e as Error).message}` }]);
  }
}

/** Parses and schema-checks a config text; the raw value is `{}` when the file is not a map. */
function parseConfig(file: string, text: string, validate: ReturnType<typeof ajv.compile>): { raw: Raw; doc?: LocatedDocument; problems: FileProblem[] } {
  const { doc, problems } = parseLocated(file, text);
  if (!doc) return { raw: {}, problems };
  const raw = typeof doc.value === 'object' && doc.value !== null && !Array.isArray(doc.value) ? (doc.value as Raw) : {};
  return { raw, doc, problems: [...problems, ...schemaProblems(doc, validate)] };
}

/**
 * Checks the semantic parts the schema cannot: durations, addresses and
 * their ports, the registry URL, names. Each reader looks only at a value
 * of the right type: a wrong type is the schema's problem, reported once.
 */
class Checker {
  readonly problems: FileProblem[];
  constructor(private readonly doc: LocatedDocument, private readonly raw: Raw, schema: FileProblem[]) {
    this.problems = [...schema];
  }

  private add(field: string, message: string): void {
    this.addAt([field], message);
  }

  /** Records a problem at a path inside the file (`['advertise', 1]`). */
  addAt(path: Array<string | number>, message: string): void {
    this.problems.push({ file: this.doc.file, line: this.doc.lineOf(path), field: fieldPath(path), message });
  }

  /** The string at `field`, when it is one. */
  str(field: string): string | undefined {
    const v = this.raw[field];
    return typeof v === 'string' ? v : undefined;
  }

  duration(field: string, fallback: number, min: number): number {
    const v = this.str(field);
    if (v === undefined) return fallback;
    const ms = parseDuration(v);
    if (ms === undefined || ms < min) {
      this.add(field, ms === undefined ? `${JSON.stringify(v)} is not a duration (e.g. "10s", "24h")` : `must be at least ${min} ms`);
      return fallback;
    }
    return ms;
  }

  /** A `host:port` field (port 0: any free port), or `fallback`. */
  hostPort(field: string, fallback: string): { host: string; port: number } {
    const v = this.str(field) ?? fallback;
    const hp = parseHostPort(v, 0);
    if ('error' in hp) {
      this.add(field, hp.error);
      return parseHostPort(fallback, 0) as { host: string; port: number };
    }
    return hp;
  }

  /** An address this host binds: an IP address. */
  bindAddress(field: string): void {
    const v = this.str(field);
    if (v !== undefined && isIP(v) === 0) this.add(field, `${JSON.stringify(v)} is not an IP address to bind (e.g. 0.0.0.0, 127.0.0.1, ::)`);
  }

  /** An address peers use: an IP address or a host name. */
  address(field: string): void {
    const v = this.str(field);
    if (v !== undefined && !isHostOrAddress(v)) this.add(field, `${JSON.stringify(v)} is neither an IP address nor a host name`);
  }

  registry(): RegistryUrl {
    const v = this.str('registry');
    if (v === undefined) return { kind: 'embedded' };
    let url: RegistryUrl;
    try {
      url = parseRegistryUrl(v);
    } catch (e) {
      this.add('registry', (e as Error).message);
      return { kind: 'embedded' };
    }
    if (url.kind === 'zookeeper') {
      for (const hp of url.servers.split(',')) {
        const got = parseHostPort(hp, 1);
        if ('error' in got) this.add('registry', `registry URL ${JSON.stringify(v)}: ${got.error}`);
      }
    }
    // openRegistry would refuse it at start: say so now.
    if (url.kind === 'consul') this.add('registry', 'the consul:// registry is not implemented yet; use zk://host:port/path (or embedded: on knit server)');
    return url;
  }

  /** Records a problem on `field` (when `bad`). */
  require(bad: boolean, field: string, message: string): void {
    if (bad) this.add(field, message);
  }

  check(field: string, fn: (v: string) => unknown): void {
    const v = this.str(field);
    if (v === undefined) return;
    try {
      fn(v);
    } catch (e) {
      this.add(field, (e as Error).message.replace(/^invalid SPIFFE ID [^:]*: /, ''));
    }
  }
}

/** Whether `v` is an IPv4 or IPv6 CIDR (or a bare address) with a prefix of at least 1, as netfilter takes it. */
function isCidr(v: string): boolean {
  const [address = '', prefix, ...rest] = v.split('/');
  const family = isIP(address);
  if (family === 0 || address.includes('%') || rest.length) return false;
  return prefix === undefined || (/^\d{1,3}$/.test(prefix) && Number(prefix) >= 1 && Number(prefix) <= (family === 4 ? 32 : 128));
}

/**
 * `transparent:` with its defaults; records problems the schema cannot see
 * (CIDR syntax, and, when enabled, capture ports that clash with each other
 * or with the HBONE and admin ports: one of the listeners would fail).
 */
function transparentConfig(c: Checker, raw: Raw, ports: { hbone: number; admin: number }): TransparentConfig {
  const t = typeof raw.transparent === 'object' && raw.transparent !== null && !Array.isArray(raw.transparent) ? (raw.transparent as Raw) : {};
  const list = <T>(v: unknown, ok: (x: unknown) => x is T): T[] | undefined => (Array.isArray(v) && v.every(ok) ? v : undefined);
  const num = (x: unknown): x is number => typeof x === 'number';
  const text = (x: unknown): x is string => typeof x === 'string';
  const cfg: TransparentConfig = {
    enabled: t.enabled === true,
    outboundPort: num(t.outbound_port) ? t.outbound_port : 15001,
    inboundPort: num(t.inbound_port) ? t.inbound_port : 15006,
    dnsPort: num(t.dns_port) ? t.dns_port : 15053,
    outbound: t.outbound === 'deny' ? 'deny' : 'passthrough',
    excludeInboundPorts: list(t.exclude_inbound_ports, num) ?? [22],
    excludeOutboundPorts: list(t.exclude_outbound_ports, num) ?? [22],
    excludeCidrs: list(t.exclude_cidrs, text) ?? [],
    excludeUids: list(t.exclude_uids, num) ?? [],
    captureDns: t.capture_dns !== false,
    vipRange: text(t.vip_range) ? t.vip_range : '240.240.0.0/16',
    uid: num(t.uid) ? t.uid : (process.getuid?.() ?? 0),
  };
  if (Array.isArray(t.exclude_cidrs)) {
    t.exclude_cidrs.forEach((v: unknown, i) => {
      if (typeof v === 'string' && !isCidr(v)) c.addAt(['transparent', 'exclude_cidrs', i], `${JSON.stringify(v)} is not a CIDR (e.g. 10.0.0.0/8, fd00::/8, or one address)`);
    });
  }
  if (typeof t.vip_range === 'string' && !isCidr(t.vip_range)) c.addAt(['transparent', 'vip_range'], `${JSON.stringify(t.vip_range)} is not a CIDR (e.g. 240.240.0.0/16)`);
  if (cfg.enabled) {
    const taken = new Map<number, string>([[ports.admin, 'admin'], [ports.hbone, 'hbone_port']]);
    for (const [field, p] of [['outbound_port', cfg.outboundPort], ['inbound_port', cfg.inboundPort], ['dns_port', cfg.dnsPort]] as const) {
      const other = taken.get(p);
      if (other !== undefined && p !== 0) c.addAt(['transparent', field], `port ${p} is also ${other === 'admin' || other === 'hbone_port' ? other : `transparent.${other}`}'s: each needs its own port`);
      else taken.set(p, field);
    }
  }
  return cfg;
}

/** The outcome of parsing a config file: the config when there is no problem, and every problem. */
export interface ParsedConfig<T> {
  config?: T;
  problems: FileProblem[];
}

/** Parses an agent config's text (`file` names it in messages); never throws. */
export function parseAgentConfig(file: string, text: string): ParsedConfig<AgentConfig> {
  const { raw, doc, problems } = parseConfig(file, text, validateAgent);
  if (!doc) return { problems };
  const c = new Checker(doc, raw, problems);
  c.check('node', (v) => validateSegment(v, 'node name'));
  const registry = c.registry();
  if (registry.kind === 'embedded' && c.str('registry') !== undefined) c.check('registry', () => {
    throw new Error('an agent needs a shared registry (zk://... or consul://...); embedded: lives inside knit dev or knit server');
  });
  c.check('server', (v) => {
    const port = /^[a-z]+:\/\/(?:\[[^\]]*\]|[^/:]*):(\d+)(?:\/|$)/.exec(v)?.[1];
    if (port !== undefined && (Number(port) < 1 || Number(port) > 65535)) throw new Error(`port ${port} in ${JSON.stringify(v)} is out of range (1 to 65535)`);
    if (!URL.canParse(v)) throw new Error(`${JSON.stringify(v)} is not a URL (e.g. https://cp.example.com:7700)`);
  });
  const drainMs = c.duration('drain', 10_000, 0);
  if (raw.hbone_idle_timeout !== undefined) c.duration('hbone_idle_timeout', 300_000, 1000);
  const keepAliveMs = raw.tcp_keepalive === undefined ? undefined : c.duration('tcp_keepalive', 10_000, 0);
  const idleTimeoutMs = raw.idle_timeout === undefined ? undefined : c.duration('idle_timeout', 3_600_000, 0);
  const admin = c.hostPort('admin', '127.0.0.1:7701');
  c.address('advertise');
  c.bindAddress('bind');
  const remote = raw.admin_allow_remote === true;
  c.require(!isLoopback(admin.host) && !remote, 'admin', `${admin.host} is not a loopback address: the admin API (reload, TTL check writes, state) would be open to the network; use 127.0.0.1:7701, or set admin_allow_remote: true with an admin_token_file`);
  c.require(remote && raw.admin_token_file === undefined, 'admin_allow_remote', 'needs admin_token_file: a remote admin API requires a bearer token on every call');
  const transparent = transparentConfig(c, raw, { hbone: typeof raw.hbone_port === 'number' ? raw.hbone_port : 15008, admin: admin.port });
  if (c.problems.length) return { problems: c.problems };
  const dataDir = (raw.data_dir as string | undefined) ?? '/var/lib/knit';
  return {
    problems: [],
    config: {
      file,
      node: (raw.node as string | undefined) ?? defaultNodeName(),
      dataDir,
      registry,
      server: (raw.server as string).replace(/\/+$/, ''),
      joinTokenFile: (raw.join_token_file as string | undefined) ?? '/etc/knit/join.token',
      servicesDir: (raw.services_dir as string | undefined) ?? '/etc/knit/services.d',
      advertise: (raw.advertise as string | undefined) ?? primaryAddress(),
      bind: (raw.bind as string | undefined) ?? '0.0.0.0',
      adminHost: admin.host,
      adminPort: admin.port,
      adminTokenFile: remote ? (raw.admin_token_file as string) : undefined,
      allowRemoteUpstreams: raw.allow_remote_upstreams === true,
      hbonePort: (raw.hbone_port as number | undefined) ?? 15008,
      hboneMaxStreams: raw.hbone_max_streams as number | undefined,
      hboneIdleMs: raw.hbone_idle_timeout === undefined ? undefined : parseDuration(raw.hbone_idle_timeout as string),
      maxConnectionsPerHost: raw.max_connections_per_host as number | undefined,
      drainMs,
      tcp: { keepAliveMs, idleTimeoutMs, noDelay: raw.tcp_nodelay as boolean | undefined },
      logLevel: (raw.log_level as string | undefined) ?? 'info',
      transparent,
    },
  };
}

/** Parses a server config's text (`file` names it in messages); never throws. */
export function parseServerConfig(file: string, text: string): ParsedConfig<ServerConfig> {
  const { raw, doc, problems } = parseConfig(file, text, validateServer);
  if (!doc) return { problems };
  const c = new Checker(doc, raw, problems);
  c.check('name', (v) => validateSegment(v, 'server name'));
  c.check('trust_domain', validateTrustDomain);
  const registry = c.registry();
  const leafTtlMs = c.duration('leaf_ttl', 24 * 3600_000, MIN_LEAF_TTL_MS);
  const agentTtlMs = c.duration('agent_ttl', 72 * 3600_000, MIN_LEAF_TTL_MS);
  const rejoinWindowMs = c.duration('rejoin_window', 30 * 24 * 3600_000, 0);
  const listen = c.hostPort('listen', '0.0.0.0:7700');
  if (typeof raw.vip_range === 'string' && !isCidr(raw.vip_range)) c.addAt(['vip_range'], `${JSON.stringify(raw.vip_range)} is not a CIDR (e.g. 240.240.0.0/16)`);
  c.require(isIP(listen.host) === 0 && listen.host !== 'localhost', 'listen', `${JSON.stringify(listen.host)} is not an IP address to bind (e.g. 0.0.0.0:7700)`);
  if (Array.isArray(raw.advertise)) {
    raw.advertise.forEach((a: unknown, i) => {
      if (typeof a === 'string' && !isHostOrAddress(a)) c.addAt(['advertise', i], `${JSON.stringify(a)} is neither an IP address nor a DNS name (it goes into the API certificate)`);
    });
  }
  if (c.problems.length) return { problems: c.problems };
  return {
    problems: [],
    config: {
      file,
      name: (raw.name as string | undefined) ?? defaultNodeName(),
      dataDir: (raw.data_dir as string | undefined) ?? '/var/lib/knit',
      registry,
      listenHost: listen.host,
      listenPort: listen.port,
      advertise: (raw.advertise as string[] | undefined) ?? [primaryAddress(), 'localhost', '127.0.0.1'],
      trustDomain: raw.trust_domain as string | undefined,
      defaultIntention: (raw.default_intention as 'allow' | 'deny' | undefined) ?? 'deny',
      leafTtlMs,
      agentTtlMs,
      rejoinWindowMs,
      vipRange: (raw.vip_range as string | undefined) ?? '240.240.0.0/16',
      logLevel: (raw.log_level as string | undefined) ?? 'info',
    },
  };
}

/** Loads `/etc/knit/agent.yaml`; throws ConfigError with every problem. */
export async function loadAgentConfig(file: string): Promise<AgentConfig> {
  const { config, problems } = parseAgentConfig(file, await readText(file));
  if (!config) throw new ConfigError(problems);
  return config;
}

/** Loads `/etc/knit/server.yaml`; throws ConfigError with every problem. */
export async function loadServerConfig(file: string): Promise<ServerConfig> {
  const { config, problems } = parseServerConfig(file, await readText(file));
  if (!config) throw new ConfigError(problems);
  return config;
}

/**
 * Which config a parsed file is, by its top-level keys: one with `registry`
 * is a node config, an agent's when it names a `server` (or another key only
 * agents have), else a server's. Anything else is not a node config.
 */
export function nodeConfigKind(value: unknown): 'agent' | 'server' | undefined {
  if (typeof value !== 'object' || value === null || Array.isArray(value) || !('registry' in value)) return undefined;
  const agentOnly = ['server', 'services_dir', 'join_token_file', 'admin', 'admin_allow_remote', 'admin_token_file', 'allow_remote_upstreams', 'hbone_port', 'drain', 'bind', 'node', 'transparent'];
  return agentOnly.some((k) => k in value) ? 'agent' : 'server';
}
