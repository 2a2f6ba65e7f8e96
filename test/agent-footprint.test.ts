/**
 * "A process that costs little": an idle `knit agent` should stay close to
 * a bare Node process. The libraries that cost most to load are kept out of
 * the agent's import graph (src/app/agent.ts and all it imports): undici
 * (~20 MB; the agent speaks node:https), jose (~9 MB; signed documents use
 * node:crypto), and @peculiar/x509 with reflect-metadata, tsyringe and its
 * ASN.1 packages (~20 MB; the agent reads certificates and makes CSRs with
 * node:crypto and identity/der.ts), and @opentelemetry/api (~6.5 MB, which
 * prom-client's index pulls in for exemplars: log/prom.ts loads only the
 * parts knit uses). The control plane and the CLI may load them.
 *
 * The agent module is loaded in a child process, through tsx (so the test
 * holds for the sources as they are, built or not), with
 * test/helpers/record-imports.mjs writing down every ES module loaded; the
 * child also lists require()'s cache, which holds the CommonJS modules the
 * hooks do not see (on Node 20, a require() inside a CommonJS package, as
 * @peculiar/x509's of tsyringe, does not pass through them).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { ROOT } from './helpers/knit.js';

const RECORDER = pathToFileURL(join(ROOT, 'test', 'helpers', 'record-imports.mjs')).href;

/** Packages the agent must not load, by name or scope. */
const FORBIDDEN = [/^undici$/, /^jose$/, /^@peculiar\//, /^reflect-metadata$/, /^tsyringe$/, /^asn1js$/, /^pvtsutils$/, /^@opentelemetry\//];

/** The package a module path belongs to: `undici`, `@peculiar/x509`, ...; undefined outside node_modules. */
function packageOf(pathOrUrl: string): string | undefined {
  const path = pathOrUrl.startsWith('file:') ? fileURLToPath(pathOrUrl) : pathOrUrl;
  const m = /node_modules\/((?:@[^/]+\/)?[^/]+)\/(?!.*node_modules\/)/.exec(path);
  return m?.[1];
}

/** Imports `module` (a path under ROOT) in a child process; returns knit's own modules and the packages it loaded. */
async function loadedBy(module: string): Promise<{ packages: Set<string>; own: Set<string>; cjs: number }> {
  const dir = await mkdtemp(join(tmpdir(), 'knit-footprint-'));
  try {
    const file = join(dir, 'imports.txt');
    const code = [
      `await import(${JSON.stringify(pathToFileURL(join(ROOT, module)).href)});`,
      `const { createRequire } = await import('node:module');`,
      `process.stdout.write(JSON.stringify(Object.keys(createRequire(import.meta.url).cache)));`,
    ].join('\n');
    const stdout = await new Promise<string>((resolve, reject) => {
      execFile(process.execPath, ['--import', RECORDER, '--import', 'tsx', '--input-type=module', '-e', code], { cwd: ROOT, env: { ...process.env, KNIT_RECORD_IMPORTS: file }, timeout: 60_000 }, (err, out, errOut) =>
        err ? reject(new Error(`loading ${module} failed: ${errOut || err.message}`)) : resolve(out),
      );
    });
    const cjs = JSON.parse(stdout) as string[];
    const esm = (await readFile(file, 'utf8')).split('\n').filter(Boolean);
    const packages = new Set<string>();
    for (const p of [...esm, ...cjs]) {
      const name = packageOf(p);
      if (name) packages.add(name);
    }
    const root = pathToFileURL(ROOT).href;
    const own = new Set(esm.filter((u) => u.startsWith(`${root}/src/`)).map((u) => u.slice(root.length + 5).replace(/\.ts$/, '')));
    return { packages, own, cjs: cjs.filter((p) => p.includes('/node_modules/')).length };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const forbidden = (packages: Set<string>): string[] => [...packages].filter((p) => FORBIDDEN.some((re) => re.test(p))).sort();

test('the agent loads none of undici, jose, @peculiar/x509, reflect-metadata, tsyringe, @opentelemetry/api', async (t) => {
  const r = await loadedBy('src/app/agent.ts');
  const loader = new Set(['tsx', 'esbuild', 'get-tsconfig', 'resolve-pkg-maps']);
  t.diagnostic(`packages loaded by src/app/agent.ts: ${[...r.packages].filter((p) => !loader.has(p)).sort().join(' ')}`);
  // The probe works: it sees the agent's own modules, including those that read certificates, and its other packages.
  for (const m of ['app/agent', 'agent/control-client', 'agent/health', 'identity/x509', 'identity/der', 'identity/csr', 'identity/signed-doc']) assert.ok(r.own.has(m), `${m} loaded`);
  assert.ok(r.packages.has('pino'), 'packages imported as ES modules are seen');
  assert.ok(r.cjs > 0, 'CommonJS modules are seen through require.cache');
  assert.deepEqual(forbidden(r.packages), []);
  assert.ok(!r.own.has('identity/ca'), 'the CA (signing, @peculiar/x509) is the control plane\'s');
});

test('the same probe sees them where they belong: the control plane\'s CA', async () => {
  const r = await loadedBy('src/identity/ca.ts');
  const seen = forbidden(r.packages);
  for (const p of ['@peculiar/x509', 'reflect-metadata', 'tsyringe']) assert.ok(seen.includes(p), `${p} seen (${seen.join(' ')})`);
});
