/** Certificates made by code for tests: a CA and leaves for any service, fresh or expired. */
import { CertificateAuthority, createCsr, generateKeyPair, importKeyPair, SIGN_ALG, x509 } from '../../src/identity/ca.js';
import { serviceId } from '../../src/identity/spiffe.js';
import type { ServiceTls } from '../../src/identity/tls.js';

export interface TestPki {
  ca: CertificateAuthority;
  trustDomain: string;
  /** A leaf for `service` signed by this CA; `now` in the past makes an expired one. */
  leaf(service: string, opts?: { now?: Date; ttlMs?: number }): Promise<ServiceTls>;
}

export async function makePki(trustDomain = 'test.knit'): Promise<TestPki> {
  const ca = await CertificateAuthority.create(trustDomain);
  return {
    ca,
    trustDomain,
    async leaf(service, opts = {}) {
      const id = serviceId(trustDomain, service);
      const { keyPem, csrPem } = await createCsr(id);
      const signed = await ca.signCsr(csrPem, id, opts);
      return { certChainPem: signed.certPem, keyPem, trustBundlePem: [ca.rootPem] };
    },
  };
}

/**
 * A leaf with whatever URI SANs a hostile peer might present, signed with
 * the CA's own key (bypassing the CA's checks), for refusal tests.
 */
export async function hostileLeaf(pki: TestPki, uris: string[], opts: { ca?: boolean } = {}): Promise<{ cert: string; key: string }> {
  const caKey = await importKeyPair(pki.ca.material().keyPem);
  const key = await generateKeyPair();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: '01',
    subject: 'CN=hostile',
    issuer: new x509.X509Certificate(pki.ca.rootPem).subjectName,
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + 3600_000),
    signingAlgorithm: SIGN_ALG,
    publicKey: key.keys.publicKey,
    signingKey: caKey.keys.privateKey,
    extensions: [
      new x509.BasicConstraintsExtension(!!opts.ca, undefined, true),
      new x509.KeyUsagesExtension(opts.ca ? x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.digitalSignature : x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension(['1.3.6.1.5.5.7.3.1', '1.3.6.1.5.5.7.3.2']),
      ...(uris.length ? [new x509.SubjectAlternativeNameExtension(uris.map((value) => ({ type: 'url' as const, value })))] : []),
    ],
  });
  return { cert: cert.toString('pem'), key: key.privateKeyPem };
}
