/** Document signers for tests: the control plane's own, and impostors with the wrong CA or the wrong identity. */
import { createPrivateKey } from 'node:crypto';
import { CertificateAuthority, createCsr } from '../../src/identity/ca.js';
import { agentId, serverId, type SpiffeId } from '../../src/identity/spiffe.js';
import type { SignerMaterial } from '../../src/identity/signed-doc.js';

/** A signer leaf for `id` issued by `ca` (valid for `ttlMs`, from `now`). */
export async function signerFor(ca: CertificateAuthority, id: SpiffeId, opts: { now?: Date; ttlMs?: number } = {}): Promise<SignerMaterial> {
  const { keyPem, csrPem } = await createCsr(id);
  const leaf = await ca.signCsr(csrPem, id, opts);
  return { chainPem: [leaf.certPem], privateKey: createPrivateKey(keyPem) };
}

/** The control plane's signer, and impostors: another CA's server, and this CA's agent. */
export async function signers(ca: CertificateAuthority): Promise<{ server: SignerMaterial; otherCa: SignerMaterial; agent: SignerMaterial }> {
  const other = await CertificateAuthority.create(ca.trustDomain);
  return {
    server: await signerFor(ca, serverId(ca.trustDomain, 'cp1')),
    otherCa: await signerFor(other, serverId(ca.trustDomain, 'cp1')),
    agent: await signerFor(ca, agentId(ca.trustDomain, 'db-1')),
  };
}
