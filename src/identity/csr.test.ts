/**
 * The agent's CSR, made with node:crypto alone: OpenSSL verifies it and
 * reads its URI SAN, knit's CA (@peculiar/x509) signs it, and the leaf it
 * returns passes validateLeaf with the key the CSR was made with.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createPrivateKey, createPublicKey, X509Certificate } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { createCsr, validateLeaf } from './csr.js';
import { CertificateAuthority, csrInfo, x509 } from './ca.js';
import { agentId, serverId, serviceId } from './spiffe.js';
import { children, oid, parse, OID } from './der.js';
import { isKnitError } from '../errors.js';

const run = promisify(execFile);
const OPENSSL = process.env.KNIT_TEST_OPENSSL ?? '/usr/bin/openssl';
const TD = 'csr.knit';
const web = serviceId(TD, 'web');

const der = (pem: string): Buffer => Buffer.from(pem.replace(/-----[^-]+-----|\s/g, ''), 'base64');

test('openssl verifies the CSR and reads exactly one URI SAN, an EC P-256 key, ECDSA-SHA256', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'knit-csr-'));
  try {
    const { csrPem } = await createCsr(web);
    await writeFile(join(dir, 'csr.pem'), csrPem);
    const { stdout, stderr } = await run(OPENSSL, ['req', '-in', join(dir, 'csr.pem'), '-noout', '-verify', '-text']);
    assert.match(stderr + stdout, /verify OK/i);
    assert.match(stdout, /Subject: CN ?= ?web/);
    assert.match(stdout, /Signature Algorithm: ecdsa-with-SHA256/);
    assert.match(stdout, /NIST CURVE: P-256/);
    assert.match(stdout, /Requested Extensions:\s+X509v3 Subject Alternative Name:\s+URI:spiffe:\/\/csr\.knit\/ns\/default\/svc\/web\s*\n/);
    assert.equal((stdout.match(/URI:/g) ?? []).length, 1, 'one URI SAN');
    // And a tampered CSR fails openssl's check.
    const tampered = der(csrPem);
    tampered[tampered.indexOf(Buffer.from('web'))]! ^= 1;
    await writeFile(join(dir, 'bad.pem'), `-----BEGIN CERTIFICATE REQUEST-----\n${tampered.toString('base64')}\n-----END CERTIFICATE REQUEST-----\n`);
    // OpenSSL 3.0 reports the failure but exits 0; later versions exit 1.
    const bad = await run(OPENSSL, ['req', '-in', join(dir, 'bad.pem'), '-noout', '-verify']).then(({ stdout, stderr }) => stdout + stderr, (e: { stdout?: string; stderr?: string }) => `${e.stdout ?? ''}${e.stderr ?? ''}`);
    assert.match(bad, /verify fail/i);
    assert.doesNotMatch(bad, /verify OK/i);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('the CSR has the shape the CA checks: version 0, one extensionRequest with one SAN extension holding one URI', async () => {
  const { csrPem, keyPem } = await createCsr(web);
  assert.match(csrPem, /^-----BEGIN CERTIFICATE REQUEST-----\n([A-Za-z0-9+/=]{1,64}\n)+-----END CERTIFICATE REQUEST-----$/);
  const [info, alg, sig] = children(parse(der(csrPem)));
  assert.ok(info && alg && sig);
  assert.deepEqual(children(alg).map(oid), [OID.ecdsaWithSha256], 'no parameters');
  const [version, , spki, attrs] = children(info);
  assert.equal(version!.value.toString('hex'), '00');
  assert.deepEqual(createPublicKey({ key: spki!.raw, format: 'der', type: 'spki' }).export({ type: 'spki', format: 'der' }), createPublicKey(keyPem).export({ type: 'spki', format: 'der' }), 'the key in the CSR is the key returned');
  const csr = new x509.Pkcs10CertificateRequest(csrPem);
  assert.equal(csr.subject, 'CN=web');
  assert.equal(await csr.verify(), true);
  assert.equal(csr.extensions.length, 1);
  const san = csr.extensions[0];
  assert.ok(san instanceof x509.SubjectAlternativeNameExtension);
  assert.equal(san.critical, false);
  assert.deepEqual(san.names.items.map((n) => [n.type, n.value]), [['url', web.uri]]);
  assert.equal(attrs!.num, 0, 'attributes [0]');
  const key = createPrivateKey(keyPem);
  assert.deepEqual([key.asymmetricKeyType, key.asymmetricKeyDetails?.namedCurve], ['ec', 'prime256v1']);
  assert.match(keyPem, /^-----BEGIN PRIVATE KEY-----/);
  assert.deepEqual(csrInfo(csrPem), { publicKey: createPublicKey(keyPem).export({ type: 'spki', format: 'pem' }).toString(), uri: web.uri });
});

test('knit\'s CA signs the node:crypto CSR; the leaf validates and matches the key', async () => {
  const ca = await CertificateAuthority.create(TD);
  for (const id of [web, agentId(TD, 'node-1'), serverId(TD, 'cp1')]) {
    const { csrPem, keyPem } = await createCsr(id);
    const leaf = await ca.signCsr(csrPem, id);
    const info = validateLeaf(leaf.certPem, id);
    assert.equal(info.spiffeId?.uri, id.uri);
    const x = new X509Certificate(leaf.certPem);
    assert.ok(x.checkPrivateKey(createPrivateKey(keyPem)));
    assert.ok(x.verify(new X509Certificate(ca.rootPem).publicKey));
    assert.ok(x.checkIssued(new X509Certificate(ca.rootPem)), 'the leaf names the root as its issuer, byte for byte');
  }
  // Each CSR has its own key.
  const a = await createCsr(web);
  const b = await createCsr(web);
  assert.notEqual(a.keyPem, b.keyPem);
  // The CA still refuses what it refused: another identity, and a CSR altered after signing.
  await assert.rejects(ca.signCsr(a.csrPem, serviceId(TD, 'db')), (e: unknown) => isKnitError(e, 'KNIT_ERR_CA') && /asks for .*web but the caller may only have .*db/.test(e.message));
  const tampered = der(a.csrPem);
  tampered[tampered.indexOf(Buffer.from('web'))]! ^= 1;
  await assert.rejects(ca.signCsr(`-----BEGIN CERTIFICATE REQUEST-----\n${tampered.toString('base64')}\n-----END CERTIFICATE REQUEST-----`, web), (e: unknown) => isKnitError(e, 'KNIT_ERR_CA') && /signature does not verify/.test(e.message));
});

test('validateLeaf refuses a CA certificate, another identity and a leaf outside its validity', async () => {
  const ca = await CertificateAuthority.create(TD);
  const { csrPem } = await createCsr(web);
  const fresh = await ca.signCsr(csrPem, web);
  assert.throws(() => validateLeaf(ca.rootPem, web), (e: unknown) => isKnitError(e, 'KNIT_ERR_CERT') && /names spiffe:\/\/csr\.knit$/.test(e.message));
  assert.throws(() => validateLeaf(fresh.certPem, serviceId(TD, 'api')), /names spiffe/);
  assert.throws(() => validateLeaf(fresh.certPem, web, new Date(Date.now() + 2 * 24 * 3600e3)), /not valid now/);
  assert.throws(() => validateLeaf(fresh.certPem, web, new Date(Date.now() - 3600e3)), /not valid now/);
  assert.equal(validateLeaf(fresh.certPem, web, new Date(Date.now() - 30_000)).uris[0], web.uri, 'backdating covers a minute of skew');
});
