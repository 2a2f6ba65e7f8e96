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

test('regression: a type error hid the other problems of the file (port "8080", a bad check URL and a bad interval are all reported)', () => {
  const text = 'service:\n  name: web\n  port: "8080"\n  check:\n    http: "not a url"\n    interval: 5 seconds\n';
  const r = one('web.yaml', text);
  assert.equal(r.services.length, 0);
  assert.deepEqual(r.problems.map((p) => [p.line, p.field]), [
    [3, 'service.port'],
    [6, 'service.check.interval'],
    [5, 'service.check.http'],
  ]);
  assert.match(r.problems[0]!.message, /must be integer, not the string "8080"/);
});

test('a problem in one service of a services list leaves the others loaded', () => {
  const r = one('two.yaml', 'services:\n  - name: a\n    port: "1"\n  - name: b\n    port: 2\n');
  assert.deepEqual(r.services.map((s) => s.name), ['b']);
  assert.deepEqual(r.problems.map((p) => p.field), ['services[0].port']);
});

const refusedAtStart: Array<[string, string, number, RegExp, RegExp]> = [
  ['tcp check on port 0', '    tcp: "127.0.0.1:0"\n    interval: 1s\n', 4, /check\.tcp$/, /port 0 in "127\.0\.0\.1:0" is out of range \(1 to 65535\)/],
  ['tcp check on port 65536', '    tcp: "127.0.0.1:65536"\n    interval: 1s\n', 4, /check\.tcp$/, /port 65536 .* out of range/],
  ['tcp check without a port', '    tcp: "127.0.0.1"\n    interval: 1s\n', 4, /check\.tcp$/, /is not host:port/],
  ['tcp check on a host with a space', '    tcp: "my host:80"\n    interval: 1s\n', 4, /check\.tcp$/, /is not host:port|neither an IP address nor a host name/],
  ['http check on port 0', '    http: "http://127.0.0.1:0/health"\n    interval: 1s\n', 4, /check\.http$/, /port 0 .* out of range/],
  ['http check on port 70000', '    http: "http://127.0.0.1:70000/health"\n    interval: 1s\n', 4, /check\.http$/, /not an http\(s\) URL/],
  ['an HTTP method with a space', '    http: "http://127.0.0.1:1/"\n    interval: 1s\n    method: "GE T"\n', 6, /check\.method$/, /not an HTTP method/],
  ['a header name with a colon', '    http: "http://127.0.0.1:1/"\n    interval: 1s\n    header: { "a:b": ["1"] }\n', 6, /check\.header\.a:b$/, /not an HTTP header name/],
  ['a header value with a line break', '    http: "http://127.0.0.1:1/"\n    interval: 1s\n    header: { x: ["a\\r\\nb"] }\n', 6, /check\.header\.x$/, /line breaks/],
];
for (const [what, check, line, field, message] of refusedAtStart) {
  test(`refuses ${what} (it would fail at start), with line and field`, () => {
    const r = one('a.yaml', `service:\n  name: a\n  check:\n${check}`);
    assert.equal(r.services.length, 0, JSON.stringify(r.problems));
    const p = r.problems.find((x) => message.test(x.message));
    assert.ok(p, JSON.stringify(r.problems));
    assert.equal(p.line, line);
    assert.match(p.field ?? '', field);
  });
}

test('addresses that cannot be used are refused: bind address, service address, local service address', () => {
  const r = one('a.yaml', [
    'service:',
    '  name: a',
    '  address: "not an address"',
    '  connect:',
    '    sidecar_service:',
    '      proxy:',
    '        local_service_address: "bad host"',
    '        upstreams:',
    '          - destination_name: b',
    '            local_bind_port: 9000',
    '            local_bind_address: "my-host"',
    '',
  ].join('\n'));
  assert.deepEqual(r.problems.map((p) => [p.line, p.field]), [
    [3, 'service.address'],
    [7, 'service.connect.sidecar_service.proxy.local_service_address'],
    [11, 'service.connect.sidecar_service.proxy.upstreams[0].local_bind_address'],
  ]);
  assert.match(r.problems[2]!.message, /not an IP address to bind/);
});

