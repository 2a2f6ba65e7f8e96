import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { once } from 'node:events';
import { CheckRunner, httpStatusToHealth, runHttpCheck, runTcpCheck, worst } from './health.js';
import type { CheckDefinition } from '../config/services.js';
import { Recorder } from '../../test/helpers/wait.js';

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
