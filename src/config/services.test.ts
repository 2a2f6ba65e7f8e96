import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, mkdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseServiceFiles, loadServices, loadServicesStrict } from './services.js';
import { parseDuration } from './duration.js';
import { isKnitError } from '../errors.js';

const productExample = `{ "service": { "name": "web", "port": 8080,
    "checks": [{ "http": "http://127.0.0.1:8080/health", "interval": "5s" }],
    "connect": { "sidecar_service": { "proxy": {
        "upstreams": [{ "destination_name": "api", "local_bind_port": 9191 }] } } } } }`;

const one = (file: string, text: string) => parseServiceFiles([{ file, text }]);

test('the product.md example loads with Consul defaults', () => {
  const r = one('web.json', productExample);
  assert.deepEqual(r.problems, []);
  const [s] = r.services;
  assert.ok(s);
  assert.equal(s.id, 'web');
  assert.equal(s.port, 8080);
  assert.equal(s.checks[0]?.kind, 'http');
  assert.equal(s.checks[0]?.intervalMs, 5000);
  assert.equal(s.checks[0]?.timeoutMs, 10_000);
  assert.equal(s.checks[0]?.id, 'service:web');
  assert.deepEqual(s.upstreams, [{ destinationName: 'api', localBindAddress: '127.0.0.1', localBindPort: 9191 }]);
});

test('a full Consul file with fields knit ignores still loads, with warnings', () => {
  const r = one('api.json', JSON.stringify({
    service: {
      id: 'api-1', name: 'api', port: 9001, tags: ['v1'], meta: { version: '1' },
      enable_tag_override: false, weights: { passing: 10, warning: 1 },
      check: { id: 'api-tcp', tcp: '127.0.0.1:9001', interval: '10s', timeout: '1s', notes: 'x' },
    },
  }));
  assert.deepEqual(r.problems, []);
  assert.equal(r.services[0]?.id, 'api-1');
  assert.ok(r.warnings.some((w) => w.field === 'service.enable_tag_override'));
});

test('YAML and a services list are accepted', () => {
  const r = one('two.yaml', 'services:\n  - name: a\n    port: 1000\n  - name: b\n    port: 1001\n    checks:\n      - ttl: 30s\n');
  assert.deepEqual(r.problems, []);
  assert.deepEqual(r.services.map((s) => s.name), ['a', 'b']);
  assert.equal(r.services[1]?.checks[0]?.ttlMs, 30_000);
});

const bad: Array<[string, string, string, { line?: number; field?: RegExp; message: RegExp }]> = [
  ['JSON syntax error', 'a.json', '{ "service": {\n  "name": "a",\n  }\n}', { line: 3, message: /JSON syntax error/ }],
  ['YAML syntax error', 'a.yaml', 'service:\n  name: [a\n', { message: /syntax error/ }],
  ['unknown field', 'a.json', '{ "service": {\n  "name": "a",\n  "prot": 80\n} }', { line: 3, field: /^service\.prot$/, message: /unknown field "prot"/ }],
  ['wrong type', 'a.yaml', 'service:\n  name: a\n  port: "80"\n', { line: 3, field: /^service\.port$/, message: /must be integer/ }],
  ['port out of range', 'a.yaml', 'service:\n  name: a\n  port: 70000\n', { line: 3, field: /^service\.port$/, message: /port out of range/ }],
  ['missing name', 'a.yaml', 'service:\n  port: 80\n', { field: /^service$/, message: /missing required field "name"/ }],
  ['upstream to itself', 'a.yaml', 'service:\n  name: a\n  connect:\n    sidecar_service:\n      proxy:\n        upstreams:\n          - destination_name: a\n            local_bind_port: 9000\n', { line: 7, field: /upstreams\[0\]\.destination_name$/, message: /to the service itself/ }],
  ['two upstreams on one local port', 'a.yaml', 'service:\n  name: a\n  connect:\n    sidecar_service:\n      proxy:\n        upstreams:\n          - destination_name: b\n            local_bind_port: 9000\n          - destination_name: c\n            local_bind_port: 9000\n', { line: 10, field: /upstreams\[1\]\.local_bind_port$/, message: /already used by the upstream to "b"/ }],
  ['bad duration', 'a.yaml', 'service:\n  name: a\n  check:\n    tcp: "localhost:1"\n    interval: 5 seconds\n', { line: 5, field: /check\.interval$/, message: /not a duration/ }],
  ['interval below 1s', 'a.yaml', 'service:\n  name: a\n  check:\n    tcp: "localhost:1"\n    interval: 100ms\n', { field: /check\.interval$/, message: /at least 1000ms/ }],
  ['unsupported check', 'a.yaml', 'service:\n  name: a\n  check:\n    args: [ls]\n    interval: 5s\n', { line: 4, field: /check\.args$/, message: /not supported by knit/ }],
  ['bad service name', 'a.yaml', 'service:\n  name: "we b"\n', { line: 2, field: /service\.name$/, message: /may only contain/ }],
  ['duplicate key', 'a.json', '{ "service": { "name": "a",\n "name": "b" } }', { line: 2, message: /unique/ }],
  ['two top-level keys', 'a.yaml', 'service: { name: a }\nservices: [{ name: b }]\n', { message: /exactly one of/ }],
];