test('deregister_critical_service_after: the smallest over the checks, >= 1s honoured, shorter raised to 1s with a warning, "0" off', () => {
  const svc = (checks: string[]): ReturnType<typeof one> => one('a.yaml', `service:\n  name: a\n  checks:\n${checks.map((c) => `    - ttl: 30s\n      deregister_critical_service_after: ${c}\n`).join('')}`);
  const r = svc(['90s', '1m', '2m']);
  assert.deepEqual(r.problems, []);
  assert.equal(r.services[0]?.deregisterCriticalAfterMs, 60_000);
  assert.equal(r.services[0]?.checks[2]?.deregisterCriticalAfterMs, 120_000);
  const short = svc(['1s']);
  assert.equal(short.services[0]?.deregisterCriticalAfterMs, 1000);
  assert.deepEqual(short.warnings, []);
  const tooShort = svc(['100ms']);
  assert.equal(tooShort.services[0]?.deregisterCriticalAfterMs, 1000);
  assert.match(tooShort.warnings[0]?.message ?? '', /below knit's minimum; raised to 1s \(Consul's minimum is 1m\)/);
  assert.equal(svc(['"0"']).services[0]?.deregisterCriticalAfterMs, undefined);
  assert.equal(one('a.yaml', 'service:\n  name: a\n').services[0]?.deregisterCriticalAfterMs, undefined);
  const bad = svc(['soon']);
  assert.equal(bad.services.length, 0);
  assert.match(bad.problems[0]?.message ?? '', /"soon" is not a duration/);
  assert.equal(bad.problems[0]?.line, 5);
});

/** Every field knit accepts but does not act on, where it sits, and a value for it. */
const ignored: Array<[string, string]> = [
  ...['enable_tag_override: true', 'weights: { passing: 1 }', 'token: x', 'tagged_addresses: {}', 'locality: {}', 'namespace: ns', 'partition: p', 'socket_path: /run/a.sock'].map((f) => ['service', f] as [string, string]),
  ...['notes: x', 'status_output: x', 'output_max_size: 1', 'success_before_passing: 1', 'failures_before_warning: 1', 'failures_before_critical: 1', 'body: x', 'disable_redirects: true', 'tls_server_name: x', 'grpc_use_tls: false', 'h2ping_use_tls: false'].map((f) => ['check', f] as [string, string]),
  ...['checks: []', 'check: {}', 'tags: [x]', 'meta: {}'].map((f) => ['sidecar', f] as [string, string]),
  ...['config: {}', 'transparent_proxy: {}', 'expose: {}', 'mesh_gateway: {}'].map((f) => ['proxy', f] as [string, string]),
  ...['datacenter: dc2', 'config: {}', 'mesh_gateway: {}', 'destination_partition: p', 'destination_peer: p', 'destination_namespace: billing'].map((f) => ['upstream', f] as [string, string]),
];
for (const [where, field] of ignored) {
  const key = field.split(':')[0]!;
  test(`regression: ${where} field ${key} was accepted silently (it loads with a warning naming it)`, () => {
    const lines = {
      service: [`  ${field}`],
      check: ['  check:', '    ttl: 10s', `    ${field}`],
      sidecar: ['  connect:', '    sidecar_service:', `      ${field}`],
      proxy: ['  connect:', '    sidecar_service:', '      proxy:', `        ${field}`],
      upstream: ['  connect:', '    sidecar_service:', '      proxy:', '        upstreams:', '          - destination_name: b', '            local_bind_port: 9000', `            ${field}`],
    }[where]!;
    const r = one('a.yaml', ['service:', '  name: a', ...lines, ''].join('\n'));
    assert.deepEqual(r.problems, []);
    assert.equal(r.services.length, 1);
    assert.equal(r.warnings.length, 1, JSON.stringify(r.warnings));
    const w = r.warnings[0]!;
    assert.equal(w.line, lines.length + 2);
    assert.ok(w.field?.endsWith(`.${key}`), w.field);
    assert.match(w.message, /ignored by knit \(.+\)/);
  });
}

test('fields knit implements load without warnings: destination_type "service", destination_namespace "default", mode direct, native false', () => {
  const r = one('a.yaml', [
    'service:', '  name: a', '  kind: typical', '  connect:', '    native: false', '    sidecar_service:', '      proxy:', '        mode: direct', '        upstreams:',
    '          - destination_name: b', '            local_bind_port: 9000', '            destination_type: service', '            destination_namespace: default', '',
  ].join('\n'));
  assert.deepEqual([r.problems, r.warnings], [[], []]);
  assert.equal(r.services[0]?.mode, 'direct');
});

