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
import { ConfigError, type FileProblem } from '../errors.js';
import { ajv, parseLocated, fieldPath, schemaProblems, type LocatedDocument } from './document.js';
import { parseDuration } from './duration.js';
import { validateSegment } from '../identity/spiffe.js';

export type CheckKind = 'http' | 'tcp' | 'ttl';
export type HealthStatus = 'passing' | 'warning' | 'critical';

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
  initialStatus: HealthStatus;
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
  /** Mesh inbound port requested in `sidecar_service.port`; allocated when absent. */
  meshPort?: number;
  mode: 'direct' | 'transparent';
  upstreams: Upstream[];
}

// Consul fields knit accepts and ignores, so Consul's files load unchanged.
const IGNORED_SERVICE_FIELDS = ['enable_tag_override', 'weights', 'token', 'tagged_addresses', 'kind', 'locality', 'namespace', 'partition', 'socket_path'];
const IGNORED_CHECK_FIELDS = ['notes', 'status_output', 'output_max_size', 'success_before_passing', 'failures_before_warning', 'failures_before_critical', 'body', 'disable_redirects', 'tls_server_name'];
const UNSUPPORTED_CHECK_TYPES = ['args', 'script', 'grpc', 'grpc_use_tls', 'h2ping', 'h2ping_use_tls', 'docker_container_id', 'shell', 'alias_service', 'alias_node', 'udp', 'os_service'];

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
    ...anyOf(IGNORED_CHECK_FIELDS),
    ...anyOf(UNSUPPORTED_CHECK_TYPES),
  },
} as const;

const upstreamSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['destination_name', 'local_bind_port'],
  properties: {
    destination_name: { type: 'string', minLength: 1 },
    destination_type: { enum: ['service'] },
    destination_namespace: { type: 'string' },
    local_bind_port: port,
    local_bind_address: { type: 'string', minLength: 1 },
    datacenter: { type: 'string' },
    config: { type: 'object' },
  },
} as const;

const serviceSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['name'],
  properties: {
    id: { type: 'string', minLength: 1 },
    name: { type: 'string', minLength: 1 },
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
        native: { const: false },
        sidecar_service: {
          type: 'object',
          additionalProperties: false,
          properties: {
            port,
            checks: { type: 'array' },
            check: { type: 'object' },
            tags: { type: 'array', items: { type: 'string' } },
            meta: { type: 'object' },
            proxy: {
              type: 'object',
              additionalProperties: false,
              properties: {
                mode: { enum: ['direct', 'transparent'] },
                local_service_address: { type: 'string', minLength: 1 },
                local_service_port: port,
                upstreams: { type: 'array', items: upstreamSchema },
                config: { type: 'object' },
                transparent_proxy: { type: 'object' },
              },
            },
          },
        },
      },
    },
    ...anyOf(IGNORED_SERVICE_FIELDS),
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

function problem(ctx: Ctx, path: Array<string | number>, message: string, warn = false): void {
  (warn ? ctx.warnings : ctx.problems).push({ file: ctx.doc.file, line: ctx.doc.lineOf(path), field: fieldPath(path), message });
}

