import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { request } from 'undici';
import { listenApi, statusOf, type Route } from './router.js';
import { KnitError, ConfigError } from '../errors.js';
import { silentLogger } from '../log/logger.js';

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
