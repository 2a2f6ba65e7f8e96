import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, readFile, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedStore } from './embedded.js';
import { registryContract } from '../contract-suite.js';
import { isKnitError } from '../../errors.js';

registryContract('embedded', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'knit-embedded-'));
  let store = await EmbeddedStore.open(dir);
  return {
    client: async () => store.client(),
    reopen: async () => {
      store = await EmbeddedStore.open(dir);
    },
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
});

test('embedded: acknowledged KV writes are on disk, 0600, and a corrupt file is named', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'knit-embedded-'));
  const r = (await EmbeddedStore.open(dir)).client();
  await r.kvSet('intentions', '{"x":1}');
  const file = join(dir, 'registry', 'kv.json');
  assert.equal(JSON.parse(await readFile(file, 'utf8')).intentions.value, '{"x":1}');
  assert.equal((await stat(file)).mode & 0o777, 0o600);
  await writeFile(file, '{ torn');
  await assert.rejects(EmbeddedStore.open(dir), (e: unknown) => isKnitError(e, 'KNIT_ERR_REGISTRY_UNAVAILABLE') && e.message.includes(file));
  await rm(dir, { recursive: true });
});
