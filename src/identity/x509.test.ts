/**
 * certInfo (node:crypto + der.ts) against certificates made by openssl and
 * by knit's CA, hostile ones included, with @peculiar/x509 (which certInfo
 * was built on before, and which the control plane still signs with) as
 * the oracle: every field must read the same as it did.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, X509Certificate } from 'node:crypto';
import { certInfo, certInfoFromDer, splitPem, EKU, type CertInfo } from './x509.js';
import { CertificateAuthority, createCsr, x509 } from './ca.js';
import { serverId, serviceId } from './spiffe.js';
import { isKnitError } from '../errors.js';
import { makeOpensslCerts, HOSTILE_CASES, type OpensslCerts } from '../../test/helpers/openssl-certs.js';
import { hostileLeaf, makePki, type TestPki } from '../../test/helpers/pki.js';

const TD = 'x509.knit';

/** What certInfo returned when it was built on @peculiar/x509 (its code, condensed). */
function oracle(pem: string): Omit<CertInfo, 'publicKey' | 'spiffeId'> & { spiffeId?: string } {
  const c = new x509.X509Certificate(pem);
  const san = c.getExtension(x509.SubjectAlternativeNameExtension);
  const uris = san ? san.names.items.filter((n) => n.type === 'url').map((n) => n.value) : [];
  const ku = c.getExtension(x509.KeyUsagesExtension);
  const eku = c.getExtension(x509.ExtendedKeyUsageExtension);
  const F = x509.KeyUsageFlags;
  const bits: Array<[CertInfo['keyUsages'][number], number]> = [
    ['digitalSignature', F.digitalSignature], ['nonRepudiation', F.nonRepudiation], ['keyEncipherment', F.keyEncipherment], ['dataEncipherment', F.dataEncipherment],
    ['keyAgreement', F.keyAgreement], ['keyCertSign', F.keyCertSign], ['cRLSign', F.cRLSign], ['encipherOnly', F.encipherOnly], ['decipherOnly', F.decipherOnly],
  ];
  return {
    pem: c.toString('pem'),
    serial: c.serialNumber,
    subject: c.subject,
    notBefore: c.notBefore,
    notAfter: c.notAfter,
    isCa: c.getExtension(x509.BasicConstraintsExtension)?.ca ?? false,
    uris,
    // Close enough for these certificates: their one URI is a valid SPIFFE ID or not a spiffe:// URI at all.
    spiffeId: uris.length === 1 && /^spiffe:\/\//.test(uris[0]!) ? uris[0] : undefined,
    keyUsage: ku ? { digitalSignature: (ku.usages & F.digitalSignature) !== 0, keyCertSign: (ku.usages & F.keyCertSign) !== 0, cRLSign: (ku.usages & F.cRLSign) !== 0, critical: ku.critical } : undefined,
    eku: eku ? Array.from(eku.usages, String) : [],
    fingerprint: createHash('sha256').update(Buffer.from(c.rawData)).digest('hex'),
    keyUsages: ku ? bits.filter(([, b]) => (ku.usages & b) !== 0).map(([n]) => n) : [],
  };
}

/** certInfo's fields in the oracle's terms: the SPIFFE ID as its URI, the key left out (node:crypto read it before too). */
function mine(pem: string) {
  const { publicKey: _k, spiffeId, ...rest } = certInfo(pem);
  return { ...rest, spiffeId: spiffeId?.uri };
}

let pki: TestPki;
let certs: OpensslCerts;

before(async () => {
  pki = await makePki(TD);
  const { certPem, keyPem } = pki.ca.material();
  certs = await makeOpensslCerts({ caCertPem: certPem, caKeyPem: keyPem, trustDomain: TD, service: 'web' });
});

after(async () => {
  await certs?.cleanup();
});

test('every openssl-made certificate, hostile ones included, reads as @peculiar/x509 read it', () => {
  for (const name of HOSTILE_CASES) {
    for (const pem of splitPem(certs.leaves[name].certChainPem)) {
      assert.deepEqual(mine(pem), oracle(pem), name);
    }
  }
  assert.deepEqual(mine(certs.otherCaPem), oracle(certs.otherCaPem), 'openssl\'s CA');
});

