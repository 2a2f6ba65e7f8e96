import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { request } from 'undici';
import { pino } from 'pino';
import { listenApi, parseTarget, statusOf, type Route } from './router.js';
import { KnitError, ConfigError, isKnitError } from '../errors.js';
import { silentLogger } from '../log/logger.js';
import { crashProbe, assertServing, type ProbeReport } from '../../test/helpers/probes.js';
import { makePki } from '../../test/helpers/pki.js';

test('errors map to HTTP statuses in one table', () => {
  assert.equal(statusOf(new KnitError('KNIT_ERR_BAD_REQUEST', '')), 400);
  assert.equal(statusOf(new KnitError('KNIT_ERR_DENIED', '')), 403);
  assert.equal(statusOf(new KnitError('KNIT_ERR_NOT_FOUND', '')), 404);
  assert.equal(statusOf(new KnitError('KNIT_ERR_CAS_CONFLICT', '')), 409);
  assert.equal(statusOf(new KnitError('KNIT_ERR_NO_ENDPOINT', '')), 503);
  assert.equal(statusOf(new KnitError('KNIT_ERR_TIMEOUT', '')), 504);
  assert.equal(statusOf(new Error('boom')), 500);
});

test('garbage requests get a clear error and the API keeps serving', async () => {
  const routes: Route[] = [
    { method: 'POST', path: '/v1/echo/:name', handler: (r) => ({ json: { name: r.params.name, body: r.body } }) },
    { method: 'GET', path: '/v1/bad', handler: () => { throw new ConfigError([{ file: 'f.json', line: 2, field: 'x', message: 'wrong' }]); } },
  ];
  const { server, port } = await listenApi(routes, '127.0.0.1', 0, silentLogger());
  const url = `http://127.0.0.1:${port}`;
  const call = async (method: 'GET' | 'POST', path: string, body?: string) => {
    const r = await request(url + path, { method, body });
    return { status: r.statusCode, json: (await r.body.json()) as Record<string, unknown> };
  };
  assert.deepEqual(await call('POST', '/v1/echo/a%20b', '{"x":1}'), { status: 200, json: { name: 'a b', body: { x: 1 } } });
  const notJson = await call('POST', '/v1/echo/a', '{nope');
  assert.equal(notJson.status, 400);
  assert.match(String(notJson.json.error), /request body is not JSON/);
  assert.equal((await call('GET', '/v1/nothing')).status, 404);
  assert.equal((await call('GET', '/v1/echo/a')).status, 405);
  // An oversized body is refused: a 400 if the client reads it before the server hangs up, else a reset.
  const big: { status: number | string; json: Record<string, unknown> } = await call('POST', '/v1/echo/a', 'x'.repeat(2 << 20)).catch((e: Error) => ({ status: e.message, json: {} }));
  assert.ok(big.status === 400 || /ECONNRESET|EPIPE|other side closed/.test(String(big.status)), String(big.status));
  if (big.status === 400) assert.match(String(big.json.error), /larger than/);
  const cfg = await call('GET', '/v1/bad');
  assert.equal(cfg.status, 400);
  assert.deepEqual(cfg.json.problems, [{ file: 'f.json', line: 2, field: 'x', message: 'wrong' }]);

  // Raw garbage on the socket: the server answers 400 and stays up.
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => undefined);
  s.write('\x16\x03\x01garbage\r\n\r\n');
  let got = '';
  s.on('data', (d: Buffer) => (got += d.toString()));
  // once() would reject on the reset that may follow the 400; only the close matters here.
  await new Promise((r) => s.on('close', r));
  assert.match(got, /^HTTP\/1\.1 400/);
  assert.equal((await call('POST', '/v1/echo/ok', '{}')).status, 200);
  server.close();
});

/** Writes `bytes` on a fresh connection and collects everything until the server closes it. */
async function raw(port: number, bytes: string | Buffer): Promise<string> {
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => undefined);
  let got = '';
  s.on('data', (d: Buffer) => (got += d.toString('latin1')));
  s.write(bytes);
  // once() would reject on a reset after the answer; only the close matters here.
  await new Promise((r) => s.on('close', r));
  return got;
}

/** Status and parsed JSON body of the first response in `text`. */
function firstResponse(text: string): { status: number; json: Record<string, unknown> } {
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0);
  const head = text.indexOf('\r\n\r\n');
  const len = Number(/content-length: (\d+)/i.exec(text.slice(0, head))?.[1] ?? 0);
  return { status, json: JSON.parse(text.slice(head + 4, head + 4 + len) || '{}') as Record<string, unknown> };
}

