/**
 * The `knit` binary as users meet it: help, one-line failures, validation
 * of the shipped examples, and refusals that name what is wrong.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { knit, freePort, start, KNIT, ROOT } from './helpers/knit.js';
import { until } from './helpers/wait.js';
import { listenFailure } from '../src/cli/failures.js';
import { KnitError } from '../src/errors.js';
import { formatPretty } from '../src/log/logger.js';

test('knit --help lists the commands of product.md', async () => {
  const r = await knit(['--help']);
  assert.equal(r.code, 0);
  for (const c of ['dev', 'server', 'agent', 'validate', 'services', 'intention', 'token', 'node', 'ca', 'check']) assert.match(r.stdout, new RegExp(`^  ${c}\\b`, 'm'), c);
  const i = await knit(['intention', '--help']);
  for (const c of ['allow', 'deny', 'delete', 'list', 'apply', 'check']) assert.match(i.stdout, new RegExp(`^  ${c}\\b`, 'm'), c);
});

test('the shipped examples validate', async () => {
  const s = await knit(['validate', join(ROOT, 'examples/hello/services')]);
  assert.equal(s.code, 0, s.stderr);
  assert.match(s.stdout, /ok: 2 file\(s\), 2 service\(s\)/);
  const i = await knit(['validate', join(ROOT, 'examples/hello/intentions.yaml'), '--json']);
  assert.equal(i.code, 0, i.stderr);
  assert.deepEqual((JSON.parse(i.stdout) as { intentionFiles: string[] }).intentionFiles, [join(ROOT, 'examples/hello/intentions.yaml')]);
});

test('failures exit non-zero with one line that says what to do', async () => {
  const port = await freePort();
  const down = await knit(['intention', 'list', '--admin', `http://127.0.0.1:${port}`]);
  assert.equal(down.code, 1);
  assert.equal(down.stderr.trim().split('\n').length, 1);
  assert.match(down.stderr, /^knit: cannot reach http:\/\/127\.0\.0\.1:\d+ .*is knit dev or knit agent running\?/);

  const exposed = await knit(['dev', '--admin-addr', '0.0.0.0:7701', '--config-dir', join(ROOT, 'examples/hello/services')]);
  assert.equal(exposed.code, 1);
  assert.match(exposed.stderr, /^knit: --admin-addr 0\.0\.0\.0:7701: the admin API listens on loopback only$/m);

  const noToken = await knit(['token', 'create', '--node', 'n1', '--services', 'web', '--server', `https://127.0.0.1:${port}`, '--token-file', '/nonexistent/operator.token']);
  assert.equal(noToken.code, 1);
  assert.match(noToken.stderr, /^knit: cannot read the operator token \/nonexistent\/operator\.token \(ENOENT\); pass --token-file or KNIT_TOKEN_FILE$/m);

  const missing = await knit(['validate', '/nonexistent/dir']);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /\/nonexistent\/dir: ENOENT/);
});

test('a bad intentions file applies nothing and names file, line and field', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'knit-cli-'));
  try {
    const file = join(dir, 'i.yaml');
    await writeFile(file, 'default: deny\nintentions:\n  - { source: web, destination: api, action: permit }\n');
    const r = await knit(['intention', 'apply', '-f', file, '--admin', `http://127.0.0.1:${await freePort()}`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`${file.replace(/[.]/g, '\\.')}:3: intentions\\[0\\]\\.action: must be "allow" or "deny"`));
    assert.match(r.stderr, /knit: nothing applied: 1 problem\(s\) in/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

/** A temp dir removed after the test. */
async function tempDir(t: { after(fn: () => Promise<void>): void }, prefix = 'knit-cli-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A stand-in admin API on loopback answering from `routes` (path -> JSON); records what was asked. */
async function fakeAdmin(t: { after(fn: () => Promise<void>): void }, routes: Record<string, () => unknown>): Promise<{ port: number; hits: string[] }> {
  const hits: string[] = [];
  const server = http.createServer((req, res) => {
    hits.push(req.url ?? '');
    const path = (req.url ?? '').split('?')[0]!;
    const route = routes[path];
    res.setHeader('content-type', 'application/json');
    if (!route) {
      res.statusCode = 404;
      return res.end(JSON.stringify({ error: `no such endpoint ${path}` }));
    }
    res.end(JSON.stringify(route()));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(async () => {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  });
  return { port: (server.address() as net.AddressInfo).port, hits };
}

test('regression: knit validate on a directory with no service files said "ok, 0 services"; it says so and exits non-zero', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'notes.txt'), 'not a service');
  const r = await knit(['validate', dir]);
  assert.equal(r.code, 1);
  assert.equal(r.stdout, '');
  assert.match(r.stderr, new RegExp(`^${dir}: no service, intention or config files here \\(\\*\\.json, \\*\\.yaml, \\*\\.yml directly in the directory\\): nothing to validate$`, 'm'));
  const json = await knit(['validate', dir, '--json']);
  assert.equal(json.code, 1);
  assert.equal((JSON.parse(json.stdout) as { problems: unknown[] }).problems.length, 1);
});