test('what each hostile case is, as knit reads it', () => {
  const info = (name: (typeof HOSTILE_CASES)[number]) => certInfo(certs.leaves[name].certChainPem);
  const id = `spiffe://${TD}/ns/default/svc/web`;
  const good = info('good');
  assert.deepEqual([good.uris, good.spiffeId?.uri, good.isCa, good.keyUsages, good.publicKey.label], [[id], id, false, ['digitalSignature'], 'EC P-256']);
  assert.deepEqual(good.keyUsage, { digitalSignature: true, keyCertSign: false, cRLSign: false, critical: true });
  assert.deepEqual(good.eku, [EKU.serverAuth, EKU.clientAuth]);
  assert.deepEqual(info('two-uri-sans').uris, [id, `spiffe://${TD}/ns/default/svc/db`]);
  assert.equal(info('two-uri-sans').spiffeId, undefined);
  assert.deepEqual(info('no-uri-san').uris, []);
  assert.equal(info('non-spiffe-uri').spiffeId, undefined);
  assert.equal(info('ca-leaf').isCa, true);
  assert.deepEqual(info('key-cert-sign').keyUsages, ['digitalSignature', 'keyCertSign']);
  assert.deepEqual(info('crl-sign').keyUsages, ['digitalSignature', 'cRLSign']);
  assert.equal(info('no-key-usage').keyUsage, undefined);
  assert.deepEqual(info('no-key-usage').keyUsages, []);
  assert.deepEqual(info('key-agreement-only').keyUsages, ['keyAgreement']);
  assert.deepEqual(info('rsa-1024').publicKey, { type: 'rsa', bits: 1024, label: 'RSA-1024' });
  assert.deepEqual(info('rsa-2048').keyUsages, ['digitalSignature', 'keyEncipherment']);
  assert.deepEqual(info('ec-p384').publicKey, { type: 'ec', curve: 'P-384', bits: 384, label: 'EC P-384' });
  assert.deepEqual(info('no-eku').eku, []);
  assert.deepEqual(info('eku-server-only').eku, [EKU.serverAuth]);
  assert.ok(info('expired').notAfter < new Date());
  assert.ok(info('not-yet-valid').notBefore > new Date());
  // node:crypto agrees where it has a say.
  for (const name of HOSTILE_CASES) {
    const x = new X509Certificate(certs.leaves[name].certChainPem);
    const i = info(name);
    assert.deepEqual(i.eku, x.keyUsage ?? [], `${name}: EKU`);
    assert.equal(i.notAfter.getTime(), Date.parse(x.validTo), `${name}: notAfter`);
    assert.equal(i.notBefore.getTime(), Date.parse(x.validFrom), `${name}: notBefore`);
    assert.equal(i.serial.toUpperCase().replace(/^0+/, ''), x.serialNumber.replace(/^0+/, ''), `${name}: serial`);
  }
});

test('certificates made by knit\'s CA read as @peculiar/x509 read them: root, leaves, hostile leaves', async () => {
  const ca = await CertificateAuthority.create(TD);
  const pems = [ca.rootPem];
  for (const id of [serviceId(TD, 'web'), serverId(TD, 'cp1')]) {
    const { csrPem } = await createCsr(id);
    pems.push((await ca.signCsr(csrPem, id, { extraNames: id.what.kind === 'server' ? ['127.0.0.1', 'cp.example'] : [] })).certPem);
  }
  for (const uris of [[], [serviceId(TD, 'a').uri, serviceId(TD, 'b').uri], [serviceId(TD, 'a').uri]]) {
    pems.push((await hostileLeaf(pki, uris)).cert, (await hostileLeaf(pki, uris, { ca: true })).cert);
  }
  for (const pem of pems) assert.deepEqual(mine(pem), oracle(pem));

  const root = certInfo(ca.rootPem);
  assert.equal(root.isCa, true);
  assert.deepEqual(root.keyUsages, ['digitalSignature', 'keyCertSign', 'cRLSign']);
  assert.equal(root.subject, `CN=knit root CA ${TD}, O=knit`);
  assert.equal(root.pem, ca.rootPem, 'the same PEM text, so stored bundles compare equal');
  const server = certInfo(pems[2]!);
  assert.deepEqual(server.uris, [serverId(TD, 'cp1').uri], 'DNS and IP SANs are not URIs');
  assert.equal(certInfo(pems[4]!).isCa, true, 'a hostile leaf with cA=TRUE');
  assert.equal(certInfo(pems[3]!).isCa, false);
});

test('certInfo takes PEM (the first of a chain) or DER, and refuses garbage with KNIT_ERR_CERT', () => {
  const chain = certs.leaves['leaf-signed-by-leaf'].certChainPem;
  const [leaf, issuer] = splitPem(chain);
  assert.ok(leaf && issuer);
  assert.equal(certInfo(chain).fingerprint, certInfo(leaf).fingerprint);
  assert.notEqual(certInfo(issuer).fingerprint, certInfo(leaf).fingerprint);
  assert.deepEqual(certInfoFromDer(new X509Certificate(leaf).raw), certInfo(leaf));
  for (const junk of ['', 'hello', '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----']) {
    assert.throws(() => certInfo(junk), (e: unknown) => isKnitError(e, 'KNIT_ERR_CERT'));
  }
  assert.throws(() => certInfoFromDer(Buffer.from('3000', 'hex')), (e: unknown) => isKnitError(e, 'KNIT_ERR_CERT'));
});
