/**
 * Service definitions in Consul's format. The agent loads every `*.json`,
 * `*.yaml` and `*.yml` directly in its config dir (alphabetical order, no
 * subfolders), each holding `service: {...}` or `services: [...]` with
 * Consul's field names, so an existing Consul file works unchanged.
 *
 * Every problem is collected (not only the first) and names the file, the
 * line where the parser knows it, and the field. A Consul field that knit
 * accepts but does not act on (`enable_tag_override`, `weights`, ...) is a
 * warning, not an error, so Consul files still load; a field neither knows
 * is an error, because it is almost always a typo.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { isIP } from 'node:net';
import { ConfigError, type FileProblem } from '../errors.js';
import { ajv, parseLocated, fieldPath, schemaProblems, type LocatedDocument } from './document.js';
import { parseDuration } from './duration.js';
import { validateSegment } from '../identity/spiffe.js';

export type CheckKind = 'http' | 'tcp' | 'ttl';
/** A check's status as a service file may set it (`status`); the registry's CheckStatus has the same values. */
export type CheckStatus = 'passing' | 'warning' | 'critical';

/** A health check, normalised. */
export interface CheckDefinition {
  id: string;
  name: string;
  kind: CheckKind;
  /** URL for http, host:port for tcp. */
  target?: string;
  method?: string;
  headers?: Record<string, string[]>;
  tlsSkipVerify?: boolean;
  intervalMs: number;
  timeoutMs: number;
  /** For ttl checks: how long a pass lasts. */
  ttlMs?: number;
  initialStatus: CheckStatus;
  deregisterCriticalAfterMs?: number;
}

/** An upstream: a local port on which the agent proxies to another service. */
export interface Upstream {
  destinationName: string;
  localBindAddress: string;
  localBindPort: number;
}

/** A service as the agent runs it. */
export interface ServiceDefinition {
  /** The file it came from (for messages). */
  file: string;
  id: string;
  name: string;
  /** Advertised address; the agent's advertise address when absent. */
  address?: string;
  /** The application's own port; absent for a client-only service. */
  port?: number;
  tags: string[];
  meta: Record<string, string>;
  checks: CheckDefinition[];
  /** Where the inbound proxy forwards to: the application on this host. */
  localServiceAddress: string;
  localServicePort?: number;
  /**
   * `transparent`: when the agent runs transparent mode, unmodified
   * applications of this host that call a mesh name or address speak as
   * this service (needed only when the host runs more than one service).
   */
  mode: 'direct' | 'transparent';
  /**
   * `connect.inbound`: in transparent mode, plaintext clients outside the
   * mesh calling the service's own port are refused (`strict`, the
   * default) or carried and counted as unauthenticated (`permissive`).
   */
  inbound: 'strict' | 'permissive';
  upstreams: Upstream[];
  /**
   * `deregister_critical_service_after`, the smallest over the service's
   * checks: a service critical for this long is deregistered (Consul's
   * semantics; knit's minimum is 1 s where Consul's is 1 min). Absent: never.
   */
  deregisterCriticalAfterMs?: number;
}

/**
 * Consul fields knit accepts but does not act on, with what that means for
 * the user. Each loads with a warning naming it, never silently, so that a
 * Consul file still loads and nobody believes a setting is in force.
 */