test('knit validate reports every problem of a file at once, and agent/server configs too, with file, line and field', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'web.yaml'), 'service:\n  name: web\n  port: "8080"\n  check:\n    http: "not a url"\n    interval: 5 seconds\n  connect:\n    sidecar_service:\n      proxy:\n        transparent_proxy: {}\n');
  await writeFile(join(dir, 'agent.yaml'), 'registry: zk://127.0.0.1:2181/knit\nserver: https://cp:7700\nadmin: 127.0.0.1:70000\n');
  await writeFile(join(dir, 'server.yaml'), 'registry: "embedded:"\nlisten: 0.0.0.0:65536\n');
  const r = await knit(['validate', dir]);
  assert.equal(r.code, 1);
  const lines = r.stderr.trim().split('\n');
  assert.deepEqual(lines.filter((l) => !l.startsWith('warning:')), [
    `${dir}/agent.yaml:3: admin: port 70000 in "127.0.0.1:70000" is out of range (0 to 65535)`,
    `${dir}/server.yaml:2: listen: port 65536 in "0.0.0.0:65536" is out of range (0 to 65535)`,
    `${dir}/web.yaml:3: service.port: must be integer, not the string "8080"`,
    `${dir}/web.yaml:5: service.check.http: "not a url" is not an http(s) URL`,
    `${dir}/web.yaml:6: service.check.interval: "5 seconds" is not a duration (use e.g. "10s", "500ms", "1m")`,
    '5 problem(s) in 3 file(s)',
  ]);
  assert.ok(lines.some((l) => l.startsWith(`warning: ${dir}/web.yaml:10: service.connect.sidecar_service.proxy.transparent_proxy: accepted for Consul compatibility and ignored by knit`)), r.stderr);
});

test('regression: --json, --admin and the other global options only worked after the subcommand (before and after now)', async (t) => {
  const list = [{ name: 'api', routable: 1, instances: [{ id: 'n/api', address: '127.0.0.1', port: 21000, health: 'passing' }] }];
  const admin = await fakeAdmin(t, { '/v1/services': () => list });
  for (const args of [['--json', 'services', '--admin', `127.0.0.1:${admin.port}`], ['services', '--json', '--admin', `127.0.0.1:${admin.port}`], ['--admin', `http://127.0.0.1:${admin.port}`, '--json', 'services']]) {
    const r = await knit(args);
    assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
    assert.deepEqual(JSON.parse(r.stdout), list, args.join(' '));
  }
  const v = await knit(['--json', 'validate', join(ROOT, 'examples/hello/services')]);
  assert.equal(v.code, 0, v.stderr);
  assert.equal((JSON.parse(v.stdout) as { services: string[] }).services.length, 2);
});

test('regression: KNIT_ADMIN_ADDR=127.0.0.1:7701 (no scheme) was not understood', async (t) => {
  const admin = await fakeAdmin(t, { '/v1/services': () => [] });
  const r = await knit(['services'], { KNIT_ADMIN_ADDR: `127.0.0.1:${admin.port}`, KNIT_SERVER: '' });
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), 'no services registered');
  // An explicit --admin reaches the local agent even when KNIT_SERVER points at the control plane.
  const s = await knit(['services', '--admin', `127.0.0.1:${admin.port}`], { KNIT_SERVER: 'https://127.0.0.1:1' });
  assert.equal(s.code, 0, s.stderr);
  const bad = await knit(['services'], { KNIT_ADMIN_ADDR: 'http://[bad', KNIT_SERVER: '' });
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /^knit: KNIT_ADMIN_ADDR http:\/\/\[bad: not an address \(expected host:port or http:\/\/host:port\)$/m);
});

