import { test } from 'node:test';
import assert from 'node:assert/strict';
import { webcrypto, X509Certificate as NodeX509 } from 'node:crypto';
import { CertificateAuthority, createCsr, validateLeaf, DEFAULT_LEAF_TTL_MS, x509, generateKeyPair, SIGN_ALG } from './ca.js';
import { serviceId, trustDomainId } from './spiffe.js';
import { certInfo, EKU } from './x509.js';
import { isKnitError } from '../errors.js';

const TD = 'test.knit';
const web = serviceId(TD, 'web');

test('a new root is a CA with the trust-domain ID and a 10-year life', async () => {
  const now = new Date('2026-01-01T00:00:00Z');
  const ca = await CertificateAuthority.create(TD, now);
  const r = certInfo(ca.rootPem);
  assert.equal(r.isCa, true);
  assert.deepEqual(r.uris, [trustDomainId(TD).uri]);
  assert.equal(r.keyUsage?.keyCertSign, true);
  const years = (r.notAfter.getTime() - now.getTime()) / (365 * 24 * 3600e3);
  assert.ok(years > 9.99 && years < 10.01, `years ${years}`);
  assert.ok(new NodeX509(ca.rootPem).checkIssued(new NodeX509(ca.rootPem)));
});

test('a signed leaf is an X.509-SVID: one URI SAN, cA=false, critical digitalSignature, both EKUs, 24h', async () => {
  const ca = await CertificateAuthority.create(TD);
  const { csrPem, keyPem } = await createCsr(web);
  const now = new Date();
  const leaf = await ca.signCsr(csrPem, web, { now });
  const info = validateLeaf(leaf.certPem, web);
  assert.deepEqual(info.uris, [web.uri]);
  assert.equal(info.isCa, false);
  assert.deepEqual(info.keyUsage, { digitalSignature: true, keyCertSign: false, cRLSign: false, critical: true });
  assert.deepEqual(info.eku.sort(), [EKU.serverAuth, EKU.clientAuth].sort());
  // X.509 times have whole seconds.
  assert.ok(Math.abs(info.notAfter.getTime() - now.getTime() - DEFAULT_LEAF_TTL_MS) < 1000);
  // Node verifies the chain and that the key matches.
  const n = new NodeX509(leaf.certPem);
  assert.ok(n.verify(new NodeX509(ca.rootPem).publicKey));
  assert.ok(n.checkPrivateKey((await import('node:crypto')).createPrivateKey(keyPem)));
  assert.match(keyPem, /BEGIN PRIVATE KEY/);
});

test('a leaf never outlives its root', async () => {
  const now = new Date();
  const ca = await CertificateAuthority.create(TD, now, 3600_000);
  const { csrPem } = await createCsr(web);
  const leaf = await ca.signCsr(csrPem, web, { ttlMs: 48 * 3600_000, now });
  assert.ok(leaf.notAfter.getTime() <= certInfo(ca.rootPem).notAfter.getTime());
});

test('the CA refuses CSRs for another identity, with extra SANs, bad signatures, RSA keys or garbage', async () => {
  const ca = await CertificateAuthority.create(TD);
  const refuses = async (csr: string, why: RegExp, id = web): Promise<void> => {
    await assert.rejects(ca.signCsr(csr, id), (e: unknown) => isKnitError(e, 'KNIT_ERR_CA') && why.test(e.message), String(why));
  };
  await refuses((await createCsr(serviceId(TD, 'api'))).csrPem, /asks for spiffe:\/\/test\.knit\/ns\/default\/svc\/api but the caller may only have .*web/);
  await refuses((await createCsr(web)).csrPem, /not in trust domain/, serviceId('other.knit', 'web'));
  await refuses('-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----', /not a PEM PKCS#10 CSR/);
  await refuses('hello', /not a PEM PKCS#10 CSR/);

  const key = await generateKeyPair();
  const two = await x509.Pkcs10CertificateRequestGenerator.create({
    keys: key.keys, signingAlgorithm: SIGN_ALG,
    extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'url', value: web.uri }, { type: 'url', value: serviceId(TD, 'db').uri }])],
  });
  await refuses(two.toString('pem'), /exactly one URI SAN, found 2/);
  const dns = await x509.Pkcs10CertificateRequestGenerator.create({
    keys: key.keys, signingAlgorithm: SIGN_ALG,
    extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'url', value: web.uri }, { type: 'dns', value: 'evil.example' }])],
  });
  await refuses(dns.toString('pem'), /no SAN other than/);

  const rsaAlg = { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256', publicExponent: new Uint8Array([1, 0, 1]), modulusLength: 2048 };
  const rsa = (await webcrypto.subtle.generateKey(rsaAlg, true, ['sign', 'verify']));
  const rsaCsr = await x509.Pkcs10CertificateRequestGenerator.create({
    keys: rsa, signingAlgorithm: rsaAlg,
    extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'url', value: web.uri }])],
  });
  await refuses(rsaCsr.toString('pem'), /must be EC P-256/);

  // A CSR whose signature was made by another key: swap the public key bytes.
  const good = new x509.Pkcs10CertificateRequest((await createCsr(web)).csrPem);
  const der = Buffer.from(good.rawData);
  const other = Buffer.from((await x509.PublicKey.create(key.keys.publicKey)).rawData);
  const spki = Buffer.from(good.publicKey.rawData);
  const at = der.indexOf(spki);
  other.copy(der, at);
  await refuses(x509.PemConverter.encode(der, 'CERTIFICATE REQUEST'), /signature does not verify/);
});

test('a CA round-trips through its material and refuses a mismatched key', async () => {
  const ca = await CertificateAuthority.create(TD);
  const again = await CertificateAuthority.load(ca.material());
  assert.equal(again.trustDomain, TD);
  const { csrPem } = await createCsr(web);
  validateLeaf((await again.signCsr(csrPem, web)).certPem, web);
  const other = await CertificateAuthority.create(TD);
  await assert.rejects(CertificateAuthority.load({ certPem: ca.rootPem, keyPem: other.material().keyPem }), /does not match/);
  await assert.rejects(CertificateAuthority.load({ certPem: ca.rootPem, keyPem: 'junk' }), (e: unknown) => isKnitError(e, 'KNIT_ERR_CERT'));
});

test('validateLeaf refuses a leaf for another identity or an expired one', async () => {
  const ca = await CertificateAuthority.create(TD);
  const { csrPem } = await createCsr(web);
  const leaf = await ca.signCsr(csrPem, web, { now: new Date(Date.now() - 3 * 24 * 3600e3) });
  assert.throws(() => validateLeaf(leaf.certPem, web), /not valid now/);
  const fresh = await ca.signCsr(csrPem, web);
  assert.throws(() => validateLeaf(fresh.certPem, serviceId(TD, 'api')), /names spiffe/);
  assert.throws(() => validateLeaf(ca.rootPem, web), /invalid/);
});
