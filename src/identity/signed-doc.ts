/**
 * Documents the control plane signs so that nobody else can write them:
 * intentions, node records, join tokens, the trust bundle. The registry
 * only stores them; every reader (agents, and the server itself) verifies
 * them before it acts on one, so a registry writer, a stolen ZooKeeper
 * credential or an old backup cannot change who may talk to whom.
 *
 * Wire form: a JWS in compact serialisation, ES256, with the signer's
 * X.509-SVID chain in the `x5c` header (RFC 7515 4.1.6). The payload is
 * `{ kind, td, seq, iat, body }`:
 *   - `kind` binds the document to the place it was written for (an
 *     intentions document is refused where a node record is expected);
 *   - `td` is the trust domain;
 *   - `seq` grows with every write of the same document, so a reader can
 *     refuse a rollback to an older, validly signed one;
 *   - `iat` (ms since the epoch) is when it was signed.
 * A document verifies when the signer certificate chains to a root of the
 * reader's trust bundle, carries exactly one URI SAN naming a control-plane
 * server (`spiffe://<td>/server/<name>`) of the reader's trust domain, is a
 * leaf with digitalSignature, was valid at `iat`, and `iat` is not in the
 * future. Validity is checked at `iat`, not now: the signer's leaf is short
 * lived and renewed, and a document written last month by a then-valid
 * signer is still the control plane's word. Its key lives only in the
 * server's memory.
 *
 * JWS is done here with node:crypto (RFC 7515 compact form, RFC 7518 3.4
 * ES256: the signature is R || S, 32 bytes each, which node:crypto calls
 * `ieee-p1363`) rather than with a JOSE library: every agent verifies
 * documents, and a library that also does JWE, JWT and JWKS costs an agent
 * ~9 MB of memory for one algorithm. The wire form is unchanged, so
 * documents signed before still verify (signed-doc.test.ts checks both ways
 * against jose).
 */
import { createHash, KeyObject, sign, verify, X509Certificate } from 'node:crypto';
import { KnitError } from '../errors.js';
import type { SpiffeId } from './spiffe.js';
import { certInfoFromDer } from './x509.js';
import { chainsTo, MAX_CHAIN } from './chain.js';

/** Clock skew allowed between the signer and a reader (Linkerd allows 20 s; a minute costs nothing). */
const SKEW_MS = 60_000;

/** The signer's current material: its leaf (and intermediates), and its private key. */
export interface SignerMaterial {
  /** The signer leaf first, then intermediates, PEM. */
  chainPem: string[];
  /** EC P-256: a node:crypto key, or a WebCrypto one (as the control plane imports it). */
  privateKey: KeyObject | CryptoKey;
}

/** A verified document. */
export interface VerifiedDocument<T> {
  kind: string;
  seq: number;
  /** When it was signed. */
  iat: Date;
  body: T;
  /** The signer's SPIFFE ID. */
  signer: string;
}

/** What a reader trusts: its roots and its trust domain. */
export interface DocumentTrust {
  roots: string[];
  trustDomain: string;
}

interface Payload {
  kind: string;
  td: string;
  seq: number;
  iat: number;
  body: unknown;
}

const refuse = (why: string): never => {
  throw new KnitError('KNIT_ERR_SIGNATURE', why);
};

/** The protected header knit writes, in the order jose wrote it (the order is part of the signed bytes, not of the meaning). */
interface Header {
  alg: 'ES256';
  typ: 'knit-doc+jws';
  x5c: string[];
}

const BASE64URL = /^[A-Za-z0-9_-]*$/;
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
/** An ES256 signature: R and S, 32 bytes each (RFC 7518 3.4). */
const ES256_SIGNATURE_BYTES = 64;

/** Strict base64url (RFC 7515 2: no padding, no other characters); Buffer.from alone skips what it does not know. */
function fromBase64url(part: string, what: string): Buffer {
  if (!BASE64URL.test(part) || part.length % 4 === 1) throw new Error(`${what} is not base64url`);
  return Buffer.from(part, 'base64url');
}

/** Is `key` an EC P-256 key, the only kind ES256 names? */
const isP256 = (key: KeyObject): boolean => key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails?.namedCurve === 'prime256v1';

/** Signs `body` as a document of `kind`, version `seq`. */
export async function signDocument(signer: SignerMaterial, trustDomain: string, kind: string, seq: number, body: unknown, now = new Date()): Promise<string> {
  const key = signer.privateKey instanceof KeyObject ? signer.privateKey : KeyObject.from(signer.privateKey);
  if (key.type !== 'private' || !isP256(key)) throw new KnitError('KNIT_ERR_SIGNATURE', 'a document signer key must be an EC P-256 private key');
  const x5c = signer.chainPem.map((pem) => new X509Certificate(pem).raw.toString('base64'));
  const header: Header = { alg: 'ES256', typ: 'knit-doc+jws', x5c };
  const payload: Payload = { kind, td: trustDomain, seq, iat: now.getTime(), body };
  const input = `${Buffer.from(JSON.stringify(header)).toString('base64url')}.${Buffer.from(JSON.stringify(payload)).toString('base64url')}`;
  const signature = sign('sha256', Buffer.from(input, 'ascii'), { key, dsaEncoding: 'ieee-p1363' });
  return `${input}.${signature.toString('base64url')}`;
}

/**
 * Verifies a document of `kind` and returns its body; throws
 * KNIT_ERR_SIGNATURE naming what is wrong (not a JWS, unsigned, signer not
 * chained to the trust bundle, signer not a control-plane identity, wrong
 * kind or trust domain, bad signature, signed in the future).
 */
