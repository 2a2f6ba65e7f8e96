/** Certificates made by code for tests: a CA and leaves for any service, fresh or expired. */
import { CertificateAuthority, createCsr } from '../../src/identity/ca.js';
import { serviceId } from '../../src/identity/spiffe.js';
import type { ServiceTls } from '../../src/proxy/tls.js';

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
