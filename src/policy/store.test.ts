import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { IntentionStore, encodeIntentions } from './store.js';
import { upsert, type Evaluator } from './intentions.js';
import { KV_KEYS } from '../registry/registry.js';
import { Recorder } from '../../test/helpers/wait.js';

test('seed writes only once; update is a compare-and-set that survives concurrent writers', async () => {
  const store = await EmbeddedStore.open();
  const a = new IntentionStore(store.client());
  const b = new IntentionStore(store.client());
  assert.equal((await a.seed({ defaultAction: 'allow', intentions: [] })).defaultAction, 'allow');
  assert.equal((await b.seed({ defaultAction: 'deny', intentions: [] })).defaultAction, 'allow', 'second seed keeps the first');
  await Promise.all(['s1', 's2', 's3', 's4', 's5'].map((s, i) => (i % 2 ? a : b).update((cur) => upsert(cur, { source: s, destination: 'api', action: 'allow' }))));
  assert.equal((await a.read()).set?.intentions.length, 5, 'no lost update');
});

test('a corrupt stored document is reported and the last good set stays in force', async () => {
  const store = await EmbeddedStore.open();
  const reg = store.client();
  const s = new IntentionStore(reg);
  await s.seed({ defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'allow' }] });
  const sets = new Recorder<Evaluator | undefined>();
  const errors = new Recorder<string>();
  s.watch(sets.push, (e) => errors.push(e.message));
  await sets.next('first set', (e) => e?.evaluate('web', 'api').allow === true);
  await reg.kvSet(KV_KEYS.intentions, '{"default":"maybe"}');
  await errors.next('error reported', (m) => /need "default"/.test(m));
  await reg.kvSet(KV_KEYS.intentions, encodeIntentions({ defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'allow' }, { source: 'web', destination: 'api', action: 'deny' }] }));
  await errors.next('duplicate refused', (m) => /duplicate intention/.test(m));
  assert.equal(sets.values.length, 1, 'no bad set was delivered');
});
