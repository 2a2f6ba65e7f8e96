import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { SignedKv } from '../registry/signed-kv.js';
import { JoinTokens, TOKEN_KIND } from './tokens.js';
import { NodeStore } from './nodes.js';
import { caHash, parseJoinToken } from '../identity/enrolment.js';
import { CertificateAuthority } from '../identity/ca.js';
import { signDocument } from '../identity/signed-doc.js';
import { isKnitError } from '../errors.js';
import { signers } from '../../test/helpers/signer.js';

async function setup(now: () => Date = () => new Date()) {
  const ca = await CertificateAuthority.create('t.knit');
  const s = await signers(ca);
  const store = await EmbeddedStore.open();
  const reg = store.client();
  const kv = new SignedKv({ registry: reg, trust: () => ({ roots: [ca.rootPem], trustDomain: 't.knit' }), signer: async () => s.server });
  const tokens = new JoinTokens(kv, () => ca.rootPem, now);
  const nodes = new NodeStore(kv, now);
  /** What enrolment does with a token: check it, record the node (using it up), forget it. */
  const redeem = async (token: string) => {
    const g = await tokens.check(token);
    await nodes.enrol(g, 'KEY', new Date(Date.now() + 3600_000));
    await tokens.forget(g.id);
    return g;
  };
  return { ca, s, reg, tokens, nodes, redeem };
}

test('a join token is bound to a node and its services, single use, expiring, and carries the CA hash', async () => {
  let now = new Date('2026-01-01T00:00:00Z');
  const { ca, tokens, nodes, redeem } = await setup(() => now);
  const t = await tokens.create('web-1', ['web', 'api-*'], 3600_000);
  assert.equal(t.expiresAt, '2026-01-01T01:00:00.000Z');
  assert.equal(parseJoinToken(t.token).caHash, caHash(ca.rootPem));
  const g = await redeem(t.token);
  assert.deepEqual([g.node, g.services], ['web-1', ['web', 'api-*']]);
  assert.deepEqual((await nodes.get('web-1'))?.services, ['web', 'api-*']);
  await assert.rejects(redeem(t.token), (e: unknown) => isKnitError(e, 'KNIT_ERR_UNAUTHORIZED') && /unknown or already used/.test(e.message));

  const late = await tokens.create('web-2', ['web'], 60_000);
  now = new Date('2026-01-01T00:02:00Z');
  await assert.rejects(redeem(late.token), /expired at 2026-01-01T00:01:00.000Z; create a new one with knit token create --node web-2 --services web/);
  await assert.rejects(redeem(late.token), /already used/, 'an expired token is gone too');

  const other = await tokens.create('web-3', ['web']);
  const forged = other.token.replace(/\.([0-9a-f]{64})\./, (_m, x: string) => `.${x.slice(0, -1)}${x.endsWith('0') ? '1' : '0'}.`);
  await assert.rejects(redeem(forged), /wrong secret/);
  await redeem(other.token);
  assert.throws(() => parseJoinToken('hello'), (e: unknown) => isKnitError(e, 'KNIT_ERR_BAD_REQUEST') && /malformed join token/.test(e.message));
  await assert.rejects(tokens.create('bad/node', ['web']), /node name/);
  await assert.rejects(tokens.create('n', []), /non-empty list/);
  await assert.rejects(tokens.create('n', ['a*b']), /only one trailing \*/);
});

test('two agents racing on one token: exactly one enrols', async () => {
  const { tokens, redeem } = await setup();
  const { token } = await tokens.create('n1', ['web']);
  const r = await Promise.allSettled([redeem(token), redeem(token), redeem(token)]);
  assert.equal(r.filter((x) => x.status === 'fulfilled').length, 1);
});

test('a token minted or widened in the registry by someone else, or replayed after use, enrols nobody', async () => {
  const { s, reg, tokens, redeem } = await setup();
  const t = await tokens.create('n1', ['web']);
  const { id, secret } = parseJoinToken(t.token);
  const stored = JSON.parse(Buffer.from((await reg.kvGet(`tokens/${id}`))!.value.split('.')[1]!, 'base64url').toString()) as { body: Record<string, unknown> };
  // Widened by a registry writer: unsigned.
  await reg.kvSet(`tokens/${id}`, JSON.stringify({ ...stored.body, services: ['*'] }));
  await assert.rejects(redeem(t.token), /stored record is not the control plane's/);
  // Signed by another CA's "server".
  await reg.kvSet(`tokens/${id}`, await signDocument(s.otherCa, 't.knit', TOKEN_KIND, 1, { ...stored.body, services: ['*'] }));
  await assert.rejects(redeem(t.token), /stored record is not the control plane's/);
  // Put back as the control plane signed it, used, then the same signed record written back: a replay.
  const signed = await signDocument(s.server, 't.knit', TOKEN_KIND, 1, stored.body);
  await reg.kvSet(`tokens/${id}`, signed);
  await redeem(t.token);
  await reg.kvSet(`tokens/${id}`, signed);
  await assert.rejects(redeem(t.token), /already used/);
  assert.ok(secret);
});
