/**
 * Each command loads what it needs and no more (src/cli/main.ts imports
 * every command's implementation inside its action): `knit agent` never
 * loads the control plane, `knit dev`'s composition or the validator, and
 * `knit --help` loads no command at all. Every module loaded is memory a
 * long-running agent keeps and start-up time for every short command.
 *
 * Checked on the real binary, bin/knit.mjs, which runs dist/ when it is
 * current (as under `npm test`, which builds first) and src/ through tsx
 * otherwise; module names are compared without that prefix and extension,
 * so the test holds for both. test/helpers/record-imports.mjs, a loader
 * hook, writes down every module the process loads.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { KNIT, ROOT } from './helpers/knit.js';

const RECORDER = join(ROOT, 'test', 'helpers', 'record-imports.mjs');

/** Runs `knit ARGS` and returns knit's own modules it loaded (`app/agent`, `server/routes`, ...) and where from. */
async function loadedBy(args: string[]): Promise<{ modules: Set<string>; from: Set<string>; code: number; out: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'knit-imports-'));
  try {
    const file = join(dir, 'imports.txt');
    const r = await new Promise<{ code: number; out: string }>((resolve) => {
      execFile(process.execPath, ['--import', pathToFileURL(RECORDER).href, KNIT, ...args], { cwd: ROOT, env: { ...process.env, KNIT_RECORD_IMPORTS: file }, timeout: 60_000 }, (err, stdout, stderr) =>
        resolve({ code: err ? Number(err.code ?? 1) : 0, out: stdout + stderr }),
      );
    });
    const root = pathToFileURL(ROOT).href;
    const modules = new Set<string>();
    const from = new Set<string>();
    for (const url of (await readFile(file, 'utf8')).split('\n')) {
      const m = new RegExp(`^${root}/(src|dist)/(.+)\\.(ts|js)$`).exec(url);
      if (!m) continue;
      from.add(m[1]!);
      modules.add(m[2]!);
    }
    return { modules, from, ...r };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The modules of `loaded` under one of `prefixes` (`server/`, `app/dev`, ...). */
const among = (loaded: Set<string>, prefixes: string[]): string[] => [...loaded].filter((m) => prefixes.some((p) => m === p || m.startsWith(p)));

test('knit agent loads the agent, and none of the control plane, knit dev or the validator', async (t) => {
  const r = await loadedBy(['agent', '--config', join(tmpdir(), 'knit-no-such-agent.yaml')]);
  t.diagnostic(`ran from ${[...r.from].join('+')}: ${r.modules.size} modules of knit`);
  assert.equal(r.code, 1, r.out);
  assert.match(r.out, /knit-no-such-agent\.yaml/);
  for (const m of ['app/agent', 'agent/agent', 'config/node-config', 'log/logger', 'log/metrics']) assert.ok(r.modules.has(m), `${m} loaded`);
  assert.deepEqual(among(r.modules, ['server/', 'app/server', 'app/dev', 'cli/validate', 'config/intentions-file']), []);
});

test('knit server loads the control plane and not the agent', async () => {
  const r = await loadedBy(['server', '--config', join(tmpdir(), 'knit-no-such-server.yaml')]);
  assert.equal(r.code, 1, r.out);
  assert.ok(r.modules.has('app/server'));
  assert.deepEqual(among(r.modules, ['app/agent', 'app/dev', 'agent/agent', 'cli/validate']), []);
});

test('knit validate loads the validator and none of the long-running commands', async () => {
  const r = await loadedBy(['validate', join(ROOT, 'examples/hello/services')]);
  assert.equal(r.code, 0, r.out);
  assert.ok(r.modules.has('cli/validate'));
  assert.deepEqual(among(r.modules, ['app/', 'server/', 'proxy/', 'agent/agent', 'log/logger', 'log/metrics']), []);
});

test('knit --help loads no command', async (t) => {
  const r = await loadedBy(['--help']);
  t.diagnostic(`ran from ${[...r.from].join('+')}: ${[...r.modules].sort().join(' ')}`);
  assert.equal(r.code, 0, r.out);
  assert.deepEqual(among(r.modules, ['app/', 'server/', 'proxy/', 'registry/', 'agent/agent', 'cli/validate', 'config/node-config', 'config/services', 'log/']), []);
});