function duration(ctx: Ctx, raw: Raw, key: string, path: Array<string | number>, min: number, fallback: number): number {
  const v = raw[key];
  if (v === undefined) return fallback;
  // The schema has already checked that durations are strings.
  const ms = parseDuration(v as string);
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

function normaliseCheck(ctx: Ctx, raw: Raw, path: Array<string | number>, serviceId: string, n: number, many: boolean): CheckDefinition | undefined {
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
  for (const k of IGNORED_CHECK_FIELDS) if (k in raw) problem(ctx, [...path, k], 'accepted for Consul compatibility and ignored by knit', true);
  const id = (raw.id ?? raw.check_id ?? (many ? `service:${serviceId}:${n + 1}` : `service:${serviceId}`)) as string;
  const check: CheckDefinition = {
    id,
    name: (raw.name as string | undefined) ?? `${kind} check of ${serviceId}`,
    kind,
    intervalMs: 0,
    // Consul's default check timeout.
    timeoutMs: duration(ctx, raw, 'timeout', path, 1, 10_000),
    initialStatus: (raw.status as HealthStatus | undefined) ?? 'critical',
  };
  if (kind === 'ttl') {
    check.ttlMs = duration(ctx, raw, 'ttl', path, 1000, 30_000);
  } else {
    if (raw.interval === undefined) problem(ctx, [...path, 'interval'], `an ${kind} check needs an interval`);
    // Consul's minimum interval: anything shorter is a probe storm.
    check.intervalMs = duration(ctx, raw, 'interval', path, 1000, 10_000);
    check.target = raw[kind] as string;
    if (kind === 'http') {
      try {
        const u = new URL(check.target);
        if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error('scheme');
      } catch {
        problem(ctx, [...path, 'http'], `${JSON.stringify(check.target)} is not an http(s) URL`);
      }
      check.method = (raw.method as string | undefined) ?? 'GET';
      check.headers = raw.header as Record<string, string[]> | undefined;
      check.tlsSkipVerify = raw.tls_skip_verify as boolean | undefined;
    } else if (!/^.+:\d{1,5}$/.test(check.target)) {
      problem(ctx, [...path, 'tcp'], `${JSON.stringify(check.target)} is not host:port`);
    }
  }
  if (raw.deregister_critical_service_after !== undefined) {
    check.deregisterCriticalAfterMs = duration(ctx, raw, 'deregister_critical_service_after', path, 1000, 0);
  }
  return check;
}

function normaliseService(ctx: Ctx, raw: Raw, path: Array<string | number>): ServiceDefinition | undefined {
  const name = raw.name as string;
  const before = ctx.problems.length;
  try {
    validateSegment(name, 'service name');
  } catch (e) {
    problem(ctx, [...path, 'name'], (e as Error).message.replace(/^invalid SPIFFE ID [^:]*: /, ''));
  }
  const id = (raw.id as string | undefined) ?? name;
  for (const k of IGNORED_SERVICE_FIELDS) if (k in raw) problem(ctx, [...path, k], 'accepted for Consul compatibility and ignored by knit', true);

  const meta = (raw.meta ?? {}) as Record<string, string>;
  for (const k of Object.keys(meta)) {
    if (k.length > 128 || !/^[A-Za-z0-9_-]+$/.test(k)) problem(ctx, [...path, 'meta', k], 'meta keys are at most 128 of A-Z a-z 0-9 _ -');
  }

  const rawChecks: Raw[] = raw.checks ? (raw.checks as Raw[]) : raw.check ? [raw.check as Raw] : [];
  const checksPath = raw.checks ? [...path, 'checks'] : [...path, 'check'];
  const many = rawChecks.length > 1;
  const checks: CheckDefinition[] = [];
  rawChecks.forEach((c, i) => {
    const got = normaliseCheck(ctx, c, raw.checks ? [...checksPath, i] : checksPath, id, i, many);
    if (got) checks.push(got);
  });
  const ids = new Set<string>();
  for (const c of checks) {
    if (ids.has(c.id)) problem(ctx, checksPath, `duplicate check id "${c.id}"`);
    ids.add(c.id);
  }

  const sidecar = ((raw.connect as Raw | undefined)?.sidecar_service ?? {}) as Raw;
  const proxy = (sidecar.proxy ?? {}) as Raw;
  const proxyPath = [...path, 'connect', 'sidecar_service', 'proxy'];
  const upstreams: Upstream[] = [];
  ((proxy.upstreams ?? []) as Raw[]).forEach((u, i) => {
    const up: Upstream = {
      destinationName: u.destination_name as string,
      localBindAddress: (u.local_bind_address as string | undefined) ?? '127.0.0.1',
      localBindPort: u.local_bind_port as number,
    };
    const at = [...proxyPath, 'upstreams', i];
    if (!isLoopback(up.localBindAddress) && !ctx.opts.allowRemoteUpstreams) {
      problem(ctx, [...at, 'local_bind_address'], `${up.localBindAddress} is not a loopback address: anyone who can reach it would speak as ${name}; bind 127.0.0.1, or set allow_remote_upstreams: true in agent.yaml`);
    }
    if (up.destinationName === name) problem(ctx, [...at, 'destination_name'], `an upstream to the service itself ("${name}") is not allowed`);
    else {
      try {
        validateSegment(up.destinationName, 'destination_name');
      } catch (e) {
        problem(ctx, [...at, 'destination_name'], (e as Error).message.replace(/^invalid SPIFFE ID [^:]*: /, ''));
      }
    }
    upstreams.push(up);
  });
  if (ctx.problems.length > before) return undefined;
  return {
    file: ctx.doc.file,
    id,
    name,
    address: raw.address as string | undefined,
    port: raw.port as number | undefined,
    tags: (raw.tags ?? []) as string[],
    meta,
    checks,
    localServiceAddress: (proxy.local_service_address as string | undefined) ?? '127.0.0.1',
    localServicePort: (proxy.local_service_port as number | undefined) ?? (raw.port as number | undefined),
    meshPort: sidecar.port as number | undefined,
    mode: (proxy.mode as 'direct' | 'transparent' | undefined) ?? 'direct',
    upstreams,
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

/** Parses one file's text; `file` is used for messages and to pick JSON or YAML. */
export function parseServiceFile(file: string, text: string, opts: LoadOptions = {}): LoadResult & { located: Array<Located<ServiceDefinition>>; upstreamsAt: Array<Located<Upstream>> } {
  const { doc, problems } = parseLocated(file, text);
  const result = { services: [] as ServiceDefinition[], problems, warnings: [] as FileProblem[], files: [file], located: [] as Array<Located<ServiceDefinition>>, upstreamsAt: [] as Array<Located<Upstream>> };
  if (!doc) return result;
  const schema = schemaProblems(doc, validateFile);
  if (schema.length) {
    result.problems.push(...schema);
    return result;
  }
  const value = doc.value as { service?: Raw; services?: Raw[] };
  const entries: Array<[Raw, Array<string | number>]> = value.service ? [[value.service, ['service']]] : (value.services ?? []).map((s, i) => [s, ['services', i]]);
  const ctx: Ctx = { doc, problems: result.problems, warnings: result.warnings, opts };
  for (const [raw, path] of entries) {
    const svc = normaliseService(ctx, raw, path);
    if (!svc) continue;
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
