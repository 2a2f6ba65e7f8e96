import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EmbeddedStore } from './embedded/embedded.js';
import { SignedKv } from './signed-kv.js';
import { CertificateAuthority } from '../identity/ca.js';
import { signDocument, verifyDocument } from '../identity/signed-doc.js';
import { serverId } from '../identity/spiffe.js';
import { isKnitError, type KnitError } from '../errors.js';
import { Recorder } from '../../test/helpers/wait.js';
import { signers, signerFor } from '../../test/helpers/signer.js';

const TD = 'sig.knit';

test('a document verifies only when the control plane of this trust domain signed it for this key', async () => {
  const ca = await CertificateAuthority.create(TD);
  const s = await signers(ca);
  const trust = { roots: [ca.rootPem], trustDomain: TD };
  const good = await signDocument(s.server, TD, 'intentions', 3, { x: 1 });
  const v = await verifyDocument<{ x: number }>(good, 'intentions', trust);
  assert.deepEqual([v.body, v.seq, v.signer], [{ x: 1 }, 3, `spiffe://${TD}/server/cp1`]);

  const refused = async (jws: string, kind: string, re: RegExp, t = trust) =>
    assert.rejects(verifyDocument(jws, kind, t), (e: unknown) => isKnitError(e, 'KNIT_ERR_SIGNATURE') && re.test(e.message), String(re));
  await refused('{"default":"allow","intentions":[]}', 'intentions', /not a signed document/);
  await refused(await signDocument(s.otherCa, TD, 'intentions', 1, {}), 'intentions', /does not chain to this agent's trust bundle/);
  await refused(await signDocument(s.agent, TD, 'intentions', 1, {}), 'intentions', /not a control-plane identity/);
  await refused(good, 'nodes', /is a signed "intentions", not "nodes"/);
  await refused(good, 'intentions', /not of trust domain other\.knit/, { roots: [ca.rootPem], trustDomain: 'other.knit' });
  // A payload swapped under a valid header and signature.
  const [h, , sig] = good.split('.');
  const forged = `${h}.${Buffer.from(JSON.stringify({ kind: 'intentions', td: TD, seq: 9, iat: Date.now(), body: { x: 2 } })).toString('base64url')}.${sig}`;
  await refused(forged, 'intentions', /signature does not verify/);
  // Signed in the future, and by a signer that had expired when it signed.
  await refused(await signDocument(s.server, TD, 'intentions', 1, {}, new Date(Date.now() + 3600_000)), 'intentions', /signed in the future/);
  const old = await signerFor(ca, serverId(TD, 'cp1'), { now: new Date(Date.now() - 7200_000), ttlMs: 600_000 });
  await refused(await signDocument(old, TD, 'intentions', 1, {}), 'intentions', /was not valid when the document was signed/);
});

test('a watcher applies signed documents, refuses forged and rolled-back ones, and keeps the last good one', async () => {
  const ca = await CertificateAuthority.create(TD);
  const s = await signers(ca);
  const store = await EmbeddedStore.open();
  const reg = store.client();
  const trust = () => ({ roots: [ca.rootPem], trustDomain: TD });
  const writer = new SignedKv({ registry: reg, trust, signer: async () => s.server });
  const reader = new SignedKv({ registry: store.client(), trust });
  const docs = new Recorder<unknown>();
  const refused = new Recorder<string>();
  reader.watch('k', 'thing', (d) => docs.push(d?.body), (e: KnitError) => refused.push(e.message), () => undefined);

  await writer.update('k', 'thing', () => ({ v: 1 }));
  await docs.next('v1', (b) => (b as { v?: number } | undefined)?.v === 1);
  const v1 = (await reg.kvGet('k'))!.value;
  await writer.update('k', 'thing', () => ({ v: 2 }));
  await docs.next('v2', (b) => (b as { v?: number } | undefined)?.v === 2);

  // Someone with registry write access: unsigned, signed by another CA, then the old v1 again.
  await reg.kvSet('k', JSON.stringify({ v: 3 }));
  await refused.next('unsigned refused', (m) => /not a signed document/.test(m));
  await reg.kvSet('k', await signDocument(s.otherCa, TD, 'thing', 99, { v: 4 }));
  await refused.next('other CA refused', (m) => /does not chain/.test(m));
  await reg.kvSet('k', v1);
  await refused.next('rollback refused', (m) => /older than the seq \d+ in force \(a rollback\)/.test(m));
  assert.deepEqual(docs.values.map((b) => (b as { v: number } | undefined)?.v), [undefined, 1, 2], 'nothing but the control plane\'s documents applied');

  // The writer refuses to build on a value it cannot verify: an operator must see the tampering.
  await reg.kvSet('k', JSON.stringify({ v: 3 }));
  await assert.rejects(writer.update('k', 'thing', () => ({ v: 5 })), (e: unknown) => isKnitError(e, 'KNIT_ERR_SIGNATURE'));
  const readOnly = new SignedKv({ registry: reg, trust });
  await assert.rejects(readOnly.create('x', 'thing', {}), (e: unknown) => isKnitError(e, 'KNIT_ERR_UNAUTHORIZED') && /only the control plane writes/.test(e.message));
});
