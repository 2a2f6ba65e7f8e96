/**
 * What an agent and the control plane both need to agree on when a node
 * joins: the join token's form (`knit.<id>.<secret>.<ca-sha256>`, the last
 * part pinning the CA as kubeadm's discovery hash does) and the bytes an
 * agent signs with its recorded key to rejoin after its certificate expired.
 */
import { createHash, X509Certificate } from 'node:crypto';
import { KnitError } from '../errors.js';

/** SHA-256 of a root certificate's DER, as join tokens carry it. */
export function caHash(rootPem: string): string {
  return createHash('sha256').update(new X509Certificate(rootPem).raw).digest('hex');
}

/** The parts of a join token; throws KNIT_ERR_BAD_REQUEST on a malformed one. */
export function parseJoinToken(token: string): { id: string; secret: string; caHash: string } {
  const m = /^knit\.([0-9a-f]{16})\.([0-9a-f]{64})\.([0-9a-f]{64})$/.exec(token.trim());
  if (!m) throw new KnitError('KNIT_ERR_BAD_REQUEST', 'malformed join token (expected knit.<id>.<secret>.<ca-hash>, as `knit token create` prints)');
  return { id: m[1]!, secret: m[2]!, caHash: m[3]! };
}

/**
 * The bytes an agent signs (ECDSA P-256, SHA-256, IEEE P1363 signature)
 * with its recorded key to rejoin: bound to the trust domain, the node, a
 * single-use server nonce and the CSR it sends, so a proof can be used for
 * nothing else.
 */
export function rejoinProofInput(trustDomain: string, node: string, nonce: string, csrPem: string): Buffer {
  const csrHash = createHash('sha256').update(csrPem).digest('hex');
  return Buffer.from(`knit-rejoin-v1\n${trustDomain}\n${node}\n${nonce}\n${csrHash}`);
}
