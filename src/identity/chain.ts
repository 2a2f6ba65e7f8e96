/**
 * Certificate chains checked with node:crypto: does a leaf chain, through
 * optional intermediates, to one of the trusted roots? Used where knit
 * checks a certificate outside a TLS handshake (an enrolment answer, a
 * signed document's signer), so that nothing it stores was merely claimed.
 */
import { X509Certificate } from 'node:crypto';
import { KnitError } from '../errors.js';

/** Longest chain accepted above a leaf: a root and up to two intermediates. */
export const MAX_CHAIN = 3;
/** Clock skew allowed when checking validity (Linkerd allows 20 s; a minute costs nothing). */
const SKEW_MS = 60_000;

const validAt = (c: X509Certificate, at: Date): boolean => Date.parse(c.validFrom) <= at.getTime() + SKEW_MS && Date.parse(c.validTo) >= at.getTime();

/** Walks from `leaf` up through `intermediates` to one of `roots`, checking every signature and, for intermediates, cA and validity at `at`. */
export function chainsTo(leaf: X509Certificate, intermediates: X509Certificate[], roots: X509Certificate[], at: Date): boolean {
  let cur = leaf;
  for (let depth = 0; depth <= MAX_CHAIN; depth++) {
    if (roots.some((r) => validAt(r, at) && cur.checkIssued(r) && cur.verify(r.publicKey))) return true;
    const next = intermediates.find((c) => c.ca && validAt(c, at) && cur.checkIssued(c) && cur.verify(c.publicKey));
    if (!next) return false;
    cur = next;
  }
  return false;
}

/**
 * Checks that a PEM leaf (with its PEM intermediates) chains to one of the
 * PEM `roots` and is valid now; throws KNIT_ERR_CERT naming `what`.
 */
export function verifyChain(what: string, leafPem: string, intermediatesPem: string[], roots: string[], now = new Date()): void {
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(leafPem);
  } catch (e) {
    throw new KnitError('KNIT_ERR_CERT', `${what}: not a certificate: ${(e as Error).message}`);
  }
  if (!validAt(leaf, now)) throw new KnitError('KNIT_ERR_CERT', `${what}: not valid now (valid ${leaf.validFrom} to ${leaf.validTo})`);
  if (!chainsTo(leaf, intermediatesPem.map((p) => new X509Certificate(p)), roots.map((r) => new X509Certificate(r)), now)) {
    throw new KnitError('KNIT_ERR_CERT', `${what}: not signed by the pinned trust root`);
  }
}