test('regression: knit intention check exited 0 on deny; it exits 0 allowed, 1 denied, 2 on error (as consul intention check)', async (t) => {
  let allow = true;
  const admin = await fakeAdmin(t, { '/v1/intentions/check': () => ({ allow, rule: allow ? 'intention web -> api (allow)' : 'default (deny)', reason: allow ? 'intention' : 'default' }) });
  const env = { KNIT_ADMIN_ADDR: `127.0.0.1:${admin.port}`, KNIT_SERVER: '' };
  const ok = await knit(['intention', 'check', 'web', 'api'], env);
  assert.deepEqual([ok.code, ok.stdout.trim()], [0, 'allowed: web -> api by intention web -> api (allow)']);
  allow = false;
  const denied = await knit(['intention', 'check', 'web', 'api'], env);
  assert.deepEqual([denied.code, denied.stdout.trim()], [1, 'denied: web -> api by default (deny)']);
  const deniedJson = await knit(['intention', 'check', '--json', 'web', 'api'], env);
  assert.equal(deniedJson.code, 1);
  assert.equal((JSON.parse(deniedJson.stdout) as { allow: boolean }).allow, false);
  const down = await knit(['intention', 'check', 'web', 'api'], { ...env, KNIT_ADMIN_ADDR: `127.0.0.1:${await freePort()}` });
  assert.equal(down.code, 2);
  assert.match(down.stderr, /^knit: cannot reach/m);
  const usage = await knit(['intention', 'check', 'web'], env);
  assert.equal(usage.code, 2);
  assert.match(usage.stderr, /missing required argument 'dst'/);
  const help = await knit(['intention', 'check', '--help'], env);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /exits 0 when\s+allowed, 1 when denied, 2 on error/);
});

test('regression: knit services --watch --json printed indented JSON; it prints one compact document per line', async (t) => {
  let n = 0;
  const admin = await fakeAdmin(t, { '/v1/services': () => [{ name: 'api', routable: n, instances: [], seen: n++ }] });
  const p = start([KNIT, 'services', '--watch', '--json', '--admin', `127.0.0.1:${admin.port}`]);
  t.after(() => p.kill());
  await until('three documents', () => p.stdout().split('\n').filter(Boolean).length >= 3, 20_000, 50);
  const lines = p.stdout().split('\n').filter(Boolean);
  lines.forEach((l, i) => assert.equal((JSON.parse(l) as Array<{ seen: number }>)[0]!.seen, i, l));
});

test('regression: knit dev without --config-dir did not say where it looked (missing: which default and how to point elsewhere; empty: says so and runs)', async (t) => {
  const dir = await tempDir(t);
  const env = { HOME: dir };
  if (!existsSync('/etc/knit/services.d')) {
    const missing = await knit(['dev', '--data-dir', join(dir, 'data'), '--admin-addr', `127.0.0.1:${await freePort()}`], env);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /^knit: no service files: \/etc\/knit\/services\.d \(the default --config-dir\) does not exist; pass --config-dir DIR to point knit dev at your service files \(e\.g\. --config-dir examples\/hello\/services\), or create it$/m);
  } else t.diagnostic('/etc/knit/services.d exists here: the missing-default case is not tried');
  const gone = await knit(['dev', '--config-dir', join(dir, 'nope'), '--data-dir', join(dir, 'data')], env);
  assert.equal(gone.code, 1);
  assert.match(gone.stderr, new RegExp(`^knit: no service files: ${join(dir, 'nope')} does not exist`, 'm'));

  const empty = join(dir, 'empty');
  await mkdir(empty);
  const p = start([KNIT, 'dev', '--config-dir', empty, '--data-dir', join(dir, 'data'), '--admin-addr', `127.0.0.1:${await freePort()}`, '--hbone-port', '0'], env);
  t.after(() => p.kill());
  await p.waitFor(/knit dev ready/, 60_000);
  assert.match(p.stderr(), new RegExp(`^knit dev: no service files \\(\\*\\.json, \\*\\.yaml, \\*\\.yml\\) in ${empty}; starting with none\\. Add files there and send SIGHUP`, 'm'));
  assert.equal(await p.stop(), 0);
});