const IGNORED_SERVICE_FIELDS: Record<string, string> = {
  enable_tag_override: 'tags are always the file\'s',
  weights: 'every routable instance gets an equal share',
  token: 'knit has no ACL tokens in service files; identity comes from the node record',
  tagged_addresses: 'peers reach the instance at its address (or the agent\'s advertise address)',
  locality: 'routing is not locality-aware',
  namespace: 'knit has one namespace, "default"',
  partition: 'knit has no admin partitions',
  socket_path: 'the inbound proxy forwards to local_service_address:local_service_port, never to a unix socket',
};
const IGNORED_CHECK_FIELDS: Record<string, string> = {
  notes: 'a comment',
  status_output: 'check output is what the check saw',
  output_max_size: 'output is kept short anyway',
  success_before_passing: 'one success makes the check passing',
  failures_before_warning: 'one failure changes the status',
  failures_before_critical: 'one failure makes the check critical',
  body: 'http checks send no body',
  disable_redirects: 'redirects are not followed',
  tls_server_name: 'the URL\'s host name is used',
  grpc_use_tls: 'grpc checks are not supported',
  h2ping_use_tls: 'h2ping checks are not supported',
};
const IGNORED_SIDECAR_FIELDS: Record<string, string> = {
  port: 'the agent serves every service of the host on one HBONE port (hbone_port in agent.yaml, 15008)',
  checks: 'the sidecar is the agent itself; its health is the agent\'s',
  check: 'the sidecar is the agent itself; its health is the agent\'s',
  tags: 'the sidecar is not registered separately',
  meta: 'the sidecar is not registered separately',
};
const IGNORED_PROXY_FIELDS: Record<string, string> = {
  config: 'Envoy settings have no meaning for knit\'s proxy',
  transparent_proxy: 'the capture ports are the agent\'s (transparent: in agent.yaml)',
  expose: 'paths are not exposed without mTLS',
  mesh_gateway: 'knit has no mesh gateways',
};
const IGNORED_UPSTREAM_FIELDS: Record<string, string> = {
  datacenter: 'knit has one datacenter: the upstream goes to the instances in this registry',
  config: 'Envoy settings have no meaning for knit\'s proxy',
  mesh_gateway: 'knit has no mesh gateways',
  destination_partition: 'knit has no admin partitions: the upstream goes to the service in this mesh',
  destination_peer: 'knit has no cluster peering: the upstream goes to the service in this mesh',
};
const UNSUPPORTED_CHECK_TYPES = ['args', 'script', 'grpc', 'h2ping', 'docker_container_id', 'shell', 'alias_service', 'alias_node', 'udp', 'os_service'];

/** Consul's service kinds; knit runs its own sidecar, so only a typical service is one it can run. */
const TYPICAL_KINDS = ['', 'typical'];

/**
 * The shortest `deregister_critical_service_after` knit honours. Consul
 * raises anything under one minute to one minute; knit keeps Consul's
 * semantics (a service critical that long is deregistered; "0" or absent:
 * never) but honours values down to 1 s, so that tests and demos need not
 * wait a minute. Shorter values are raised to 1 s with a warning.
 */
export const MIN_DEREGISTER_CRITICAL_MS = 1000;

const durationString = { type: 'string' } as const;
const port = { type: 'integer', minimum: 1, maximum: 65535 } as const;
const anyOf = (names: string[]): Record<string, object> => Object.fromEntries(names.map((n) => [n, {}]));

const checkSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    id: { type: 'string', minLength: 1 },
    check_id: { type: 'string', minLength: 1 },
    name: { type: 'string' },
    http: { type: 'string', minLength: 1 },
    method: { type: 'string', minLength: 1 },
    header: { type: 'object', additionalProperties: { type: 'array', items: { type: 'string' } } },
    tls_skip_verify: { type: 'boolean' },
    tcp: { type: 'string', minLength: 1 },
    ttl: durationString,
    interval: durationString,
    timeout: durationString,
    status: { enum: ['passing', 'warning', 'critical'] },
    deregister_critical_service_after: durationString,
    ...anyOf(Object.keys(IGNORED_CHECK_FIELDS)),
    ...anyOf(UNSUPPORTED_CHECK_TYPES),
  },
} as const;

const upstreamSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['destination_name', 'local_bind_port'],
  properties: {
    destination_name: { type: 'string', minLength: 1 },
    destination_type: { const: 'service', 'x-hint': 'must be "service" (knit has no prepared queries)' },
    destination_namespace: { type: 'string' },
    local_bind_port: port,
    local_bind_address: { type: 'string', minLength: 1 },
    ...anyOf(Object.keys(IGNORED_UPSTREAM_FIELDS)),
  },
} as const;

const serviceSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['name'],
  properties: {
    id: { type: 'string', minLength: 1 },
    name: { type: 'string', minLength: 1 },
    kind: { type: 'string' },
    address: { type: 'string', minLength: 1 },
    port,
    tags: { type: 'array', items: { type: 'string' } },
    meta: { type: 'object', additionalProperties: { type: 'string', maxLength: 512 }, maxProperties: 64 },
    check: checkSchema,
    checks: { type: 'array', items: checkSchema },
    connect: {
      type: 'object',
      additionalProperties: false,
      properties: {
        native: { const: false, 'x-hint': 'must be false: connect-native applications are not supported (knit\'s agent is the proxy)' },
        inbound: { enum: ['strict', 'permissive'] },
        sidecar_service: {
          type: 'object',
          additionalProperties: false,
          properties: {
            ...anyOf(Object.keys(IGNORED_SIDECAR_FIELDS)),
            proxy: {
              type: 'object',
              additionalProperties: false,
              properties: {
                mode: { enum: ['direct', 'transparent'] },
                local_service_address: { type: 'string', minLength: 1 },
                local_service_port: port,
                upstreams: { type: 'array', items: upstreamSchema },
                ...anyOf(Object.keys(IGNORED_PROXY_FIELDS)),
              },
            },
          },
        },
      },
    },
    ...anyOf(Object.keys(IGNORED_SERVICE_FIELDS)),
  },
} as const;

const fileSchema = {
  type: 'object',
  additionalProperties: false,
  properties: { service: serviceSchema, services: { type: 'array', items: serviceSchema, minItems: 1 } },
  minProperties: 1,
  maxProperties: 1,
} as const;

const validateFile = ajv.compile(fileSchema);

type Raw = Record<string, unknown>;
type Path = Array<string | number>;

interface Ctx {
  doc: LocatedDocument;
  problems: FileProblem[];
  warnings: FileProblem[];
  opts: LoadOptions;
}

/** How strictly service files are read; the agent config decides. */
export interface LoadOptions {
  /**
   * Let an upstream bind a non-loopback address (agent.yaml
   * `allow_remote_upstreams: true`). Off by default: whoever can reach an
   * upstream's port speaks with the service's identity.
   */
  allowRemoteUpstreams?: boolean;
}

/** True for addresses only this host can reach. */
export function isLoopback(host: string): boolean {
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host) || host === '::1' || host === 'localhost';
}

const HOSTNAME = /^(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;

/** An IP address or a DNS name: something a socket can be pointed at. */
export function isHostOrAddress(host: string): boolean {
  return isIP(host) !== 0 || HOSTNAME.test(host);
}

/**
 * A `host:port` (or `[v6]:port`) whose port is within `minPort`..65535,
 * or a reason why not. The one parser of addresses in knit's files.
 */
export function parseHostPort(v: string, minPort = 1): { host: string; port: number } | { error: string } {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\s[\]]+)):(\d+)$/.exec(v);
  if (!m) return { error: `${JSON.stringify(v)} is not host:port (e.g. 127.0.0.1:8080, [::1]:8080)` };
  const host = m[1] ?? m[2]!;
  const port = Number(m[3]);
  if (!isHostOrAddress(host)) return { error: `${JSON.stringify(host)} in ${JSON.stringify(v)} is neither an IP address nor a host name` };
  if (port < minPort || port > 65535) return { error: `port ${m[3]} in ${JSON.stringify(v)} is out of range (${minPort} to 65535)` };
  return { host, port };
}

/** An HTTP token (RFC 9110): what a method or header name may contain. */
const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

const isObj = (v: unknown): v is Raw => typeof v === 'object' && v !== null && !Array.isArray(v);
const str = (raw: Raw, k: string): string | undefined => (typeof raw[k] === 'string' ? raw[k] : undefined);
const int = (raw: Raw, k: string): number | undefined => (Number.isInteger(raw[k]) ? (raw[k] as number) : undefined);

function problem(ctx: Ctx, path: Path, message: string, warn = false): void {
  (warn ? ctx.warnings : ctx.problems).push({ file: ctx.doc.file, line: ctx.doc.lineOf(path), field: fieldPath(path), message });
}

/** Warns once for each field of `raw` that knit accepts and ignores. */
function warnIgnored(ctx: Ctx, raw: Raw, path: Path, fields: Record<string, string>): void {
  for (const [k, why] of Object.entries(fields)) if (k in raw) problem(ctx, [...path, k], `accepted for Consul compatibility and ignored by knit (${why})`, true);
}

