import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { lstat, mkdir, mkdtemp, readFile, readdir, readlink, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WRITE_STEPS, agentDir, loadStored, readAgentIdentity, readRegistryAuth, readStored, writeAgentIdentity, writeRegistryAuth, writeStored, type StoredResult } from './identity-store.js';
import { agentId } from '../identity/spiffe.js';
import { createCsr } from '../identity/ca.js';
import type { ServiceTls } from '../identity/tls.js';
import { makePki, type TestPki } from '../../test/helpers/pki.js';
import { ROOT } from '../../test/helpers/knit.js';
import { until } from '../../test/helpers/wait.js';

async function tempDir(t: { after(fn: () => Promise<void>): void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'knit-identity-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** What knit before the one-unit layout wrote: three files side by side. */
async function writeThreeFiles(dir: string, m: ServiceTls): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'key.pem'), m.keyPem, { mode: 0o600 });
  await writeFile(join(dir, 'cert.pem'), m.certChainPem);
  await writeFile(join(dir, 'roots.pem'), m.trustBundlePem.join('\n'));
}

const reason = (r: StoredResult): string => (r.found ? 'found' : r.reason);
const same = (a: ServiceTls | undefined, b: ServiceTls): boolean =>
  !!a && a.keyPem === b.keyPem && a.certChainPem === b.certChainPem && JSON.stringify(a.trustBundlePem) === JSON.stringify(b.trustBundlePem);

async function agentLeaf(pki: TestPki, node: string, opts: { now?: Date; ttlMs?: number } = {}): Promise<ServiceTls> {
  const id = agentId(pki.trustDomain, node);
  const { keyPem, csrPem } = await createCsr(id);
  const signed = await pki.ca.signCsr(csrPem, id, opts);
  return { certChainPem: signed.certPem, keyPem, trustBundlePem: [pki.ca.rootPem] };
}

/**
 * Runs test/helpers/identity-writer.ts writing `material` to `dir`, SIGKILLs it right after step
 * `pauseAt` (1-based; 0: lets it finish) and resolves with the steps it reported.
 */
async function writeInChild(dir: string, material: ServiceTls, pauseAt: number): Promise<{ steps: string[]; done: boolean }> {
  const file = join(dir, '..', `${dir.split('/').pop()}.material.json`);
  await writeFile(file, JSON.stringify(material));
  const p = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'test/helpers/identity-writer.ts'), dir, file, String(pauseAt)], { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  p.stdout.on('data', (d: Buffer) => (out += d.toString()));
  const exited = once(p, 'exit');
  if (pauseAt > 0) {
    await until(`the writer paused after step ${pauseAt}`, () => new RegExp(`^step ${pauseAt} `, 'm').test(out) || p.exitCode !== null, 30_000);
    p.kill('SIGKILL');
  }
  await exited;
  await rm(file, { force: true });
  return { steps: [...out.matchAll(/^step \d+ (\S+)$/gm)].map((m) => m[1]!), done: /^done$/m.test(out) };
}

test('regression: a writer SIGKILLed after any step of writing an identity leaves the old one or the new one, whole', async (t) => {
  const pki = await makePki();
  const [old, next] = [await pki.leaf('web'), await pki.leaf('web')];
  const committed = WRITE_STEPS.indexOf('committed') + 1;
  for (const [layout, prepare] of [
    ['over the older three-file layout (an upgrade)', (dir: string) => writeThreeFiles(dir, old)],
    ['over a unit', (dir: string) => writeStored(dir, old)],
  ] as const) {
    const base = await tempDir(t);
    // Every k at once, each in its own directory; k = 0 lets the writer finish.
    const results = await Promise.all(
      Array.from({ length: WRITE_STEPS.length + 1 }, async (_, k) => {
        const dir = join(base, `k${k}`);
        await prepare(dir);
        const run = await writeInChild(dir, next, k);
        return { k, run, got: await loadStored(dir) };
      }),
    );
    for (const { k, run, got } of results) {
      const at = k === 0 ? 'a finished write' : `a kill after step ${k} (${WRITE_STEPS[k - 1]})`;
      assert.equal(run.done, k === 0, `${layout}, ${at}: the writer ${k === 0 ? 'finished' : 'was stopped there'}`);
      if (k > 0) assert.equal(run.steps.length, k, `${layout}, ${at}: steps reported`);
      assert.ok(got.found, `${layout}, ${at}: no identity to read (${got.found ? '' : `${got.reason}: ${got.detail}`})`);
      const newOne = k === 0 || k >= committed;
      assert.ok(same(got.tls, newOne ? next : old), `${layout}, ${at}: expected the whole ${newOne ? 'new' : 'old'} identity`);
    }
    assert.deepEqual(results[0]!.run.steps, [...WRITE_STEPS], 'the writer goes through every step it names');
    // And a later write over whatever a killed writer left behind works.
    for (const { k } of results) {
      const dir = join(base, `k${k}`);
      const third = await pki.leaf('web');
      await writeStored(dir, third);
      assert.ok(same((await readStored(dir))?.tls, third), `a write after a kill at step ${k}`);
    }
  }
});