/** A listener closed when the test ends, passed or not (an open server would keep the run alive). */
async function serve(t: TestContext, ...args: Parameters<typeof listenApi>) {
  const api = await listenApi(...args);
  t.after(() => {
    api.server.close();
    api.server.closeAllConnections();
  });
  return api;
}

async function echoApi(t: TestContext, extra: Route[] = [], log = silentLogger()) {
  const routes: Route[] = [
    { method: 'GET', path: '/v1/health', access: 'public', handler: () => ({ json: { status: 'ok' } }) },
    { method: 'POST', path: '/v1/echo/:name', handler: (r) => ({ json: { name: r.params.name, body: r.body } }) },
    ...extra,
  ];
  const api = await serve(t, routes, '127.0.0.1', 0, log);
  const call = async (method: 'GET' | 'POST', path: string, body?: string, headers: Record<string, string> = {}) => {
    const r = await request(`http://127.0.0.1:${api.port}${path}`, { method, body, headers });
    return { status: r.statusCode, json: (await r.body.json()) as Record<string, unknown> };
  };
  return { ...api, call };
}

test('regression: GET // and other malformed request targets crashed the process; now each is a 4xx and the API keeps serving', async (t) => {
  const { port, call } = await echoApi(t);
  for (const [target, status, error] of [
    ['//', 404, /no such endpoint \/\//],
    ['//[', 404, /no such endpoint/],
    ['//x:99999', 404, /no such endpoint/],
    ['//x:99999/v1/health', 404, /no such endpoint/],
    ['///v1/health', 404, /no such endpoint/],
    ['*', 400, /request target "\*" is not a path/],
    ['http://[::1/', 400, /is not a valid URL/],
  ] as const) {
    const r = firstResponse(await raw(port, `GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`));
    assert.equal(r.status, status, target);
    assert.match(String(r.json.error), error, target);
  }
  // `//a b` never reaches the router: the HTTP parser refuses the request line.
  assert.match(await raw(port, 'GET //a b HTTP/1.1\r\nHost: x\r\n\r\n'), /^HTTP\/1\.1 400 Bad Request\r\n[\s\S]*malformed HTTP request/);
  // Absolute-form is served (its host is ignored); `..` is resolved before routing.
  assert.match(await raw(port, 'GET http://elsewhere/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'), /^HTTP\/1\.1 200/);
  assert.match(await raw(port, 'GET /v1/x/../health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'), /^HTTP\/1\.1 200/);
  assert.equal((await call('GET', '/v1/health')).status, 200);
});

test('a path parameter that is not valid percent-encoding is a 400 naming it', async (t) => {
  const { call } = await echoApi(t);
  for (const bad of ['%zz', '%', '%E0%A4%A', '%C0%AF', '%FF']) {
    const r = await call('POST', `/v1/echo/a${bad}`, '{}');
    assert.equal(r.status, 400, bad);
    assert.equal(r.json.code, 'KNIT_ERR_BAD_REQUEST');
    assert.match(String(r.json.error), /^path segment ".*" \(:name\) is not valid percent-encoding/, bad);
    assert.ok(String(r.json.error).includes(`a${bad}`), String(r.json.error));
  }
  assert.deepEqual((await call('POST', '/v1/echo/%E2%9C%93', '{}')).json, { name: '✓', body: {} });
});

test('a body must be JSON: another content type is a 415, a missing one is taken as JSON', async (t) => {
  const { port, call } = await echoApi(t);
  for (const type of ['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/jsonp', '']) {
    const r = await call('POST', '/v1/echo/a', '{"x":1}', { 'content-type': type });
    assert.equal(r.status, 415, type);
    assert.match(String(r.json.error), /^content-type ".*" is not supported: send the body as application\/json$/, type);
  }
  for (const type of ['application/json', 'Application/JSON; charset=utf-8']) assert.equal((await call('POST', '/v1/echo/a', '{"x":1}', { 'content-type': type })).status, 200, type);
  // No content type (undici sends none for a string body unless told).
  assert.deepEqual(await call('POST', '/v1/echo/a', '{"x":1}'), { status: 200, json: { name: 'a', body: { x: 1 } } });
  // No body, any content type: nothing to misread.
  assert.equal((await call('POST', '/v1/echo/a', undefined, { 'content-type': 'text/plain' })).status, 200);
  // A declared length over the cap is refused before a byte of it is read.
  const big = firstResponse(await raw(port, 'POST /v1/echo/a HTTP/1.1\r\nHost: x\r\ncontent-length: 2097152\r\n\r\n{'));
  assert.equal(big.status, 400);
  assert.match(String(big.json.error), /larger than 1048576 bytes/);
});

test('the HTTP parser\'s client errors are answered (400, 431 over 16 KiB of headers) and never throw', async (t) => {
  const { port, call } = await echoApi(t);
  assert.match(await raw(port, `GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-big: ${'a'.repeat(15 * 1024)}\r\n\r\n`), /^HTTP\/1\.1 200/);
  assert.match(await raw(port, `GET /v1/health HTTP/1.1\r\nHost: x\r\nx-big: ${'a'.repeat(17 * 1024)}\r\n\r\n`), /^HTTP\/1\.1 431 Request Header Fields Too Large\r\n[\s\S]*HPE_HEADER_OVERFLOW/);
  assert.match(await raw(port, 'FOO / HTTP/1.1\r\nHost: x\r\n\r\n'), /^HTTP\/1\.1 400 Bad Request\r\n/);
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => undefined);
  s.end('GET /v1/health HTTP/1.1\r\nHost: x\r\nx-half: a');
  let got = '';
  s.on('data', (d: Buffer) => (got += d.toString()));
  await new Promise((r) => s.on('close', r));
  assert.match(got, /^HTTP\/1\.1 400 Bad Request\r\n/, 'EOF in the middle of the headers');
  // Good requests and garbage in one write: the good ones are answered first, then the 400.
  const both = await raw(port, `${'GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(2)}\x00\x01garbage\r\n\r\n`);
  assert.deepEqual(both.match(/HTTP\/1\.1 \d{3}/g), ['HTTP/1.1 200', 'HTTP/1.1 200', 'HTTP/1.1 400']);
  assert.match(both, /\}HTTP\/1\.1 400 Bad Request\r\n[\s\S]*malformed HTTP request/);
  assert.equal((await call('GET', '/v1/health')).status, 200);
});