/**
 * A duration field in ms: `fallback` when absent, or when it is not a
 * string (the schema has reported that already, so nothing is added here).
 */
function duration(ctx: Ctx, raw: Raw, key: string, path: Path, min: number, fallback: number): number {
  const v = raw[key];
  if (typeof v !== 'string') return fallback;
  const ms = parseDuration(v);
  if (ms === undefined) {
    problem(ctx, [...path, key], `${JSON.stringify(v)} is not a duration (use e.g. "10s", "500ms", "1m")`);
    return fallback;
  }
  if (ms < min) {
    problem(ctx, [...path, key], `must be at least ${min}ms`);
    return fallback;
  }
  return ms;
}

function httpTarget(ctx: Ctx, target: string, at: Path): void {
  let u: URL;
  try {
    u = new URL(target);
  } catch {
    return problem(ctx, at, `${JSON.stringify(target)} is not an http(s) URL`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') return problem(ctx, at, `${JSON.stringify(target)} is not an http(s) URL`);
  if (u.port === '0') problem(ctx, at, `port 0 in ${JSON.stringify(target)} is out of range (1 to 65535)`);
}

function normaliseCheck(ctx: Ctx, raw: Raw, path: Path, serviceId: string, n: number, many: boolean): CheckDefinition | undefined {
  const unsupported = UNSUPPORTED_CHECK_TYPES.find((k) => k in raw);
  if (unsupported) {
    problem(ctx, [...path, unsupported], `check type "${unsupported}" is not supported by knit (supported: http, tcp, ttl)`);
    return undefined;
  }
  const kinds = (['http', 'tcp', 'ttl'] as const).filter((k) => k in raw);
  if (kinds.length !== 1) {
    problem(ctx, path, kinds.length ? `a check has exactly one of http, tcp, ttl (found ${kinds.join(', ')})` : 'a check needs one of http, tcp or ttl');
    return undefined;
  }
  const kind = kinds[0]!;
  warnIgnored(ctx, raw, path, IGNORED_CHECK_FIELDS);
  const id = str(raw, 'id') ?? str(raw, 'check_id') ?? (many ? `service:${serviceId}:${n + 1}` : `service:${serviceId}`);
  const check: CheckDefinition = {
    id,
    name: str(raw, 'name') ?? `${kind} check of ${serviceId}`,
    kind,
    intervalMs: 0,
    // Consul's default check timeout.
    timeoutMs: duration(ctx, raw, 'timeout', path, 1, 10_000),
    initialStatus: (str(raw, 'status') as CheckStatus | undefined) ?? 'critical',
  };
  if (kind === 'ttl') {
    check.ttlMs = duration(ctx, raw, 'ttl', path, 1000, 30_000);
    if ('interval' in raw) problem(ctx, [...path, 'interval'], 'ignored: a ttl check is not run by the agent; it passes while the application reports within the ttl', true);
  } else {
    if (raw.interval === undefined) problem(ctx, [...path, 'interval'], `an ${kind} check needs an interval`);
    // Consul's minimum interval: anything shorter is a probe storm.
    check.intervalMs = duration(ctx, raw, 'interval', path, 1000, 10_000);
    const target = str(raw, kind);
    if (target !== undefined) check.target = target;
    if (kind === 'http') {
      if (target !== undefined) httpTarget(ctx, target, [...path, 'http']);
      const method = str(raw, 'method');
      if (method !== undefined && !TOKEN.test(method)) problem(ctx, [...path, 'method'], `${JSON.stringify(method)} is not an HTTP method`);
      check.method = method ?? 'GET';
      if (isObj(raw.header)) {
        for (const [name, values] of Object.entries(raw.header)) {
          if (!TOKEN.test(name)) problem(ctx, [...path, 'header', name], `${JSON.stringify(name)} is not an HTTP header name`);
          if (Array.isArray(values) && values.some((v) => typeof v === 'string' && /[\r\n\0]/.test(v))) problem(ctx, [...path, 'header', name], 'a header value may not contain line breaks or NUL');
        }
        check.headers = raw.header as Record<string, string[]>;
      }
      if (typeof raw.tls_skip_verify === 'boolean') check.tlsSkipVerify = raw.tls_skip_verify;
    } else if (target !== undefined) {
      const hp = parseHostPort(target);
      if ('error' in hp) problem(ctx, [...path, 'tcp'], hp.error);
    }
  }
  const dereg = str(raw, 'deregister_critical_service_after');
  if (dereg !== undefined) {
    const ms = duration(ctx, raw, 'deregister_critical_service_after', path, 0, 0);
    if (ms > 0 && ms < MIN_DEREGISTER_CRITICAL_MS) {
      problem(ctx, [...path, 'deregister_critical_service_after'], `${dereg} is below knit's minimum; raised to 1s (Consul's minimum is 1m)`, true);
      check.deregisterCriticalAfterMs = MIN_DEREGISTER_CRITICAL_MS;
    } else if (ms > 0) check.deregisterCriticalAfterMs = ms;
  }
  return check;
}

/** Checks a name against the SPIFFE path-segment rules; records the reason. */
function segment(ctx: Ctx, v: string, what: string, at: Path): void {
  try {
    validateSegment(v, what);
  } catch (e) {
    problem(ctx, at, (e as Error).message.replace(/^invalid SPIFFE ID [^:]*: /, ''));
  }
}

function normaliseUpstreams(ctx: Ctx, proxy: Raw, proxyPath: Path, name: string): Upstream[] {
  const upstreams: Upstream[] = [];
  if (!Array.isArray(proxy.upstreams)) return upstreams;
  proxy.upstreams.forEach((u: unknown, i) => {
    if (!isObj(u)) return;
    const at = [...proxyPath, 'upstreams', i];
    warnIgnored(ctx, u, at, IGNORED_UPSTREAM_FIELDS);
    const ns = str(u, 'destination_namespace');
    if (ns !== undefined && ns !== '' && ns !== 'default') problem(ctx, [...at, 'destination_namespace'], `accepted for Consul compatibility and ignored by knit (knit has one namespace: the upstream goes to "${str(u, 'destination_name') ?? '?'}" in "default", not in "${ns}")`, true);
    const up: Upstream = {
      destinationName: str(u, 'destination_name') ?? '',
      localBindAddress: str(u, 'local_bind_address') ?? '127.0.0.1',
      localBindPort: int(u, 'local_bind_port') ?? 0,
    };
    if (isIP(up.localBindAddress) === 0 && up.localBindAddress !== 'localhost') {
      problem(ctx, [...at, 'local_bind_address'], `${JSON.stringify(up.localBindAddress)} is not an IP address to bind (e.g. 127.0.0.1)`);
    } else if (!isLoopback(up.localBindAddress) && !ctx.opts.allowRemoteUpstreams) {
      problem(ctx, [...at, 'local_bind_address'], `${up.localBindAddress} is not a loopback address: anyone who can reach it would speak as ${name}; bind 127.0.0.1, or set allow_remote_upstreams: true in agent.yaml`);
    }
    if (up.destinationName === name) problem(ctx, [...at, 'destination_name'], `an upstream to the service itself ("${name}") is not allowed`);
    else if (up.destinationName) segment(ctx, up.destinationName, 'destination_name', [...at, 'destination_name']);
    upstreams.push(up);
  });
  return upstreams;
}

function normaliseService(ctx: Ctx, raw: Raw, path: Path): ServiceDefinition {
  const name = str(raw, 'name') ?? '';
  if (name) segment(ctx, name, 'service name', [...path, 'name']);
  const id = str(raw, 'id') ?? name;
  warnIgnored(ctx, raw, path, IGNORED_SERVICE_FIELDS);
  const kind = str(raw, 'kind');
  if (kind !== undefined && !TYPICAL_KINDS.includes(kind)) {
    problem(ctx, [...path, 'kind'], `a "${kind}" registration is not something knit runs: knit's agent is the sidecar proxy and registers it by itself; delete this definition (a typical service has no kind)`);
  }
  const address = str(raw, 'address');
  if (address !== undefined && !isHostOrAddress(address)) problem(ctx, [...path, 'address'], `${JSON.stringify(address)} is neither an IP address nor a host name`);

  const meta = isObj(raw.meta) ? (raw.meta as Record<string, string>) : {};
  for (const k of Object.keys(meta)) {
    if (k.length > 128 || !/^[A-Za-z0-9_-]+$/.test(k)) problem(ctx, [...path, 'meta', k], 'meta keys are at most 128 of A-Z a-z 0-9 _ -');
  }

  // Consul runs `check` and every entry of `checks`, in that order.
  const rawChecks: Array<[Raw, Path]> = [];
  if (isObj(raw.check)) rawChecks.push([raw.check, [...path, 'check']]);
  if (Array.isArray(raw.checks)) raw.checks.forEach((c: unknown, i) => isObj(c) && rawChecks.push([c, [...path, 'checks', i]]));
  const many = rawChecks.length > 1;
  const checks: CheckDefinition[] = [];
  rawChecks.forEach(([c, at], i) => {
    const got = normaliseCheck(ctx, c, at, id, i, many);
    if (got) checks.push(got);
  });
  const ids = new Set<string>();
  for (const [i, c] of checks.entries()) {
    if (ids.has(c.id)) problem(ctx, rawChecks[i]?.[1] ?? path, `duplicate check id "${c.id}"`);
    ids.add(c.id);
  }

  const connect = isObj(raw.connect) ? raw.connect : {};
  const sidecar = isObj(connect.sidecar_service) ? connect.sidecar_service : {};
  const sidecarPath = [...path, 'connect', 'sidecar_service'];
  warnIgnored(ctx, sidecar, sidecarPath, IGNORED_SIDECAR_FIELDS);
  const proxy = isObj(sidecar.proxy) ? sidecar.proxy : {};
  const proxyPath = [...sidecarPath, 'proxy'];
  warnIgnored(ctx, proxy, proxyPath, IGNORED_PROXY_FIELDS);
  const mode = str(proxy, 'mode') === 'transparent' ? 'transparent' : 'direct';
  const localServiceAddress = str(proxy, 'local_service_address') ?? '127.0.0.1';
  if (!isHostOrAddress(localServiceAddress)) problem(ctx, [...proxyPath, 'local_service_address'], `${JSON.stringify(localServiceAddress)} is neither an IP address nor a host name`);
  const upstreams = normaliseUpstreams(ctx, proxy, proxyPath, name);

  const deregister = checks.map((c) => c.deregisterCriticalAfterMs).filter((ms): ms is number => ms !== undefined);
  return {
    file: ctx.doc.file,
    id,
    name,
    address,
    port: int(raw, 'port'),
    tags: Array.isArray(raw.tags) ? raw.tags.filter((t): t is string => typeof t === 'string') : [],
    meta,
    checks,
    localServiceAddress,
    localServicePort: int(proxy, 'local_service_port') ?? int(raw, 'port'),
    mode,
    inbound: connect.inbound === 'permissive' ? 'permissive' : 'strict',
    upstreams,
    ...(deregister.length ? { deregisterCriticalAfterMs: Math.min(...deregister) } : {}),
  };
}

/** Where each service and upstream came from, for cross-file checks. */
interface Located<T> {
  item: T;
  owner?: ServiceDefinition;
  file: string;
  line?: number;
  field: string;
}

/** The result of loading: what is valid, every problem, and warnings. */
export interface LoadResult {
  services: ServiceDefinition[];
  problems: FileProblem[];
  warnings: FileProblem[];
  files: string[];
}

/** True when `field` is `prefix` itself or lies inside it. */
function within(field: string | undefined, prefix: string): boolean {
  return field === prefix || field === '(top level)' || (!!field && (field.startsWith(`${prefix}.`) || field.startsWith(`${prefix}[`)));
}

/**
 * Parses one file's text; `file` is used for messages and to pick JSON or
 * YAML. A schema problem (a wrong type, an unknown field) does not stop
 * the rest of the file from being checked: every problem is reported at
 * once, and a service with any problem is left out of `services`.
 */
export function parseServiceFile(file: string, text: string, opts: LoadOptions = {}): LoadResult & { located: Array<Located<ServiceDefinition>>; upstreamsAt: Array<Located<Upstream>> } {
  const { doc, problems } = parseLocated(file, text);
  const result = { services: [] as ServiceDefinition[], problems, warnings: [] as FileProblem[], files: [file], located: [] as Array<Located<ServiceDefinition>>, upstreamsAt: [] as Array<Located<Upstream>> };
  if (!doc) return result;
  result.problems.push(...schemaProblems(doc, validateFile));
  const value = isObj(doc.value) ? doc.value : {};
  const entries: Array<[Raw, Path]> = [];
  if (isObj(value.service)) entries.push([value.service, ['service']]);
  if (Array.isArray(value.services)) value.services.forEach((s: unknown, i) => isObj(s) && entries.push([s, ['services', i]]));
  const ctx: Ctx = { doc, problems: result.problems, warnings: result.warnings, opts };
  const made = entries.map(([raw, path]) => ({ raw, path, svc: normaliseService(ctx, raw, path) }));
  for (const { raw, path, svc } of made) {
    const prefix = fieldPath(path);
    if (result.problems.some((p) => within(p.field, prefix))) continue;
    result.services.push(svc);
    result.located.push({ item: svc, file, line: doc.lineOf([...path, 'id']) ?? doc.lineOf([...path, 'name']), field: fieldPath([...path, raw.id ? 'id' : 'name']) });
    svc.upstreams.forEach((u, i) => {
      const at = [...path, 'connect', 'sidecar_service', 'proxy', 'upstreams', i, 'local_bind_port'];
      result.upstreamsAt.push({ item: u, owner: svc, file, line: doc.lineOf(at), field: fieldPath(at) });
    });
  }
  return result;
}

/** The service files of a directory: `*.json|*.yaml|*.yml`, alphabetical, no subfolders. */
export async function listServiceFiles(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { withFileTypes: true });
  return entries
    .filter((e) => e.isFile() && /\.(json|ya?ml)$/.test(e.name))
    .map((e) => join(dir, e.name))
    .sort();
}

/** Loads and cross-checks several files' texts (ids unique, one upstream per local port). */
export function parseServiceFiles(files: Array<{ file: string; text: string }>, opts: LoadOptions = {}): LoadResult {
  const out: LoadResult = { services: [], problems: [], warnings: [], files: [] };
  const ids = new Map<string, Located<ServiceDefinition>>();
  const ports = new Map<string, Located<Upstream>>();
  for (const { file, text } of files) {
    const r = parseServiceFile(file, text, opts);
    out.files.push(file);
    out.problems.push(...r.problems);
    out.warnings.push(...r.warnings);
    for (const s of r.located) {
      const prev = ids.get(s.item.id);
      if (prev) {
        out.problems.push({ file: s.file, line: s.line, field: s.field, message: `duplicate service id "${s.item.id}" (first defined in ${prev.file}${prev.line ? `:${prev.line}` : ''})` });
        continue;
      }
      ids.set(s.item.id, s);
      out.services.push(s.item);
    }
    for (const u of r.upstreamsAt) {
      const k = `${u.item.localBindAddress}:${u.item.localBindPort}`;
      const prev = ports.get(k);
      if (prev) {
        out.problems.push({ file: u.file, line: u.line, field: u.field, message: `local port ${k} is already used by the upstream to "${prev.item.destinationName}" (${prev.file}${prev.line ? `:${prev.line}` : ''})` });
        out.services = out.services.filter((s) => s !== u.owner);
      } else ports.set(k, u);
    }
  }
  return out;
}

/** Reads a directory (or one file) and returns everything valid plus every problem. */
export async function loadServices(dirOrFile: string, opts: LoadOptions & { isFile?: boolean } = {}): Promise<LoadResult> {
  const files = opts.isFile ? [dirOrFile] : await listServiceFiles(dirOrFile);
  const texts = await Promise.all(files.map(async (file) => ({ file, text: await readFile(file, 'utf8') })));
  return parseServiceFiles(texts, opts);
}

/** Loads and throws a ConfigError listing every problem when any file is bad. */
export async function loadServicesStrict(dir: string, opts: LoadOptions = {}): Promise<LoadResult> {
  const r = await loadServices(dir, opts);
  if (r.problems.length) throw new ConfigError(r.problems);
  return r;
}
