/**
 * A small JSON-over-HTTP router for knit's APIs, and the one place where
 * errors become HTTP statuses: inner layers throw KnitErrors, this edge
 * decides 400/403/404/409/503/504.
 */
import http from 'node:http';
import https from 'node:https';
import type { SecureContextOptions } from 'node:tls';
import { once } from 'node:events';
import { KnitError, ConfigError, type KnitErrorCode } from '../errors.js';
import type { Logger } from '../log/logger.js';

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
};

/** The HTTP status for an error thrown by a handler. */
export function statusOf(e: unknown): number {
  return e instanceof KnitError ? (STATUS[e.code] ?? 500) : 500;
}

/** Largest request body accepted: an intentions file of ~10k rules fits. */
const MAX_BODY = 1 << 20;

function compile(path: string): { re: RegExp; names: string[] } {
  const names: string[] = [];
  const re = path.replace(/:([a-z]+)/g, (_, n: string) => {
    names.push(n);
    return '([^/]+)';
  });
  return { re: new RegExp(`^${re}$`), names };
}

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req as AsyncIterable<Buffer>) {
    size += c.length;
    if (size > MAX_BODY) throw new KnitError('KNIT_ERR_BAD_REQUEST', `request body larger than ${MAX_BODY} bytes`);
    chunks.push(c);
  }
  if (!size) return undefined;
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (e) {
    throw new KnitError('KNIT_ERR_BAD_REQUEST', `request body is not JSON: ${(e as Error).message}`);
  }
}

/** Builds the request listener for a set of routes. */
export function router(routes: Route[], log: Logger, authenticate: Authenticate): http.RequestListener {
  const table = routes.map((r) => ({ ...r, ...compile(r.path) }));
  return (req, res) => {
    // A client that resets mid-body must not become an uncaught error.
    req.on('error', () => undefined);
    void (async () => {
      const url = new URL(req.url ?? '/', 'http://x');
      let status = 200;
      let payload: string;
      let type = 'application/json';
      try {
        const matches = table.filter((r) => r.re.test(url.pathname));
        const route = matches.find((r) => r.method === req.method);
        if (!route) {
          if (matches.length) throw Object.assign(new KnitError('KNIT_ERR_BAD_REQUEST', `${req.method} not allowed on ${url.pathname}`), { status: 405 });
          throw new KnitError('KNIT_ERR_NOT_FOUND', `no such endpoint ${url.pathname}`);
        }
        const caller = authenticate(req);
        if (!allowed(route.access ?? 'operator', caller)) {
          throw new KnitError('KNIT_ERR_UNAUTHORIZED', `${req.method} ${url.pathname} needs ${route.access === 'agent' ? 'an agent certificate' : route.access === 'agent-or-operator' ? 'an agent certificate or the operator token' : 'the operator token'}`);
        }
        const m = route.re.exec(url.pathname)!;
        const params = Object.fromEntries(route.names.map((n, i) => [n, decodeURIComponent(m[i + 1]!)]));
        const body = req.method === 'GET' ? undefined : await readBody(req);
        const out = await route.handler({ caller, method: req.method ?? 'GET', path: url.pathname, params, query: url.searchParams, body });
        status = out.status ?? 200;
        if (out.text !== undefined) {
          payload = out.text;
          type = 'text/plain; version=0.0.4';
        } else payload = JSON.stringify(out.json ?? {}, null, 1);
      } catch (e) {
        status = (e as { status?: number }).status ?? statusOf(e);
        const err = e instanceof KnitError ? e : new KnitError('KNIT_ERR_BAD_REQUEST', String(e));
        if (status === 500) log.error({ err: (e as Error).message, path: url.pathname }, 'API handler failed');
        payload = JSON.stringify({ error: err.message, code: err.code, ...(e instanceof ConfigError ? { problems: e.problems } : {}) });
      }
      // A body left unread (refused as too large) makes the connection unusable: say so.
      if (!req.complete) res.setHeader('connection', 'close');
      res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(payload) });
      res.end(payload);
    })();
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
  const listener = router(routes, log, opts.authenticate ?? (() => ({ kind: 'operator' })));
  const server = opts.tls ? https.createServer({ ...opts.tls, requestCert: true, rejectUnauthorized: false }, listener) : http.createServer(listener);
  // Slow-loris bound for a loopback API.
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  server.listen(port, host);
  try {
    await once(server, 'listening');
  } catch (e) {
    throw new KnitError('KNIT_ERR_LISTEN', `cannot listen on ${host}:${port}: ${(e as Error).message}`, { cause: e });
  }
  return { server, port: (server.address() as { port: number }).port };
}

/** Reads a required string field from a JSON body or query. */
export function field(src: unknown, name: string): string {
  const v = src instanceof URLSearchParams ? src.get(name) : (src as Record<string, unknown> | undefined)?.[name];
  if (typeof v !== 'string' || !v) throw new KnitError('KNIT_ERR_BAD_REQUEST', `"${name}" is required`);
  return v;
}
