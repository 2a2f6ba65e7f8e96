/**
 * A small JSON-over-HTTP router for knit's APIs, and the one place where
 * errors become HTTP statuses: inner layers throw KnitErrors, this edge
 * decides 400/403/404/405/409/415/503/504.
 *
 * Everything a client sends is parsed inside that edge (the request target,
 * the path parameters' percent-encoding, the body), so no request can make
 * the listener throw: a malformed one is a 4xx and the process keeps serving.
 */
import http from 'node:http';
import https from 'node:https';
import type { Duplex } from 'node:stream';
import type { SecureContextOptions } from 'node:tls';
import { once } from 'node:events';
import { KnitError, ConfigError, type KnitErrorCode } from '../errors.js';
import { EVENTS, type Logger } from '../log/logger.js';

/** Who is calling, as the edge established it. */
export type Caller = { kind: 'operator' } | { kind: 'agent'; node: string } | { kind: 'anonymous' };

/** Who may call a route. */
export type Access = 'public' | 'agent' | 'operator' | 'agent-or-operator';

/** A request as handlers see it. */
export interface ApiRequest {
  caller: Caller;
  method: string;
  path: string;
  params: Record<string, string>;
  query: URLSearchParams;
  body: unknown;
}

/** A handler's answer: JSON unless `text` is given. */
export type ApiResponse = { status?: number; json?: unknown; text?: string };

export interface Route {
  method: 'GET' | 'PUT' | 'POST' | 'DELETE';
  /** `/v1/agent/check/:kind/:id` style; `:name` captures one segment. */
  path: string;
  /** Default `operator`: a route is closed unless it says otherwise. */
  access?: Access;
  handler: (req: ApiRequest) => Promise<ApiResponse> | ApiResponse;
}

function allowed(access: Access, c: Caller): boolean {
  switch (access) {
    case 'public':
      return true;
    case 'agent':
      return c.kind === 'agent';
    case 'operator':
      return c.kind === 'operator';
    case 'agent-or-operator':
      return c.kind !== 'anonymous';
  }
}

/** How a listener identifies callers. */
export type Authenticate = (req: http.IncomingMessage) => Caller;

const STATUS: Partial<Record<KnitErrorCode, number>> = {
  KNIT_ERR_BAD_REQUEST: 400,
  KNIT_ERR_CONFIG: 400,
  KNIT_ERR_SPIFFE_ID: 400,
  KNIT_ERR_CERT: 400,
  KNIT_ERR_CA: 400,
  KNIT_ERR_UNAUTHORIZED: 403,
  KNIT_ERR_DENIED: 403,
  KNIT_ERR_NOT_FOUND: 404,
  KNIT_ERR_CAS_CONFLICT: 409,
  KNIT_ERR_REGISTRY_UNAVAILABLE: 503,
  KNIT_ERR_SERVER_UNAVAILABLE: 503,
  KNIT_ERR_NO_ENDPOINT: 503,
  KNIT_ERR_TIMEOUT: 504,
  // A request that met a process shutting down may be retried elsewhere.
  KNIT_ERR_CLOSED: 503,
  // The registry holds something the control plane did not sign, or refuses this process's credential.
  KNIT_ERR_SIGNATURE: 502,
  KNIT_ERR_REGISTRY_DENIED: 502,
};

/** The HTTP status for an error thrown by a handler. */
export function statusOf(e: unknown): number {
  if (e instanceof KnitError && typeof (e as { status?: unknown }).status === 'number') return (e as KnitError & { status: number }).status;
  return e instanceof KnitError ? (STATUS[e.code] ?? 500) : 500;
}

/**
 * A KnitError answered with a status its code alone does not say: 405 and
 * 415 are both a bad request, but the client needs to know which.
 */
function withStatus(e: KnitError, status: number): KnitError {
  return Object.assign(e, { status });
}

/** Largest request body accepted: an intentions file of ~10k rules fits. */
const MAX_BODY = 1 << 20;

/**
 * Largest request line plus headers accepted, in bytes. Node's default is
 * the same 16 KiB, but it is process-wide and `--max-http-header-size` (or
 * NODE_OPTIONS) can raise it; setting it on the server pins the bound knit
 * is tested with. knit's clients send a few short headers (content-type, a
 * bearer token), and this is what an unauthenticated peer can make the
 * parser hold per connection before anything checks who it is.
 */
