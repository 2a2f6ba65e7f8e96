/**
 * scripts/install.sh lays out a VM install in one command: compiled code,
 * binary, config that knit itself accepts, a 0600 join token, state dir,
 * unit. Run staged under a temp root (KNIT_INSTALL_ROOT), so no user or
 * systemctl.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, readlink, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ROOT } from './helpers/knit.js';
import { loadAgentConfig, loadServerConfig } from '../src/config/node-config.js';

/**
 * Runs the installed knit (its bin/knit.mjs: the /usr/local/bin/knit link
 * points outside the staged root) with test/helpers/record-imports.mjs,
 * and returns its output and every module file it loaded.
 */
async function runInstalled(lib: string, args: string[]): Promise<{ code: number; out: string; loaded: string[] }> {
  const file = join(lib, '..', 'imports.txt');
  const r = await new Promise<{ code: number; out: string }>((resolve) => {
    execFile(process.execPath, ['--import', pathToFileURL(join(ROOT, 'test/helpers/record-imports.mjs')).href, join(lib, 'bin/knit.mjs'), ...args], { cwd: lib, env: { ...process.env, KNIT_RECORD_IMPORTS: file }, timeout: 60_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? Number(err.code ?? 1) : 0, out: stdout + stderr }),
    );
  });
  const loaded = (await readFile(file, 'utf8')).split('\n').filter((u) => u.startsWith('file:'));
  await rm(file);
  return { ...r, loaded };
}

function install(root: string, args: string[]): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile('bash', [join(ROOT, 'scripts/install.sh'), ...args], { env: { ...process.env, KNIT_INSTALL_ROOT: root }, timeout: 300_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? Number(err.code ?? 1) : 0, out: stdout + stderr }),
    );
  });
}

test('install.sh agent lays out a host in one command, with config knit accepts', async () => {
  const root = await mkdtemp(join(tmpdir(), 'knit-install-'));
  try {
    const token = `knit.${'a'.repeat(16)}.${'b'.repeat(64)}.${'c'.repeat(64)}`;
    const r = await install(root, ['agent', '--server', 'https://cp.example:7700', '--registry', 'zk://10.0.0.5:2181/knit', '--token', token, '--node', 'vm-1']);
    assert.equal(r.code, 0, r.out);
    const cfg = await loadAgentConfig(join(root, 'etc/knit/agent.yaml'));
    assert.equal(cfg.node, 'vm-1');
    assert.equal(cfg.server, 'https://cp.example:7700');
    assert.deepEqual(cfg.registry, { kind: 'zookeeper', servers: '10.0.0.5:2181', root: '/knit', sessionTimeoutMs: 10_000 });
    assert.equal((await readFile(join(root, 'etc/knit/join.token'), 'utf8')).trim(), token);
    assert.equal((await stat(join(root, 'etc/knit/join.token'))).mode & 0o777, 0o600);
    assert.equal((await stat(join(root, 'var/lib/knit'))).mode & 0o777, 0o700);
    assert.ok((await stat(join(root, 'etc/knit/services.d'))).isDirectory());
    assert.equal(await readlink(join(root, 'usr/local/bin/knit')), '/usr/local/lib/knit/bin/knit.mjs');
    const lib = join(root, 'usr/local/lib/knit');
    assert.ok((await stat(join(lib, 'node_modules/commander'))).isDirectory(), 'production dependencies installed');
    await assert.rejects(stat(join(lib, 'node_modules/typescript')), 'no dev dependencies');
    await assert.rejects(stat(join(lib, 'node_modules/tsx')), 'no TypeScript loader');
    await assert.rejects(stat(join(lib, 'src')), 'no sources: the compiled code only');

    // The installed knit runs from dist/: every module of knit it loads is compiled JavaScript there.
    const v = await runInstalled(lib, ['validate', join(root, 'etc/knit/agent.yaml')]);
    assert.equal(v.code, 0, v.out);
    const own = v.loaded.filter((u) => !u.includes('/node_modules/'));
    assert.ok(own.some((u) => u.endsWith('/dist/cli/validate.js')), own.join('\n'));
    assert.deepEqual(own.filter((u) => !u.startsWith(pathToFileURL(join(lib, 'dist')).href + '/') && !u.endsWith('/record-imports.mjs')), [pathToFileURL(join(lib, 'bin/knit.mjs')).href]);
    assert.match(await readFile(join(root, 'etc/systemd/system/knit-agent.service'), 'utf8'), /ExecStart=\/usr\/local\/bin\/knit agent --config \/etc\/knit\/agent\.yaml/);

    // Running it again keeps the config an operator may have edited.
    const again = await install(root, ['agent', '--server', 'https://other:7700', '--registry', 'zk://10.0.0.9:2181/knit']);
    assert.equal(again.code, 0, again.out);
    assert.equal((await loadAgentConfig(join(root, 'etc/knit/agent.yaml'))).server, 'https://cp.example:7700');
  } finally {
    await rm(root, { recursive: true, force: true });
  }
});

test('install.sh server and its refusals', async () => {
  const root = await mkdtemp(join(tmpdir(), 'knit-install-'));
  try {
    const r = await install(root, ['server', '--registry', 'zk://10.0.0.5:2181/knit', '--advertise', 'cp.example.com']);
    assert.equal(r.code, 0, r.out);
    const cfg = await loadServerConfig(join(root, 'etc/knit/server.yaml'));
    assert.equal(cfg.defaultIntention, 'deny');
    assert.deepEqual(cfg.advertise, ['cp.example.com']);
    const bad = await install(root, ['agent', '--registry', 'zk://x:1/knit']);
    assert.equal(bad.code, 1);
    assert.match(bad.out, /an agent needs --server/);
    assert.equal((await install(root, ['agent', '--server', 'http://cp:7700', '--registry', 'zk://x:1/k'])).code, 1);
  } finally {
    await rm(root, { recursive: true, force: true });
  }
});
