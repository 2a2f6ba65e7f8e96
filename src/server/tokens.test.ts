import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { JoinTokens, caHash, parseJoinToken } from './tokens.js';
import { CertificateAuthority } from '../identity/ca.js';
import { isKnitError } from '../errors.js';

test('a join token is single use, expires, and carries the CA hash', async () => {
  const ca = await CertificateAuthority.create('t.knit');
  let now = new Date('2026-01-01T00:00:00Z');
  const tokens = new JoinTokens((await EmbeddedStore.open()).client(), () => ca.rootPem, () => now);
  const { token, expiresAt } = await tokens.create(3600_000);
  assert.equal(expiresAt, '2026-01-01T01:00:00.000Z');
  assert.equal(parseJoinToken(token).caHash, caHash(ca.rootPem));
  await tokens.redeem(token);
  await assert.rejects(tokens.redeem(token), (e: unknown) => isKnitError(e, 'KNIT_ERR_UNAUTHORIZED') && /unknown or already used/.test(e.message));

  const late = await tokens.create(60_000);
  now = new Date('2026-01-01T00:02:00Z');
  await assert.rejects(tokens.redeem(late.token), /expired at 2026-01-01T00:01:00.000Z/);
  await assert.rejects(tokens.redeem(late.token), /already used/, 'an expired token is gone too');

  const t = await tokens.create();
  const forged = t.token.replace(/\.([0-9a-f]{64})\./, (_m, s: string) => `.${s.slice(0, -1)}${s.endsWith('0') ? '1' : '0'}.`);
  await assert.rejects(tokens.redeem(forged), /wrong secret/);
  await tokens.redeem(t.token);
  assert.throws(() => parseJoinToken('hello'), (e: unknown) => isKnitError(e, 'KNIT_ERR_BAD_REQUEST') && /malformed join token/.test(e.message));
});

test('two agents racing on one token: exactly one enrols', async () => {
  const ca = await CertificateAuthority.create('t.knit');
  const store = await EmbeddedStore.open();
  const a = new JoinTokens(store.client(), () => ca.rootPem);
  const b = new JoinTokens(store.client(), () => ca.rootPem);
  const { token } = await a.create();
  const r = await Promise.allSettled([a.redeem(token), b.redeem(token), a.redeem(token)]);
  assert.equal(r.filter((x) => x.status === 'fulfilled').length, 1);
});