export const MAX_HEADER_SIZE = 16 * 1024;

/** Client-controlled text quoted in an error message or log line, cut to a readable length. */
function clip(s: string, max = 120): string {
  return s.length > max ? `${s.slice(0, max)}…(${s.length} chars)` : s;
}

/** A thrown value as text, even one whose toString throws. */
function describe(e: unknown): string {
  try {
    return e instanceof Error ? e.message : String(e);
  } catch {
    return 'unprintable error';
  }
}

/**
 * The request target as a path and a query. Accepts origin-form (`/v1/x?a=b`)
 * and absolute-form (`http://host/v1/x`, RFC 9112 §3.2.2, whose host is
 * ignored: knit serves no virtual hosts); anything else, asterisk-form
 * included, is a bad request. `//host` is a path here, never an authority.
 */
export function parseTarget(raw: string): { path: string; query: URLSearchParams } {
  let url: URL;
  if (raw.startsWith('/')) {
    // A fixed authority in front: the WHATWG parser cannot read any of `raw` as a host or port.
    try {
      url = new URL(`http://knit${raw}`);
    } catch {
      throw new KnitError('KNIT_ERR_BAD_REQUEST', `request target ${JSON.stringify(clip(raw))} is not a valid path`);
    }
  } else if (/^https?:\/\//i.test(raw)) {
    try {
      url = new URL(raw);
    } catch {
      throw new KnitError('KNIT_ERR_BAD_REQUEST', `request target ${JSON.stringify(clip(raw))} is not a valid URL`);
    }
  } else {
    throw new KnitError('KNIT_ERR_BAD_REQUEST', `request target ${JSON.stringify(clip(raw))} is not a path (send e.g. GET /v1/health)`);
  }
  return { path: url.pathname, query: url.searchParams };
}

function compile(path: string): { re: RegExp; names: string[] } {
  const names: string[] = [];
  const re = path.replace(/:([a-z]+)/g, (_, n: string) => {
    names.push(n);
    return '([^/]+)';
  });
  return { re: new RegExp(`^${re}$`), names };
}

function decodeParam(name: string, raw: string): string {
  try {
    return decodeURIComponent(raw);
  } catch {
    throw new KnitError('KNIT_ERR_BAD_REQUEST', `path segment ${JSON.stringify(clip(raw))} (:${name}) is not valid percent-encoding (a % must start %XX of UTF-8)`);
  }
}

/** True when the request carries a body (a non-zero length or a chunked one). */
function hasBody(req: http.IncomingMessage): boolean {
  return req.headers['transfer-encoding'] !== undefined || Number(req.headers['content-length'] ?? 0) > 0;
}

/**
 * Refuses a body knit would misread: a content type other than JSON (415),
 * or a declared length over the cap (refused before reading any of it). A
 * missing content type is taken as JSON.
 */
function checkBodyHeaders(req: http.IncomingMessage): void {
  if (!hasBody(req)) return;
  const type = req.headers['content-type'];
  if (type !== undefined) {
    const media = (type.split(';')[0] ?? '').trim().toLowerCase();
    if (media !== 'application/json') throw withStatus(new KnitError('KNIT_ERR_BAD_REQUEST', `content-type ${JSON.stringify(clip(type, 60))} is not supported: send the body as application/json`), 415);
  }
  if (Number(req.headers['content-length'] ?? 0) > MAX_BODY) throw new KnitError('KNIT_ERR_BAD_REQUEST', `request body larger than ${MAX_BODY} bytes`);
}

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const c of req as AsyncIterable<Buffer>) {
      size += c.length;
      if (size > MAX_BODY) throw new KnitError('KNIT_ERR_BAD_REQUEST', `request body larger than ${MAX_BODY} bytes`);
      chunks.push(c);
    }
  } catch (e) {
    if (e instanceof KnitError) throw e;
    throw new KnitError('KNIT_ERR_BAD_REQUEST', `request body not received: ${describe(e)}`, { cause: e });
  }
  if (!size) return undefined;
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (e) {
    throw new KnitError('KNIT_ERR_BAD_REQUEST', `request body is not JSON: ${describe(e)}`);
  }
}

