/**
 * The agent's side of issuance, with node:crypto alone: making a key and a
 * PKCS#10 certificate request (RFC 2986) for a SPIFFE ID, and checking the
 * leaf the control plane returns before using it. The CA's side (signing,
 * with @peculiar/x509) is ca.ts, which only the control plane loads.
 *
 * The request is what the CA accepts and nothing more: an EC P-256 key,
 * subject CN=<last path segment>, an extensionRequest attribute holding
 * one subjectAltName extension with exactly one URI, signed ECDSA-SHA256.
 */
import { generateKeyPair as generateKeyPairCb, sign } from 'node:crypto';
import { promisify } from 'node:util';
import { KnitError } from '../errors.js';
import type { SpiffeId } from './spiffe.js';
import { certInfo, type CertInfo } from './x509.js';
import { OID, bitStringOf, contextTag, objectIdentifier, octetString, sequence, setOf, smallInteger, tlv, toPem, utf8String, CONTEXT } from './der.js';

const generateKeyPair = promisify(generateKeyPairCb);

/** Clock skew tolerated between hosts (Linkerd allows 20 s; a minute costs nothing); the CA backdates leaves by as much. */
export const CLOCK_SKEW_MS = 60_000;

/** A signed leaf and the chain to send with it. */
export interface SignedLeaf {
  certPem: string;
  /** Intermediates between the leaf and the root (empty for a single-level CA). */
  chainPem: string[];
  notAfter: Date;
}

/** The PKCS#10 request body for `id` over `spkiDer`, unsigned (CertificationRequestInfo). */
function requestInfo(id: SpiffeId, spkiDer: Buffer): Buffer {
  const cn = id.path.split('/').pop() || id.trustDomain;
  const subject = sequence(setOf(sequence(objectIdentifier(OID.commonName), utf8String(cn))));
  // SPIFFE IDs are ASCII (spiffe.ts refuses anything else), so IA5String holds them as they are.
  const san = sequence(contextTag(6, false, Buffer.from(id.uri, 'ascii')));
  const extensions = sequence(sequence(objectIdentifier(OID.subjectAltName), octetString(san)));
  const extensionRequest = sequence(objectIdentifier(OID.extensionRequest), setOf(extensions));
  // attributes [0] IMPLICIT SET OF Attribute
  const attributes = tlv(CONTEXT, true, 0, extensionRequest);
  return sequence(smallInteger(0), subject, spkiDer, attributes);
}

/** Makes an agent-side key and a CSR for `id`; the private key never leaves the caller. */
export async function createCsr(id: SpiffeId): Promise<{ keyPem: string; csrPem: string }> {
  if (!/^[\x21-\x7e]+$/.test(id.uri)) throw new KnitError('KNIT_ERR_SPIFFE_ID', `${id.uri} is not printable ASCII`);
  const { privateKey, publicKey } = await generateKeyPair('ec', { namedCurve: 'prime256v1' });
  const info = requestInfo(id, publicKey.export({ type: 'spki', format: 'der' }));
  const signature = sign('sha256', info, { key: privateKey, dsaEncoding: 'der' });
  // ecdsa-with-SHA256 takes no parameters (RFC 5758 3.2).
  const csr = sequence(info, sequence(objectIdentifier(OID.ecdsaWithSha256)), bitStringOf(signature));
  return { keyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), csrPem: toPem(csr, 'CERTIFICATE REQUEST') };
}

/**
 * Checks a leaf the CA returned before an agent uses it: the identity it
 * asked for, the SVID shape, and a validity window that includes now.
 */
export function validateLeaf(certPem: string, expected: SpiffeId, now = new Date()): CertInfo {
  const info = certInfo(certPem);
  const bad = (why: string): never => {
    throw new KnitError('KNIT_ERR_CERT', `leaf for ${expected.uri} is invalid: ${why}`);
  };
  if (info.uris.length !== 1) bad(`has ${info.uris.length} URI SANs, must have exactly one`);
  if (info.uris[0] !== expected.uri) bad(`names ${info.uris[0]}`);
  if (info.isCa) bad('has cA=true');
  if (!info.keyUsage?.digitalSignature || info.keyUsage.keyCertSign || info.keyUsage.cRLSign) bad('key usage must be digitalSignature only');
  if (info.notAfter <= now || info.notBefore > new Date(now.getTime() + CLOCK_SKEW_MS)) bad(`not valid now (valid ${info.notBefore.toISOString()} to ${info.notAfter.toISOString()})`);
  return info;
}
