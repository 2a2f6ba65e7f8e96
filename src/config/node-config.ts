/**
 * `/etc/knit/agent.yaml` and `/etc/knit/server.yaml`: read, checked against
 * a schema (every problem with file, line and field), and normalised with
 * defaults. Durations are Go-style strings, addresses `host:port`.
 */
import { readFile } from 'node:fs/promises';
import { networkInterfaces } from 'node:os';
import { ConfigError, type FileProblem } from '../errors.js';
import { ajv, parseLocated, schemaProblems, type LocatedDocument } from './document.js';
import { parseDuration } from './duration.js';
import { parseRegistryUrl, type RegistryUrl } from './registry-url.js';
import { defaultNodeName } from './env.js';
import { validateSegment, validateTrustDomain } from '../identity/spiffe.js';
import { isLoopback } from './services.js';

/** The CA's shortest leaf (identity/ca.ts MIN_LEAF_TTL_MS), repeated so that config stays free of the x509 library. */
const MIN_LEAF_TTL_MS = 10_000;

const hostPort = { type: 'string', pattern: '^(\\[[0-9a-fA-F:]+\\]|[A-Za-z0-9.-]+):\\d{1,5}$' } as const;
const str = { type: 'string', minLength: 1 } as const;
const port = { type: 'integer', minimum: 0, maximum: 65535 } as const;

const agentSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['registry', 'server'],
  properties: {
    node: str,
    data_dir: str,
    registry: str,
    server: { type: 'string', pattern: '^https://' },
    join_token_file: str,
    services_dir: str,
    advertise: str,
    bind: str,
    admin: hostPort,
    admin_allow_remote: { type: 'boolean' },
    admin_token_file: str,
    allow_remote_upstreams: { type: 'boolean' },
    inbound_port_base: port,
    drain: str,
    log_level: { enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] },
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
  inboundPortBase: number;
  drainMs: number;
  logLevel: string;
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

/** Reads a config file and returns its raw value, or throws ConfigError with every schema problem. */
async function readConfig(file: string, validate: ReturnType<typeof ajv.compile>): Promise<{ raw: Raw; doc: LocatedDocument }> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new ConfigError([{ file, message: `cannot read: ${(e as Error).message}` }]);
  }
  const { doc, problems } = parseLocated(file, text);
  if (!doc) throw new ConfigError(problems);
  const schema = schemaProblems(doc, validate);
  if (schema.length) throw new ConfigError(schema);
  return { raw: doc.value as Raw, doc };
}

/** Checks the semantic parts the schema cannot: durations, registry URL, names. */
class Checker {
  readonly problems: FileProblem[] = [];
  constructor(private readonly doc: LocatedDocument, private readonly raw: Raw) {}

  private add(field: string, message: string): void {
    this.problems.push({ file: this.doc.file, line: this.doc.lineOf([field]), field, message });
  }

  duration(field: string, fallback: number, min: number): number {
    const v = this.raw[field];
    if (v === undefined) return fallback;
    const ms = parseDuration(v as string);
    if (ms === undefined || ms < min) {
      this.add(field, ms === undefined ? `${JSON.stringify(v)} is not a duration (e.g. "10s", "24h")` : `must be at least ${min} ms`);
      return fallback;
    }
    return ms;
  }

  registry(): RegistryUrl {
    try {
      return parseRegistryUrl(this.raw.registry as string);
    } catch (e) {
      this.add('registry', (e as Error).message);
      return { kind: 'embedded' };
    }
  }

  /** Records a problem on `field` (when `bad`). */
  require(bad: boolean, field: string, message: string): void {
    if (bad) this.add(field, message);
  }

  check(field: string, fn: (v: string) => unknown): void {
    const v = this.raw[field];
    if (v === undefined) return;
    try {
      fn(v as string);
    } catch (e) {
      this.add(field, (e as Error).message.replace(/^invalid SPIFFE ID [^:]*: /, ''));
    }
  }

  done(): void {
    if (this.problems.length) throw new ConfigError(this.problems);
  }
}

/** Loads `/etc/knit/agent.yaml`. */
export async function loadAgentConfig(file: string): Promise<AgentConfig> {
  const { raw, doc } = await readConfig(file, validateAgent);
  const c = new Checker(doc, raw);
  c.check('node', (v) => validateSegment(v, 'node name'));
  const registry = c.registry();
  if (registry.kind === 'embedded') c.check('registry', () => {
    throw new Error('an agent needs a shared registry (zk://... or consul://...); embedded: lives inside knit dev or knit server');
  });
  const drainMs = c.duration('drain', 10_000, 0);
  const admin = splitHostPort((raw.admin as string | undefined) ?? '127.0.0.1:7701');
  const remote = raw.admin_allow_remote === true;
  c.require(!isLoopback(admin.host) && !remote, 'admin', `${admin.host} is not a loopback address: the admin API (reload, TTL check writes, state) would be open to the network; use 127.0.0.1:7701, or set admin_allow_remote: true with an admin_token_file`);
  c.require(remote && raw.admin_token_file === undefined, 'admin_allow_remote', 'needs admin_token_file: a remote admin API requires a bearer token on every call');
  c.done();
  const dataDir = (raw.data_dir as string | undefined) ?? '/var/lib/knit';
  return {
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
    inboundPortBase: (raw.inbound_port_base as number | undefined) ?? 21000,
    drainMs,
    logLevel: (raw.log_level as string | undefined) ?? 'info',
  };
}

/** Loads `/etc/knit/server.yaml`. */
export async function loadServerConfig(file: string): Promise<ServerConfig> {
  const { raw, doc } = await readConfig(file, validateServer);
  const c = new Checker(doc, raw);
  c.check('name', (v) => validateSegment(v, 'server name'));
  c.check('trust_domain', validateTrustDomain);
  const registry = c.registry();
  const leafTtlMs = c.duration('leaf_ttl', 24 * 3600_000, MIN_LEAF_TTL_MS);
  const agentTtlMs = c.duration('agent_ttl', 72 * 3600_000, MIN_LEAF_TTL_MS);
  const rejoinWindowMs = c.duration('rejoin_window', 30 * 24 * 3600_000, 0);
  c.done();
  const listen = splitHostPort((raw.listen as string | undefined) ?? '0.0.0.0:7700');
  return {
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
    logLevel: (raw.log_level as string | undefined) ?? 'info',
  };
}