test('identity store: the older three-file layout is read, then converted in place on the next write', async (t) => {
  const pki = await makePki();
  const dir = join(await tempDir(t), 'web');
  const old = await pki.leaf('web');
  await writeThreeFiles(dir, old);
  const got = await loadStored(dir);
  assert.ok(got.found && got.layout === 'files' && same(got.tls, old));
  const next = await pki.leaf('web');
  await writeStored(dir, next);
  const after = await loadStored(dir);
  assert.ok(after.found && after.layout === 'unit' && same(after.tls, next));
  // The three names now follow the current unit, so what reads them (people, tools, older tests) sees the new identity.
  for (const f of ['key.pem', 'cert.pem', 'roots.pem']) assert.equal(await readlink(join(dir, f)), join('current', f));
  assert.equal(await readFile(join(dir, 'key.pem'), 'utf8'), next.keyPem);
  assert.equal((await stat(join(dir, 'key.pem'))).mode & 0o777, 0o600);
  assert.equal((await stat(join(dir, 'current'))).mode & 0o777, 0o700);
  // One unit is kept, the one in use.
  const units = (await readdir(dir)).filter((n) => n.startsWith('.identity-'));
  assert.deepEqual(units, [await readlink(join(dir, 'current'))]);
});

test('identity store: a torn or mismatched identity is absent with its reason, never an exception', async (t) => {
  const pki = await makePki();
  const base = await tempDir(t);
  const [a, b] = [await pki.leaf('web'), await pki.leaf('web')];

  assert.equal(reason(await loadStored(join(base, 'nothing'))), 'absent');

  // Key of one identity, certificate of another, in the unit and in the older layout.
  await writeStored(join(base, 'mixed-unit'), { ...a, keyPem: b.keyPem });
  assert.equal(reason(await loadStored(join(base, 'mixed-unit'))), 'mismatch');
  assert.equal(await readStored(join(base, 'mixed-unit')), undefined);
  await writeThreeFiles(join(base, 'mixed-files'), { ...a, keyPem: b.keyPem });
  assert.equal(reason(await loadStored(join(base, 'mixed-files'))), 'mismatch');

  // The older layout with a file missing.
  await writeThreeFiles(join(base, 'torn-files'), a);
  await rm(join(base, 'torn-files', 'roots.pem'));
  assert.equal(reason(await loadStored(join(base, 'torn-files'))), 'torn');

  // A unit with a part gone (a disk that lost it), a dangling `current`.
  await writeStored(join(base, 'torn-unit'), a);
  await rm(join(base, 'torn-unit', 'current', 'cert.pem'));
  assert.equal(reason(await loadStored(join(base, 'torn-unit'))), 'torn');
  await writeStored(join(base, 'dangling'), a);
  await rm(join(base, 'dangling', await readlink(join(base, 'dangling', 'current'))), { recursive: true });
  assert.equal(reason(await loadStored(join(base, 'dangling'))), 'torn');

  // Garbage, and an empty trust bundle.
  await writeStored(join(base, 'garbage'), { ...a, keyPem: 'not a key' });
  assert.equal(reason(await loadStored(join(base, 'garbage'))), 'unusable');
  await writeStored(join(base, 'no-roots'), { ...a, trustBundlePem: [] });
  assert.equal(reason(await loadStored(join(base, 'no-roots'))), 'unusable');

  // Expired: absent unless asked for.
  const expired = await pki.leaf('web', { now: new Date(Date.now() - 3600_000), ttlMs: 60_000 });
  await writeStored(join(base, 'expired'), expired);
  assert.equal(reason(await loadStored(join(base, 'expired'))), 'expired');
  assert.ok((await loadStored(join(base, 'expired'), new Date(), true)).found);
});

test('identity store: the agent identity is this node\'s, valid or expired, and its directory keeps the registry credential', async (t) => {
  const pki = await makePki();
  const data = await tempDir(t);
  await writeAgentIdentity(data, await agentLeaf(pki, 'n1'));
  const got = await readAgentIdentity(data, 'n1');
  assert.equal(got?.trustDomain, pki.trustDomain);
  assert.equal(got?.expired, false);
  assert.equal(await readAgentIdentity(data, 'n2'), undefined, 'another node\'s identity is not ours');
  await writeAgentIdentity(data, await agentLeaf(pki, 'n1', { now: new Date(Date.now() - 3600_000), ttlMs: 60_000 }));
  assert.equal((await readAgentIdentity(data, 'n1'))?.expired, true);
  // The unit lives beside registry.auth in the agent directory and never touches it.
  await writeRegistryAuth(data, 'knit-agent:secret');
  await writeAgentIdentity(data, await agentLeaf(pki, 'n1'));
  assert.equal(await readRegistryAuth(data), 'knit-agent:secret');
  assert.equal((await lstat(join(agentDir(data), 'registry.auth'))).mode & 0o777, 0o600);
});