test('whatever escapes a handler ends that request with a 500, never the process', async (t) => {
  const lines: Array<Record<string, unknown>> = [];
  const log = pino({ level: 'error' }, { write: (l: string) => void lines.push(JSON.parse(l) as Record<string, unknown>) });
  const { call } = await echoApi(t, [
    { method: 'GET', path: '/v1/bad-status', handler: () => ({ status: 1000, json: {} }) },
    { method: 'GET', path: '/v1/cycle', handler: () => { const o: Record<string, unknown> = {}; o.o = o; return { json: o }; } },
    { method: 'GET', path: '/v1/throws-string', handler: () => { throw Object.create(null) as Error; } },
  ], log);
  for (const p of ['/v1/bad-status', '/v1/cycle', '/v1/throws-string']) assert.equal((await call('GET', p)).status, 500, p);
  assert.equal((await call('GET', '/v1/health')).status, 200);
  assert.deepEqual(lines.map((l) => l.msg), ['API request failed outside its handler', 'API handler failed', 'API handler failed']);
});

test('parseTarget reads origin-form and absolute-form, and refuses anything else', () => {
  const t = (raw: string) => {
    const r = parseTarget(raw);
    return `${r.path}?${r.query.toString()}`;
  };
  assert.equal(t('/v1/x?a=b'), '/v1/x?a=b');
  assert.equal(t('//'), '//?');
  assert.equal(t('//x:99999'), '//x:99999?');
  assert.equal(t('/a/../b/%zz'), '/b/%zz?');
  assert.equal(t('http://h:1/v1/x?q=%zz'), '/v1/x?q=%25zz');
  for (const bad of ['*', '', 'x', 'h:443', 'ftp://h/', 'http://[::1/', 'http://x:99999/']) {
    assert.throws(() => parseTarget(bad), (e: unknown) => isKnitError(e, 'KNIT_ERR_BAD_REQUEST'), bad);
  }
});