type Compiled = Route & { re: RegExp; names: string[] };
type Answer = { status: number; type: string; payload: string };

/** Parses the request, runs its route and says what to answer; never throws. */
async function answer(table: Compiled[], req: http.IncomingMessage, log: Logger, authenticate: Authenticate): Promise<Answer> {
  const method = req.method ?? 'GET';
  const target = req.url ?? '/';
  try {
    const { path, query } = parseTarget(target);
    const matches = table.filter((r) => r.re.test(path));
    const route = matches.find((r) => r.method === method);
    if (!route) {
      if (matches.length) throw withStatus(new KnitError('KNIT_ERR_BAD_REQUEST', `${method} not allowed on ${clip(path)}`), 405);
      throw new KnitError('KNIT_ERR_NOT_FOUND', `no such endpoint ${clip(path)}`);
    }
    const caller = authenticate(req);
    if (!allowed(route.access ?? 'operator', caller)) {
      throw new KnitError('KNIT_ERR_UNAUTHORIZED', `${method} ${clip(path)} needs ${route.access === 'agent' ? 'an agent certificate' : route.access === 'agent-or-operator' ? 'an agent certificate or the operator token' : 'the operator token'}`);
    }
    const m = route.re.exec(path)!;
    const params = Object.fromEntries(route.names.map((n, i) => [n, decodeParam(n, m[i + 1]!)]));
    checkBodyHeaders(req);
    const body = method === 'GET' ? undefined : await readBody(req);
    const out = await route.handler({ caller, method, path, params, query, body });
    if (out.text !== undefined) return { status: out.status ?? 200, type: 'text/plain; version=0.0.4', payload: out.text };
    return { status: out.status ?? 200, type: 'application/json', payload: JSON.stringify(out.json ?? {}, null, 1) };
  } catch (e) {
    const status = statusOf(e);
    const err = e instanceof KnitError ? e : new KnitError('KNIT_ERR_BAD_REQUEST', describe(e));
    if (status === 500) log.error({ event: EVENTS.apiHandlerFailed, err: describe(e), method, path: clip(target) }, 'API handler failed');
    const payload = JSON.stringify({ error: err.message, code: err.code, ...(e instanceof ConfigError ? { problems: e.problems } : {}) });
    return { status, type: 'application/json', payload };
  }
}

/** Builds the request listener for a set of routes. */
export function router(routes: Route[], log: Logger, authenticate: Authenticate): http.RequestListener {
  const table = routes.map((r) => ({ ...r, ...compile(r.path) }));
  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    const a = await answer(table, req, log, authenticate);
    if (res.headersSent || res.destroyed) return;
    // A body left unread (refused before or while reading) makes the connection unusable: say so.
    if (!req.complete) res.setHeader('connection', 'close');
    res.writeHead(a.status, { 'content-type': a.type, 'content-length': Buffer.byteLength(a.payload) });
    res.end(a.payload);
  };
  return (req, res) => {
    // A client that resets mid-body, or a write to a socket it closed, must not become an uncaught error.
    req.on('error', () => undefined);
    res.on('error', () => undefined);
    // Whatever escapes (a handler's invalid status, say) ends this request, never the process.
    handle(req, res)
      .catch((e: unknown) => {
        log.error({ event: EVENTS.apiRequestFailed, err: describe(e), method: req.method, path: clip(req.url ?? '') }, 'API request failed outside its handler');
        if (res.headersSent) return void res.destroy();
        const payload = JSON.stringify({ error: 'internal error', code: 'KNIT_ERR_BAD_REQUEST' });
        res.writeHead(500, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload), connection: 'close' });
        res.end(payload);
      })
      .catch(() => res.destroy());
  };
}

const PARSER_STATUS: Record<string, [number, string]> = {
  HPE_HEADER_OVERFLOW: [431, 'Request Header Fields Too Large'],
  ERR_HTTP_REQUEST_TIMEOUT: [408, 'Request Timeout'],
};