for (const [what, file, text, want] of bad) {
  test(`rejects ${what}, naming file, line and field`, () => {
    const r = one(file, text);
    assert.equal(r.services.length, 0, `${what}: no service should load`);
    const p = r.problems.find((x) => want.message.test(x.message));
    assert.ok(p, `${what}: got ${JSON.stringify(r.problems)}`);
    assert.equal(p.file, file);
    if (want.line !== undefined) assert.equal(p.line, want.line, `${what}: line`);
    if (want.field) assert.match(p.field ?? '', want.field);
  });
}

test('duplicate ids across files name both files', () => {
  const r = parseServiceFiles([
    { file: 'a.yaml', text: 'service:\n  name: api\n' },
    { file: 'b.yaml', text: 'service:\n  name: api\n' },
  ]);
  assert.equal(r.services.length, 1);
  assert.match(r.problems[0]?.message ?? '', /duplicate service id "api" \(first defined in a\.yaml:2\)/);
  assert.equal(r.problems[0]?.file, 'b.yaml');
});

test('a directory loads json/yaml/yml alphabetically and ignores subfolders and other files', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'knit-svc-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'b.yml'), 'service: { name: b }\n');
  await writeFile(join(dir, 'a.json'), '{"service": {"name": "a"}}');
  await writeFile(join(dir, 'c.yaml'), 'service: { name: c }\n');
  await writeFile(join(dir, 'notes.txt'), 'not a service');
  await mkdir(join(dir, 'sub'));
  await writeFile(join(dir, 'sub', 'd.json'), '{"service": {"name": "d"}}');
  const r = await loadServices(dir);
  assert.deepEqual(r.services.map((s) => s.name), ['a', 'b', 'c']);
  await writeFile(join(dir, 'e.json'), '{');
  await assert.rejects(loadServicesStrict(dir), (e: unknown) => isKnitError(e, 'KNIT_ERR_CONFIG') && /e\.json:1: JSON syntax error/.test(e.message));
});

test('durations parse the Go forms Consul uses', () => {
  assert.equal(parseDuration('10s'), 10_000);
  assert.equal(parseDuration('1m30s'), 90_000);
  assert.equal(parseDuration('500ms'), 500);
  assert.equal(parseDuration('1.5h'), 5_400_000);
  assert.equal(parseDuration('10'), undefined);
  assert.equal(parseDuration('s'), undefined);
  assert.equal(parseDuration(''), undefined);
});

test('an upstream on a non-loopback address is refused with file, line and field unless the agent allows it', () => {
  const text = '{\n "service": { "name": "web", "connect": { "sidecar_service": { "proxy": {\n  "upstreams": [{ "destination_name": "api", "local_bind_port": 9191,\n   "local_bind_address": "0.0.0.0" }] } } } }\n}';
  const r = parseServiceFiles([{ file: 'web.json', text }]);
  assert.equal(r.services.length, 0);
  assert.deepEqual(r.problems.map((p) => [p.file, p.line, p.field]), [['web.json', 4, 'service.connect.sidecar_service.proxy.upstreams[0].local_bind_address']]);
  assert.match(r.problems[0]!.message, /0\.0\.0\.0 is not a loopback address: anyone who can reach it would speak as web; bind 127\.0\.0\.1, or set allow_remote_upstreams: true in agent\.yaml/);
  assert.deepEqual(parseServiceFiles([{ file: 'web.json', text }], { allowRemoteUpstreams: true }).problems, []);
  assert.deepEqual(parseServiceFiles([{ file: 'web.json', text: text.replace('0.0.0.0', '127.0.0.2') }]).problems, []);
});