/** Routes shaped like knit's, recording every handler that ran: the probes must never run one that acts without reading its body. */
function knitLikeRoutes(ran: string[]): Route[] {
  const h = (name: string) => (r: { body: unknown }) => {
    ran.push(name);
    return { json: { got: typeof r.body } };
  };
  return [
    { method: 'GET', path: '/v1/health', access: 'public', handler: () => ({ json: { status: 'ok' } }) },
    { method: 'GET', path: '/v1/state', handler: () => ({ json: {} }) },
    { method: 'PUT', path: '/v1/agent/check/:kind/:id', handler: (r) => { throw new KnitError('KNIT_ERR_NOT_FOUND', `no check ${r.params.id}`); } },
    { method: 'POST', path: '/v1/agent/reload', handler: h('reload') },
    { method: 'POST', path: '/v1/tokens', handler: h('tokens') },
    { method: 'POST', path: '/v1/intentions/apply', handler: (r) => { throw new KnitError('KNIT_ERR_BAD_REQUEST', `no intentions in ${typeof r.body}`); } },
    { method: 'PUT', path: '/v1/intentions', handler: () => { throw new KnitError('KNIT_ERR_BAD_REQUEST', '"source" is required'); } },
    { method: 'DELETE', path: '/v1/intentions', handler: () => { throw new KnitError('KNIT_ERR_BAD_REQUEST', '"source" is required'); } },
    { method: 'GET', path: '/v1/intentions/check', handler: () => ({ json: { allow: false } }) },
    { method: 'POST', path: '/v1/agent/enrol', access: 'public', handler: () => { throw new KnitError('KNIT_ERR_BAD_REQUEST', '"node" is required'); } },
    { method: 'POST', path: '/v1/agent/rejoin', access: 'public', handler: () => { throw new KnitError('KNIT_ERR_BAD_REQUEST', '"nonce" is required'); } },
    { method: 'POST', path: '/v1/agent/challenge', access: 'public', handler: h('challenge') },
    { method: 'PUT', path: '/v1/nodes/:node', handler: h('set node') },
    { method: 'POST', path: '/v1/nodes/:node/revoke', handler: h('revoke') },
  ];
}

/** Every outcome a probe may have: an answer that is not a server error, or a connection the server closed. */
function assertNoServerErrors(r: ProbeReport, alsoAllowed: RegExp = /^$/): void {
  const bad = r.outcomes.filter((o) => !/^[234]\d\d$|^closed$|^reset$|^timeout$/.test(o.outcome) && !alsoAllowed.test(o.outcome));
  assert.deepEqual(bad, [], 'probes answered with a server error or not HTTP');
}

test('crash probes over HTTP: hundreds of hostile requests, all refused, none runs a handler that acts, the API keeps serving', async (t) => {
  const ran: string[] = [];
  const { port } = await serve(t, knitLikeRoutes(ran), '127.0.0.1', 0, silentLogger());
  const t0 = Date.now();
  const r = await crashProbe({ host: '127.0.0.1', port });
  const ms = Date.now() - t0;
  assert.ok(r.sent >= 500, `${r.sent} probes`);
  assert.ok(r.answered >= r.sent - 20, `${r.answered} of ${r.sent} answered: ${JSON.stringify(r.statuses)}`);
  assertNoServerErrors(r);
  assert.deepEqual(ran, []);
  assert.ok(ms < 15_000, `${ms} ms`);
  await assertServing({ host: '127.0.0.1', port });
});

test('crash probes over HTTPS (the control plane\'s listener), including bytes that are not TLS', async (t) => {
  const pki = await makePki();
  const leaf = await pki.leaf('knit-server');
  const ran: string[] = [];
  const { port } = await serve(t, knitLikeRoutes(ran), '127.0.0.1', 0, silentLogger(), {
    tls: { cert: leaf.certChainPem, key: leaf.keyPem, ca: leaf.trustBundlePem, minVersion: 'TLSv1.3' },
    authenticate: () => ({ kind: 'anonymous' }),
  });
  const t0 = Date.now();
  const r = await crashProbe({ host: '127.0.0.1', port, tls: true });
  const ms = Date.now() - t0;
  assert.ok(r.sent >= 500, `${r.sent} probes`);
  assert.ok(r.answered >= r.sent - 30, `${r.answered} of ${r.sent} answered: ${JSON.stringify(r.statuses)}`);
  // Bytes that are not TLS may be answered with a TLS alert.
  assertNoServerErrors(r, /^not-http$/);
  // Anonymous callers are refused before any body is read.
  assert.ok((r.statuses['403'] ?? 0) > 100, JSON.stringify(r.statuses));
  for (const name of ['plain HTTP to a TLS port', 'garbage before the handshake']) {
    assert.match(r.outcomes.find((o) => o.probe === name)!.outcome, /^closed$|^reset$/, name);
  }
  assert.deepEqual(ran, []);
  assert.ok(ms < 15_000, `${ms} ms`);
  await assertServing({ host: '127.0.0.1', port, tls: true });
});
