import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import { once } from 'node:events';
import { CheckRunner, httpStatusToHealth, runHttpCheck, runTcpCheck, worst } from './health.js';
import type { CheckDefinition } from '../config/services.js';
import { Recorder } from '../../test/helpers/wait.js';
import { makePki } from '../../test/helpers/pki.js';
import { createCsr } from '../identity/csr.js';
import { serverId } from '../identity/spiffe.js';

const def = (over: Partial<CheckDefinition>): CheckDefinition => ({ id: 'c', name: 'c', kind: 'http', intervalMs: 1000, timeoutMs: 500, initialStatus: 'critical', ...over });

test('HTTP status mapping follows Consul: 2xx passing, 429 warning, else critical', () => {
  assert.equal(httpStatusToHealth(200), 'passing');
  assert.equal(httpStatusToHealth(204), 'passing');
  assert.equal(httpStatusToHealth(429), 'warning');
  assert.equal(httpStatusToHealth(301), 'critical');
  assert.equal(httpStatusToHealth(503), 'critical');
  assert.equal(worst([]), 'passing');
  assert.equal(worst(['passing', 'warning']), 'warning');
  assert.equal(worst(['warning', 'critical', 'passing']), 'critical');
});

test('http checks against a real server: status codes, timeouts and refused connections', async () => {
  let code = 200;
  let hang = false;
  const srv = http.createServer((req, res) => {
    if (hang) return;
    res.statusCode = code;
    res.end(req.method);
  });
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const url = `http://127.0.0.1:${(srv.address() as net.AddressInfo).port}/health`;
  assert.equal((await runHttpCheck(def({ target: url }))).status, 'passing');
  code = 429;
  assert.equal((await runHttpCheck(def({ target: url }))).status, 'warning');
  code = 500;
  const r = await runHttpCheck(def({ target: url }));
  assert.equal(r.status, 'critical');
  assert.match(r.output, /500/);
  hang = true;
  const t = await runHttpCheck(def({ target: url, timeoutMs: 200 }));
  assert.equal(t.status, 'critical');
  assert.match(t.output, /timed out after 200 ms/);
  srv.closeAllConnections();
  srv.close();
  await once(srv, 'close');
  assert.equal((await runHttpCheck(def({ target: url }))).status, 'critical');
});

test('http checks send their method and headers, one connection per probe', async () => {
  const seen: Array<{ method?: string; token?: string; multi?: string; connection?: string }> = [];
  let connections = 0;
  const srv = http.createServer((req, res) => {
    seen.push({ method: req.method, token: req.headers['x-token'] as string | undefined, multi: req.headers['x-multi'] as string | undefined, connection: req.headers.connection });
    res.statusCode = req.method === 'POST' && req.headers['x-token'] === 's3cret' ? 204 : 400;
    res.end();
  });
  srv.on('connection', () => connections++);
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const target = `http://127.0.0.1:${(srv.address() as net.AddressInfo).port}/h`;
  const check = def({ target, method: 'POST', headers: { 'x-token': ['s3cret'], 'x-multi': ['a', 'b'] } });
  const r = await runHttpCheck(check);
  assert.deepEqual(r, { status: 'passing', output: `HTTP POST ${target}: 204` });
  assert.equal((await runHttpCheck({ ...check, method: 'GET' })).status, 'critical');
  await runHttpCheck(check);
  assert.deepEqual(seen[0], { method: 'POST', token: 's3cret', multi: 'a, b', connection: 'close' });
  assert.equal(connections, 3, 'no connection kept between probes');
  // A header value node will not send is a critical result, not a crash.
  const invalid = await runHttpCheck({ ...check, headers: { 'x-bad': ['a\nb'] } });
  assert.equal(invalid.status, 'critical');
  srv.close();
  await once(srv, 'close');
});

test('http checks time out on a body that never ends, and stop reading a long one', async () => {
  const srv = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain' });
    if (req.url === '/slow') return void res.write('partial');
    // 10 MB: read only until the status is known and a little more.
    const chunk = Buffer.alloc(64 * 1024, 'x');
    let sent = 0;
    const more = (): void => {
      while (sent < 160 && res.write(chunk)) sent++;
      if (sent < 160) res.once('drain', more);
      else res.end();
    };
    more();
  });
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const base = `http://127.0.0.1:${(srv.address() as net.AddressInfo).port}`;
  const slow = await runHttpCheck(def({ target: `${base}/slow`, timeoutMs: 200 }));
  assert.deepEqual(slow, { status: 'critical', output: `HTTP GET ${base}/slow: timed out after 200 ms` });
  const big = await runHttpCheck(def({ target: `${base}/big`, timeoutMs: 5000 }));
  assert.equal(big.status, 'passing');
  srv.closeAllConnections();
  srv.close();
  await once(srv, 'close');
});

test('https checks verify the certificate unless tls_skip_verify', async () => {
  // A leaf of a CA nobody trusts, for 127.0.0.1.
  const pki = await makePki('health.knit');
  const id = serverId('health.knit', 'h');
  const { csrPem, keyPem } = await createCsr(id);
  const leaf = await pki.ca.signCsr(csrPem, id, { extraNames: ['127.0.0.1'] });
  const srv = https.createServer({ cert: leaf.certPem, key: keyPem }, (_req, res) => res.end('ok'));
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const target = `https://127.0.0.1:${(srv.address() as net.AddressInfo).port}/`;
  const strict = await runHttpCheck(def({ target }));
  assert.equal(strict.status, 'critical');
  assert.match(strict.output, /certificate/i);
  assert.deepEqual(await runHttpCheck(def({ target, tlsSkipVerify: true })), { status: 'passing', output: `HTTP GET ${target}: 200` });
  const runner = new CheckRunner(def({ target, tlsSkipVerify: true, intervalMs: 60_000 }), () => undefined);
  await runner.start();
  assert.equal(runner.result.status, 'passing');
  runner.stop();
  srv.close();
  await once(srv, 'close');
});

test('tcp checks pass on connect and fail on refusal', async () => {
  const srv = net.createServer((s) => s.end());
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const target = `127.0.0.1:${(srv.address() as net.AddressInfo).port}`;
  assert.equal((await runTcpCheck(def({ kind: 'tcp', target }))).status, 'passing');
  srv.close();
  await once(srv, 'close');
  const r = await runTcpCheck(def({ kind: 'tcp', target }));
  assert.equal(r.status, 'critical');
  assert.match(r.output, /ECONNREFUSED/);
});

test('a ttl check passes on report and turns critical when the TTL runs out', async () => {
  const rec = new Recorder<string>();
  const c = new CheckRunner(def({ kind: 'ttl', ttlMs: 150 }), (r) => rec.push(r.status));
  await c.start();
  assert.equal(c.result.status, 'critical');
  c.report('passing');
  await rec.next('passing', (s) => s === 'passing');
  await rec.next('expired', (s) => s === 'critical', 2000);
  assert.match(c.result.output, /TTL of 150 ms expired/);
  c.stop();
  assert.throws(() => new CheckRunner(def({ kind: 'http' }), () => undefined).report('passing'), /not a ttl check/);
});