test('regression: a port already in use was a stack trace; it is one line naming the port and what wanted it (and the log lines before the exit are kept)', async (t) => {
  const dir = await tempDir(t);
  const holder = net.createServer().listen(0, '127.0.0.1');
  await once(holder, 'listening');
  t.after(() => new Promise<void>((r) => holder.close(() => r())));
  const port = (holder.address() as net.AddressInfo).port;
  const r = await knit(['dev', '--config-dir', join(ROOT, 'examples/hello/services'), '--data-dir', join(dir, 'data'), '--admin-addr', `127.0.0.1:${port}`, '--hbone-port', '0']);
  assert.equal(r.code, 1);
  const last = r.stderr.trim().split('\n').at(-1);
  assert.equal(last, `knit: port ${port} on 127.0.0.1 is already in use: knit dev's admin API wanted it; is another knit dev running? --admin-addr 127.0.0.1:PORT uses another port`);
  assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  // Logging is asynchronous: the lines written just before process.exit are still there.
  assert.match(r.stderr, /"event":"ca\.created"/);

  const app = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
    execFile(process.execPath, [join(ROOT, 'examples/hello/api.mjs')], { env: { ...process.env, API_PORT: String(port) }, timeout: 20_000 }, (err, _out, stderr) => resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stderr }));
  });
  assert.equal(app.code, 1);
  assert.equal(app.stderr.trim(), `api: port ${port} on 127.0.0.1 is already in use (another npm run hello?); stop what holds it or set API_PORT`);
});

test('listen failures name the port and what wanted it', () => {
  const inUse = (message: string, port: number): KnitError => new KnitError('KNIT_ERR_LISTEN', message, { cause: Object.assign(new Error('listen EADDRINUSE'), { code: 'EADDRINUSE', port, address: '127.0.0.1' }) });
  assert.equal(listenFailure(inUse('upstream api of web cannot listen on 127.0.0.1:9191: listen EADDRINUSE: address already in use 127.0.0.1:9191', 9191)), 'port 9191 on 127.0.0.1 is already in use: upstream api of web wanted it; change its local_bind_port, or stop what holds the port (ss -ltnp shows who)');
  assert.equal(listenFailure(inUse('cannot listen on 127.0.0.1:7701: listen EADDRINUSE', 7701), new Map([[7701, { what: "knit agent's admin API", hint: 'change admin: in agent.yaml' }]])), "port 7701 on 127.0.0.1 is already in use: knit agent's admin API wanted it; change admin: in agent.yaml");
  // Wrapped by whoever started the listener: still found.
  assert.match(listenFailure(new Error('service api failed to start', { cause: inUse('inbound proxy for api cannot listen on 127.0.0.1:21000: x', 21000) })) ?? '', /^port 21000 on 127\.0\.0\.1 is already in use: inbound proxy for api wanted it/);
  assert.equal(listenFailure(new KnitError('KNIT_ERR_CONFIG', 'x')), undefined);
});

