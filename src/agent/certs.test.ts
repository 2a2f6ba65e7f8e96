import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LeafManager, renewalDelay, retryDelay, type CertSigner } from './certs.js';
import { CertificateAuthority, createCsr } from '../identity/ca.js';
import { serviceId } from '../identity/spiffe.js';
import { certInfo } from '../identity/x509.js';
import { silentLogger } from '../log/logger.js';
import { isKnitError } from '../errors.js';

test('renewal falls between 60% and 90% of the leaf life', () => {
  const nb = new Date(0);
  const na = new Date(100_000);
  assert.equal(renewalDelay(nb, na, nb, 0), 60_000);
  assert.equal(renewalDelay(nb, na, nb, 0.5), 75_000);
  assert.ok(Math.abs(renewalDelay(nb, na, nb, 0.999999) - 90_000) < 1);
  for (let i = 0; i < 1000; i++) {
    const d = renewalDelay(nb, na, new Date(10_000), Math.random());
    assert.ok(d >= 50_000 && d <= 80_000);
  }
  assert.equal(renewalDelay(nb, na, new Date(95_000), 0.5), 0, 'overdue renews at once');
});

test('retry backoff doubles from 1s, caps at a minute and at a tenth of the time left', () => {
  assert.equal(retryDelay(0, 3600_000), 1000);
  assert.equal(retryDelay(3, 3600_000), 8000);
  assert.equal(retryDelay(20, 3600_000), 60_000);
  assert.equal(retryDelay(20, 100_000), 10_000);
  assert.equal(retryDelay(20, 0), 1000);
});

test('a leaf manager issues with an agent-made key, refuses a wrong leaf, and renews to new material', async () => {
  const ca = await CertificateAuthority.create('t.knit');
  const id = serviceId('t.knit', 'web');
  const signer: CertSigner = {
    signService: async (_svc, csr) => ca.signCsr(csr, id),
    trustBundle: async () => [ca.rootPem],
  };
  const renewed: string[] = [];
  const m = new LeafManager({ id, service: 'web', sign: (csr) => signer.signService('web', csr), trustBundle: () => signer.trustBundle(), log: silentLogger(), onRenewed: (t) => renewed.push(t.certChainPem) });
  const first = await m.start();
  assert.deepEqual(certInfo(first.certChainPem).uris, [id.uri]);
  assert.deepEqual(first.trustBundlePem, [ca.rootPem]);
  const second = await m.issue();
  assert.notEqual(second.keyPem, first.keyPem, 'a new key per leaf');
  m.stop();

  // A control plane that returns a leaf for another identity is refused.
  const wrong: CertSigner = { signService: async () => ca.signCsr((await createCsr(serviceId('t.knit', 'db'))).csrPem, serviceId('t.knit', 'db')), trustBundle: async () => [ca.rootPem] };
  const bad = new LeafManager({ id, service: 'web', sign: (csr) => wrong.signService('web', csr), trustBundle: () => wrong.trustBundle(), log: silentLogger(), onRenewed: () => undefined });
  await assert.rejects(bad.start(), (e: unknown) => isKnitError(e, 'KNIT_ERR_CERT') && /names spiffe:\/\/t\.knit\/ns\/default\/svc\/db/.test(e.message));
});