/** The requests on one connection whose responses have not finished, and what to do once there are none. */
interface ConnState {
  open: Set<http.IncomingMessage>;
  whenIdle?: () => void;
}

/**
 * Answers what Node's HTTP parser refused (bad request line, header over
 * MAX_HEADER_SIZE, broken chunking, EOF mid-request): 400 (431 for headers
 * too large, 408 for a request too slow) and the connection closed. Never
 * throws. Writes only once no response is in flight on the connection, else
 * it would land in the middle of one: after good pipelined requests it waits
 * for their answers; when the error is in the body of the request being
 * served, that request can never complete and the connection is dropped.
 */
function onClientError(log: Logger, conns: WeakMap<Duplex, ConnState>): (err: Error & { code?: string }, socket: Duplex) => void {
  return (err, socket) => {
    try {
      log.debug({ event: EVENTS.apiMalformedRequest, err: err.code ?? err.message }, 'refused a malformed HTTP request');
      const reply = (): void => {
        try {
          if (!socket.writable) return void socket.destroy();
          const [status, reason] = PARSER_STATUS[err.code ?? ''] ?? [400, 'Bad Request'];
          const payload = JSON.stringify({ error: `malformed HTTP request (${err.code ?? 'parse error'}: ${err.message})`, code: 'KNIT_ERR_BAD_REQUEST' });
          socket.end(`HTTP/1.1 ${status} ${reason}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(payload)}\r\n\r\n${payload}`);
        } catch {
          socket.destroy();
        }
      };
      const c = conns.get(socket);
      if (err.code === 'ECONNRESET') socket.destroy();
      else if (!c?.open.size) reply();
      else if ([...c.open].every((r) => r.complete)) c.whenIdle = reply;
      else socket.destroy();
    } catch {
      socket.destroy();
    }
  };
}

export interface ListenOptions {
  /** Serve HTTPS with this material, asking (not requiring) a client certificate. */
  tls?: SecureContextOptions;
  /** Default: every caller is the operator, which only a loopback-only listener may use. */
  authenticate?: Authenticate;
}

/** Starts an HTTP(S) server for routes on host:port; resolves with the bound port. */
export async function listenApi(routes: Route[], host: string, port: number, log: Logger, opts: ListenOptions = {}): Promise<{ server: http.Server | https.Server; port: number }> {
  const route = router(routes, log, opts.authenticate ?? (() => ({ kind: 'operator' })));
  const conns = new WeakMap<Duplex, ConnState>();
  const listener: http.RequestListener = (req, res) => {
    const c = conns.get(req.socket) ?? { open: new Set() };
    conns.set(req.socket, c);
    c.open.add(req);
    res.once('close', () => {
      c.open.delete(req);
      if (c.open.size || !c.whenIdle) return;
      const then = c.whenIdle;
      c.whenIdle = undefined;
      then();
    });
    route(req, res);
  };
  const server = opts.tls
    ? https.createServer({ ...opts.tls, requestCert: true, rejectUnauthorized: false, maxHeaderSize: MAX_HEADER_SIZE }, listener)
    : http.createServer({ maxHeaderSize: MAX_HEADER_SIZE }, listener);
  server.on('clientError', onClientError(log, conns));
  // Slow-loris bound for a loopback API.
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  server.listen(port, host);
  try {
    await once(server, 'listening');
  } catch (e) {
    throw new KnitError('KNIT_ERR_LISTEN', `cannot listen on ${host}:${port}: ${(e as Error).message}`, { cause: e });
  }
  // After listening, a server 'error' is an accept failure (EMFILE under a connection flood): log it, keep serving.
  server.on('error', (e) => log.error({ event: EVENTS.apiAcceptFailed, err: describe(e) }, `API listener on ${host}:${port} failed to accept a connection`));
  return { server, port: (server.address() as { port: number }).port };
}

/** Reads a required string field from a JSON body or query. */
export function field(src: unknown, name: string): string {
  const v = src instanceof URLSearchParams ? src.get(name) : (src as Record<string, unknown> | undefined)?.[name];
  if (typeof v !== 'string' || !v) throw new KnitError('KNIT_ERR_BAD_REQUEST', `"${name}" is required`);
  return v;
}
