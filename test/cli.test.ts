/**
 * The `knit` binary as users meet it: help, one-line failures, validation
 * of the shipped examples, and refusals that name what is wrong.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { knit, freePort, ROOT } from './helpers/knit.js';

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