test('log format: JSON lines when stderr is not a terminal, pretty with --log-format pretty or KNIT_LOG_FORMAT, and the event kept', async (t) => {
  const dir = await tempDir(t);
  const holder = net.createServer().listen(0, '127.0.0.1');
  await once(holder, 'listening');
  t.after(() => new Promise<void>((r) => holder.close(() => r())));
  const port = (holder.address() as net.AddressInfo).port;
  let runs = 0;
  // A fresh data dir each time, so that every run logs ca.created before it fails on the port.
  const dev = (extra: string[], env: NodeJS.ProcessEnv = {}) => knit(['dev', '--config-dir', join(ROOT, 'examples/hello/services'), '--data-dir', join(dir, `data-${runs++}`), '--admin-addr', `127.0.0.1:${port}`, ...extra], env);
  const json = await dev([]);
  const line = json.stderr.split('\n').find((l) => l.includes('ca.created'));
  assert.ok(line, json.stderr);
  assert.ok((JSON.parse(line) as { event?: string }).event);
  for (const [extra, env] of [[['--log-format', 'pretty'], {}], [[], { KNIT_LOG_FORMAT: 'pretty' }], [['--log-format', 'pretty'], { KNIT_LOG_FORMAT: 'json' }]] as Array<[string[], NodeJS.ProcessEnv]>) {
    const pretty = await dev(extra, env);
    assert.match(pretty.stderr, /^\d\d:\d\d:\d\d\.\d{3} INFO {3}ca\.created {2}created CA for trust domain \S+ {2}trustDomain=/m, `${extra.join(' ')} ${JSON.stringify(env)}: ${pretty.stderr}`);
    assert.doesNotMatch(pretty.stderr, /^\{"level"/m);
  }
  const forced = await dev(['--log-format', 'json'], { KNIT_LOG_FORMAT: 'pretty' });
  assert.match(forced.stderr, /^\{"level":30,.*"event":"ca\.created"/m);
  const bad = await dev([], { KNIT_LOG_FORMAT: 'xml' });
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /^knit: KNIT_LOG_FORMAT=xml: expected json, pretty, auto$/m);
  const badFlag = await knit(['dev', '--log-format', 'xml']);
  assert.equal(badFlag.code, 1);
  assert.match(badFlag.stderr, /option '--log-format <format>' argument 'xml' is invalid/);
});

test('the pretty format: time, level, event, message, fields, and an error stack on indented lines', () => {
  const line = JSON.stringify({ level: 40, time: '2026-01-02T03:04:05.006Z', event: 'waiting', waitingFor: 'ZooKeeper at zk1:2181', attempt: 2, err: { type: 'Error', message: 'boom', stack: 'Error: boom\n    at f (x.ts:1:1)' }, msg: 'waiting for ZooKeeper at zk1:2181: boom' });
  const out = formatPretty(line);
  assert.match(out, /^\d\d:\d\d:\d\d\.\d{3} WARN {3}waiting {2}waiting for ZooKeeper at zk1:2181: boom {2}waitingFor="ZooKeeper at zk1:2181" attempt=2 err=boom\n {4}at f \(x\.ts:1:1\)\n$/);
  assert.equal(formatPretty('not json'), 'not json\n');
  assert.ok(formatPretty(line, true).includes('\u001b[33mWARN'));
});

test('regression: knit dev lost its last log lines on SIGTERM (asynchronous logging is flushed before exit)', async (t) => {
  const dir = await tempDir(t);
  await mkdir(join(dir, 'conf'));
  await writeFile(join(dir, 'conf', 'solo.yaml'), 'service:\n  name: solo\n');
  const p = start([KNIT, 'dev', '--config-dir', join(dir, 'conf'), '--data-dir', join(dir, 'data'), '--admin-addr', `127.0.0.1:${await freePort()}`, '--hbone-port', '0']);
  t.after(() => p.kill());
  await p.waitFor(/knit dev ready/, 60_000);
  assert.equal(await p.stop(), 0);
  assert.match(p.stderr(), /"event":"service\.deregistered".*"msg":"service solo deregistered"/);
});

test('regression: knit server that cannot reach its registry was silent; it says what it waits for and where, every few seconds', async (t) => {
  const dir = await tempDir(t);
  const zkPort = await freePort();
  await writeFile(join(dir, 'server.yaml'), `registry: zk://127.0.0.1:${zkPort}/knit\nlisten: 127.0.0.1:0\ndata_dir: ${join(dir, 'data')}\n`);
  const p = start([KNIT, 'server', '--config', join(dir, 'server.yaml'), '--log-format', 'pretty']);
  t.after(() => p.kill());
  const t0 = Date.now();
  await p.waitFor(new RegExp(`WARN {3}waiting {2}waiting for ZooKeeper at 127\\.0\\.0\\.1:${zkPort}: `), 8000);
  assert.ok(Date.now() - t0 < 8000);
  // One line per wait, human-readable: no JSON, no stack.
  const waiting = p.stderr().split('\n').filter((l) => l.includes('waiting for ZooKeeper'));
  assert.ok(waiting.every((l) => /^\d\d:\d\d:\d\d\.\d{3} WARN/.test(l)), p.stderr());
});