test('what knit cannot run is refused: a connect-proxy registration, connect-native, a prepared-query upstream', () => {
  const kind = one('a.yaml', 'service:\n  name: a-sidecar-proxy\n  kind: connect-proxy\n');
  assert.match(kind.problems[0]?.message ?? '', /"connect-proxy" registration is not something knit runs/);
  assert.equal(kind.problems[0]?.line, 3);
  const native = one('a.yaml', 'service:\n  name: a\n  connect:\n    native: true\n');
  assert.match(native.problems[0]?.message ?? '', /connect-native applications are not supported/);
  const pq = one('a.yaml', 'service:\n  name: a\n  connect:\n    sidecar_service:\n      proxy:\n        upstreams:\n          - destination_name: b\n            local_bind_port: 9000\n            destination_type: prepared_query\n');
  assert.match(pq.problems[0]?.message ?? '', /must be "service"/);
  assert.equal(pq.problems[0]?.line, 9);
});

test('check and checks both run, check first, as Consul does', () => {
  const r = one('a.yaml', 'service:\n  name: a\n  check:\n    ttl: 10s\n  checks:\n    - ttl: 20s\n');
  assert.deepEqual(r.services[0]?.checks.map((c) => [c.id, c.ttlMs]), [['service:a:1', 10_000], ['service:a:2', 20_000]]);
});

const syntax: Array<[string, string, string, number, RegExp]> = [
  ['a trailing comma', 'a.json', '{\n  "service": {\n    "name": "a",\n  }\n}\n', 4, /^JSON syntax error at column 3: Expected double-quoted property name$/],
  ['a missing comma', 'a.json', '{ "service": {\n  "name": "a"\n  "port": 1 } }', 3, /^JSON syntax error at column 3: Expected ',' or '}' after property value$/],
  ['a truncated file', 'a.json', '{ "service": {\n  "name": "a"\n', 2, /^JSON syntax error at column 14: unexpected end of file/],
];
for (const [what, file, text, line, message] of syntax) {
  test(`JSON syntax errors carry line and column: ${what}`, () => {
    const r = one(file, text);
    assert.equal(r.problems.length, 1, JSON.stringify(r.problems));
    assert.equal(r.problems[0]!.line, line);
    assert.match(r.problems[0]!.message, message);
  });
}

const misindented: Array<[string, string, number]> = [
  ['a key indented deeper than its siblings', 'service:\n  name: web\n   port: 8080\n  tags: [a]\n', 3],
  ['a key deeper than its siblings inside a list item', 'service:\n  name: web\n  checks:\n    - http: http://127.0.0.1:1/\n       interval: 5s\n', 5],
  ['a key shallower than its siblings inside a list item', 'service:\n  name: web\n  checks:\n    - http: http://127.0.0.1:8080/health\n      interval: 5s\n     timeout: 1s\n', 6],
  ['a list item key out of line', 'service:\n  name: web\n  connect:\n    sidecar_service:\n      proxy:\n        upstreams:\n          - destination_name: api\n          local_bind_port: 9191\n', 8],
  ['a top-level key indented by one', 'service:\n  name: web\n port: 8080\n', 3],
  ['a tab as indentation', 'service:\n\tname: web\n', 2],
];
for (const [what, text, line] of misindented) {
  test(`regression: YAML indentation errors pointed at the wrong line (${what}: line ${line})`, async (t) => {
    // A real file on disk, read the way the agent reads it.
    const dir = await mkdtemp(join(tmpdir(), 'knit-yaml-'));
    t.after(() => rm(dir, { recursive: true, force: true }));
    await writeFile(join(dir, 'web.yaml'), text);
    const r = await loadServices(dir);
    assert.equal(r.services.length, 0);
    assert.ok(r.problems.length >= 1, JSON.stringify(r.problems));
    assert.equal(r.problems[0]!.line, line, JSON.stringify(r.problems));
    assert.match(r.problems[0]!.message, /^YAML syntax error at column \d+: /);
  });
}
