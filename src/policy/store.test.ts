import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { SignedKv } from '../registry/signed-kv.js';
import { IntentionStore, encodeIntentions, INTENTIONS_KIND, type AppliedIntentions } from './store.js';
import { upsert } from './intentions.js';
import { KV_KEYS, type Registry } from '../registry/registry.js';
import { CertificateAuthority } from '../identity/ca.js';
import { signDocument } from '../identity/signed-doc.js';
import { Recorder } from '../../test/helpers/wait.js';
import { signers } from '../../test/helpers/signer.js';

async function setup() {
  const ca = await CertificateAuthority.create('store.knit');
  const s = await signers(ca);
  const store = await EmbeddedStore.open();
  const trust = () => ({ roots: [ca.rootPem], trustDomain: 'store.knit' });
  const writer = (r: Registry) => new IntentionStore(new SignedKv({ registry: r, trust, signer: async () => s.server }));
  const reader = (r: Registry) => new IntentionStore(new SignedKv({ registry: r, trust }));
  return { s, store, writer, reader };
}

test('seed writes only once; update is a compare-and-set that survives concurrent writers', async () => {
  const { store, writer } = await setup();
  const a = writer(store.client());
  const b = writer(store.client());
  assert.equal((await a.seed({ defaultAction: 'allow', intentions: [] })).defaultAction, 'allow');
  assert.equal((await b.seed({ defaultAction: 'deny', intentions: [] })).defaultAction, 'allow', 'second seed keeps the first');
  await Promise.all(['s1', 's2', 's3', 's4', 's5'].map((s, i) => (i % 2 ? a : b).update((cur) => upsert(cur, { source: s, destination: 'api', action: 'allow' }))));
  assert.equal((await a.read()).set?.intentions.length, 5, 'no lost update');
});

test('a document that is not valid intentions, though signed, is refused and the last good set stays in force', async () => {
  const { s, store, writer, reader } = await setup();
  const reg = store.client();
  await writer(reg).seed({ defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'allow' }] });
  const sets = new Recorder<AppliedIntentions | undefined>();
  const refused = new Recorder<string>();
  reader(store.client()).watch(sets.push, (e) => refused.push(e.message), () => undefined);
  await sets.next('first set', (e) => e?.evaluator.evaluate('web', 'api').allow === true);
  await reg.kvSet(KV_KEYS.intentions, await signDocument(s.server, 'store.knit', INTENTIONS_KIND, 5, { default: 'maybe' }));
  await refused.next('bad default refused', (m) => /need "default"/.test(m));
  const dup = encodeIntentions({ defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'allow' }, { source: 'web', destination: 'api', action: 'deny' }] });
  await reg.kvSet(KV_KEYS.intentions, await signDocument(s.server, 'store.knit', INTENTIONS_KIND, 6, dup));
  await refused.next('duplicate refused', (m) => /duplicate intention/.test(m));
  // The forgery the review found: an open default written straight into the registry.
  await reg.kvSet(KV_KEYS.intentions, '{"default":"allow","intentions":[]}');
  await refused.next('unsigned refused', (m) => /not a signed document/.test(m));
  assert.equal(sets.values.length, 1, 'no bad set was delivered');
});