export async function verifyDocument<T>(jws: string, kind: string, trust: DocumentTrust, now = new Date()): Promise<VerifiedDocument<T>> {
  if (typeof jws !== 'string' || jws.split('.').length !== 3) refuse(`${kind}: not a signed document (expected a JWS written by the control plane)`);
  const [headerB64, payloadB64, signatureB64] = jws.split('.') as [string, string, string];
  let header: Record<string, unknown>;
  try {
    const parsed: unknown = JSON.parse(fromBase64url(headerB64, 'header').toString('utf8'));
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new Error('JWS Protected Header is not a JSON object');
    header = parsed as Record<string, unknown>;
  } catch (e) {
    return refuse(`${kind}: unreadable JWS header: ${(e as Error).message}`);
  }
  if (header.alg !== 'ES256') refuse(`${kind}: signature algorithm ${String(header.alg)} is not ES256`);
  // RFC 7515 4.1.11: a reader must refuse extensions it does not understand; knit understands none (nor b64=false, RFC 7797).
  if (header.crit !== undefined || (header.b64 !== undefined && header.b64 !== true)) refuse(`${kind}: JWS header asks for extensions (crit/b64) knit does not implement`);
  const x5c = header.x5c;
  if (!Array.isArray(x5c) || x5c.length === 0 || x5c.length > MAX_CHAIN + 1) refuse(`${kind}: no signer certificate chain (x5c)`);
  let chain: X509Certificate[];
  try {
    chain = (x5c as unknown[]).map((b64) => {
      // RFC 7515 4.1.6: each entry is standard (not url-safe) base64 DER.
      if (typeof b64 !== 'string' || !BASE64.test(b64)) throw new Error('x5c entry is not base64');
      return new X509Certificate(Buffer.from(b64, 'base64'));
    });
  } catch (e) {
    return refuse(`${kind}: signer certificate cannot be parsed: ${(e as Error).message}`);
  }
  const signer = chain[0]!;
  // The signer must be a control-plane leaf of this trust domain.
  let info: ReturnType<typeof certInfoFromDer>;
  try {
    info = certInfoFromDer(signer.raw);
  } catch (e) {
    return refuse(`${kind}: signer certificate cannot be parsed: ${(e as Error).message}`);
  }
  if (info.uris.length !== 1 || !info.spiffeId) refuse(`${kind}: signer certificate must carry exactly one SPIFFE ID`);
  const id: SpiffeId = info.spiffeId!;
  if (id.what.kind !== 'server') refuse(`${kind}: signed by ${id.uri}, which is not a control-plane identity (spiffe://${trust.trustDomain}/server/<name>)`);
  if (id.trustDomain !== trust.trustDomain) refuse(`${kind}: signed by ${id.uri}, not of trust domain ${trust.trustDomain}`);
  if (info.isCa || !info.keyUsage?.digitalSignature || info.keyUsage.keyCertSign || info.keyUsage.cRLSign) refuse(`${kind}: signer ${id.uri} is not a signing leaf (cA=false, digitalSignature only)`);
  let payloadBytes: Buffer;
  try {
    if (!isP256(signer.publicKey)) throw new Error(`ES256 needs an EC P-256 key, the signer has ${info.publicKey.label}`);
    const signature = fromBase64url(signatureB64, 'signature');
    if (signature.length !== ES256_SIGNATURE_BYTES) throw new Error(`an ES256 signature is ${ES256_SIGNATURE_BYTES} bytes, this one ${signature.length}`);
    payloadBytes = fromBase64url(payloadB64, 'payload');
    // The signing input is the text as received (RFC 7515 5.2), not a re-encoding of what it decodes to.
    if (!verify('sha256', Buffer.from(`${headerB64}.${payloadB64}`, 'ascii'), { key: signer.publicKey, dsaEncoding: 'ieee-p1363' }, signature)) throw new Error('signature verification failed');
  } catch (e) {
    return refuse(`${kind}: signature does not verify: ${(e as Error).message}`);
  }
  let p: Payload;
  try {
    const parsed: unknown = JSON.parse(payloadBytes.toString('utf8'));
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new Error('not a JSON object');
    p = parsed as Payload;
  } catch (e) {
    return refuse(`${kind}: payload is not JSON: ${(e as Error).message}`);
  }
  if (p.kind !== kind) refuse(`${kind}: the document is a signed "${String(p.kind)}", not "${kind}" (moved from another key?)`);
  if (p.td !== trust.trustDomain) refuse(`${kind}: the document is for trust domain ${String(p.td)}`);
  if (!Number.isSafeInteger(p.seq) || p.seq < 0 || !Number.isFinite(p.iat)) refuse(`${kind}: payload lacks seq/iat`);
  const iat = new Date(p.iat);
  if (iat.getTime() > now.getTime() + SKEW_MS) refuse(`${kind}: signed in the future (${iat.toISOString()})`);
  if (Date.parse(signer.validFrom) > iat.getTime() + SKEW_MS || Date.parse(signer.validTo) < iat.getTime()) {
    refuse(`${kind}: signer certificate was not valid when the document was signed (${iat.toISOString()})`);
  }
  if (!chainsTo(signer, chain.slice(1), trust.roots.map((r) => new X509Certificate(r)), iat)) refuse(`${kind}: signer ${id.uri} does not chain to this agent's trust bundle`);
  return { kind: p.kind, seq: p.seq, iat, body: p.body as T, signer: id.uri };
}

/** The SHA-256 of a public key's SPKI DER, hex: how node records name an agent's key. */
export function keyFingerprint(spkiPem: string): string {
  return createHash('sha256').update(Buffer.from(spkiPem.replace(/-----[^-]+-----|\s/g, ''), 'base64')).digest('hex');
}
