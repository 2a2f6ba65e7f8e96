/**
 * Checking the certificate a peer presents, for every TLS edge of knit
 * (the data plane's inbound and outbound sides, the control plane's API).
 *
 * Both proxies let the handshake finish (`rejectUnauthorized: false`) and
 * then decide themselves, before a byte of application data moves, so that
 * every refusal is logged and counted with a reason a user can act on:
 *
 * 1. The chain, as OpenSSL verified it against the trust bundle
 *    (`peerChainVerdict`): expiry, issuer, signature, purpose. The reason
 *    (a metric label, so a short fixed phrase) says what to fix; OpenSSL's
 *    code (CERT_HAS_EXPIRED, INVALID_PURPOSE, ...) and message go with it
 *    into the log line (`verdictDetail`). Node names only some OpenSSL codes
 *    and reports every other one as `UNSPECIFIED` (a leaf signed by a leaf,
 *    for one, fails with X509_V_ERR_KEYUSAGE_NO_CERTSIGN, which Node does
 *    not name); for those the reason quotes OpenSSL's own message instead.
 * 2. The leaf, as an X.509-SVID (`PeerIdentityReader`): exactly one URI SAN,
 *    a valid SPIFFE ID in our trust domain, cA=false, a KeyUsage extension
 *    with digitalSignature and with neither keyCertSign nor cRLSign, an EKU
 *    (when present) that allows the role the peer plays (clientAuth for a
 *    client, serverAuth for a server), and a key knit's CA issues.
 *
 * Keys accepted: EC P-256 only, the one key type knit's CA signs (ca.ts
 * refuses any other CSR), so any other key (RSA of any size, P-384, Ed25519)
 * did not come from a knit CA's normal path and is refused. KeyUsage need
 * not be marked critical here: knit's CA marks it so, but validators
 * (go-spiffe's included) check its bits, not its criticality.
 *
 * Node's default `checkServerIdentity` only knows DNS names and rejects
 * URI-only certificates, so knit compares the peer's single URI SAN itself.
 */
import type { TLSSocket } from 'node:tls';
import type { X509Certificate } from 'node:crypto';
import { certInfoFromDer, EKU, type CertInfo } from './x509.js';
import type { SpiffeId } from './spiffe.js';

/** Why a peer's identity was not accepted; always a reason, never a bare null. */
export type PeerIdentity = { ok: true; id: SpiffeId; notAfter: Date } | { ok: false; reason: string };

/** The part a peer plays in the connection, which decides the EKU it needs. */
export type PeerRole = 'client' | 'server';

/** Key types a peer may hold, as `PublicKeyInfo.label` names them (see the module doc). */
export const ACCEPTED_KEYS: ReadonlySet<string> = new Set(['EC P-256']);

/** Cache of parsed peer certificates by SHA-256 fingerprint: a peer reconnecting is not parsed again. */
const MAX_CACHE = 1024;

/** What does not change for a given certificate: its SVID verdict and the facts later checks need. */
type Parsed = { ok: true; id: SpiffeId; eku: string[]; notAfter: Date } | { ok: false; reason: string };

/**
 * Reads and caches the SPIFFE identities of peers. The cache holds only
 * what a certificate says about itself (its SVID shape, ID, EKU, expiry), so
 * each certificate is parsed once however many connections present it;
 * the trust domain and role are checked on every read.
 */
export class PeerIdentityReader {
  private readonly cache = new Map<string, Parsed>();

  /**
   * The peer's identity, if its leaf is a valid X.509-SVID in `trustDomain`.
   * The chain itself must already be verified (`peerChainVerdict`); this
   * reads only the leaf. With `role`, the leaf's EKU (when it has one) must
   * allow that role; without, the EKU is not checked.
   */
  read(socket: TLSSocket, trustDomain: string, role?: PeerRole): PeerIdentity {
    const cert = socket.getPeerX509Certificate();
    if (!cert) return { ok: false, reason: 'peer presented no certificate' };
    const fp = cert.fingerprint256;
    let got = this.cache.get(fp);
    if (!got) {
      got = this.parse(cert.raw);
      if (this.cache.size >= MAX_CACHE) this.cache.delete(this.cache.keys().next().value!);
      this.cache.set(fp, got);
    }
    if (!got.ok) return got;
    if (got.id.trustDomain !== trustDomain) return { ok: false, reason: `peer ${got.id.uri} is not in trust domain ${trustDomain}` };
    if (role) {
      const need = role === 'client' ? 'clientAuth' : 'serverAuth';
      if (got.eku.length > 0 && !got.eku.includes(EKU[need])) {
        return { ok: false, reason: `peer certificate extended key usage lacks ${need} (has ${ekuNames(got.eku)}), it may not act as a ${role}` };
      }
    }
    return { ok: true, id: got.id, notAfter: got.notAfter };
  }

  /** The checks that depend on the certificate alone, in the order a user would fix them. */
  private parse(der: Buffer): Parsed {
    let info: CertInfo;
    try {
      info = certInfoFromDer(der);
    } catch (e) {
      return { ok: false, reason: `peer certificate cannot be parsed: ${(e as Error).message}` };
    }
    if (info.uris.length !== 1) return { ok: false, reason: `peer certificate has ${info.uris.length} URI SANs, an X.509-SVID has exactly one` };
    if (!info.spiffeId) return { ok: false, reason: `peer URI SAN ${info.uris[0]?.slice(0, 200)} is not a valid SPIFFE ID` };
    if (info.isCa) return { ok: false, reason: 'peer certificate is a CA certificate' };
    if (!info.keyUsage) return { ok: false, reason: 'peer certificate has no key usage extension, an X.509-SVID leaf needs one with digitalSignature' };
    for (const bad of ['keyCertSign', 'cRLSign'] as const) {
      if (info.keyUsages.includes(bad)) return { ok: false, reason: `peer certificate key usage includes ${bad}, an X.509-SVID leaf must not` };
    }
    if (!info.keyUsages.includes('digitalSignature')) {
      return { ok: false, reason: `peer certificate key usage lacks digitalSignature (has ${info.keyUsages.join(', ') || 'nothing'})` };
    }
    if (!ACCEPTED_KEYS.has(info.publicKey.label)) {
      return { ok: false, reason: `peer key is ${info.publicKey.label}, knit accepts only ${[...ACCEPTED_KEYS].join(', ')}` };
    }
    return { ok: true, id: info.spiffeId, eku: info.eku, notAfter: info.notAfter };
  }
}

const EKU_NAMES: Record<string, string> = { [EKU.serverAuth]: 'serverAuth', [EKU.clientAuth]: 'clientAuth' };
const ekuNames = (oids: string[]): string => oids.map((o) => EKU_NAMES[o] ?? o).join(', ');

/**
 * How OpenSSL's verification of the peer's chain against the trust bundle
 * ended: on failure a `reason` to count and show, OpenSSL's `code` as Node
 * names it (or NO_CERTIFICATE) and OpenSSL's own message, to log.
 */
export type ChainVerdict = { ok: true } | { ok: false; reason: string; code: string; openssl?: string };

/** OpenSSL verification codes (as Node names them in `authorizationError`) to words a user can act on. */
const VERIFY_REASONS: Record<string, string | ((role: PeerRole, leaf: X509Certificate | undefined) => string)> = {
  CERT_HAS_EXPIRED: 'certificate expired',
  CERT_NOT_YET_VALID: 'certificate not yet valid',
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: 'certificate not signed by the trust bundle',
  UNABLE_TO_GET_ISSUER_CERT: 'certificate not signed by the trust bundle',
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: 'certificate not signed by the trust bundle',
  DEPTH_ZERO_SELF_SIGNED_CERT: 'certificate is self-signed, not signed by the trust bundle',
  SELF_SIGNED_CERT_IN_CHAIN: 'certificate chains to a root outside the trust bundle',
  CERT_SIGNATURE_FAILURE: 'certificate signature does not verify',
  UNABLE_TO_DECRYPT_CERT_SIGNATURE: 'certificate signature does not verify',
  UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY: 'certificate issuer key cannot be read',
  INVALID_CA: 'certificate chain has an issuer that is not a CA',
  PATH_LENGTH_EXCEEDED: 'certificate chain longer than its issuers allow',
  CERT_CHAIN_TOO_LONG: 'certificate chain too long',
  INVALID_PURPOSE: (role, leaf) => {
    const need = role === 'client' ? 'clientAuth' : 'serverAuth';
    // node:crypto's `keyUsage` is the EKU list (OIDs), undefined when the certificate has none.
    const eku = leaf?.keyUsage;
    const why = eku && !eku.includes(EKU[need]) ? `extended key usage lacks ${need}` : 'its key usage forbids it';
    return `certificate not allowed for ${role} authentication: ${why}`;
  },
  CERT_REVOKED: 'certificate revoked',
  CERT_UNTRUSTED: 'certificate not trusted for this purpose',
  CERT_REJECTED: 'certificate rejected for this purpose',
  ERROR_IN_CERT_NOT_BEFORE_FIELD: 'certificate has a malformed notBefore',
  ERROR_IN_CERT_NOT_AFTER_FIELD: 'certificate has a malformed notAfter',
};

/** The verification error OpenSSL recorded, with its message, as Node itself reads it. */
type VerifyError = Error & { code?: string };
interface TlsHandle {
  verifyError?: () => VerifyError | null | undefined;
}

/**
 * OpenSSL's message for the verification result. Node keeps only the code
 * on the socket (`authorizationError`), and names only some codes; the
 * message (X509_verify_cert_error_string) is on the native handle, where
 * Node's own _tls_wrap reads it. Undefined if a future Node moves it.
 */
function opensslMessage(socket: TLSSocket): string | undefined {
  try {
    const handle = (socket as unknown as { _handle?: TlsHandle })._handle;
    const e = handle?.verifyError?.();
    return e?.message || undefined;
  } catch {
    return undefined;
  }
}

/**
 * How OpenSSL's verification of the peer's chain ended, read on the
 * socket right after the handshake (`secureConnect`/`secureConnection`).
 * `role` is the part the peer plays: the reason says "client certificate
 * ..." or "server certificate ...", and quotes OpenSSL's message when Node
 * has no name for its code.
 */
export function peerChainVerdict(socket: TLSSocket, role: PeerRole): ChainVerdict {
  if (socket.authorized) return { ok: true };
  const leaf = socket.getPeerX509Certificate();
  if (!leaf) {
    // With no certificate Node reports whatever OpenSSL left (UNABLE_TO_GET_ISSUER_CERT or UNSPECIFIED); the real reason is simpler.
    return { ok: false, code: 'NO_CERTIFICATE', reason: role === 'client' ? 'no client certificate' : 'server presented no certificate' };
  }
  const raw = socket.authorizationError;
  const code = typeof raw === 'string' && /^[A-Z0-9_]{1,64}$/.test(raw) ? raw : 'UNSPECIFIED';
  const openssl = opensslMessage(socket);
  const words = VERIFY_REASONS[code];
  if (words) return { ok: false, code, openssl, reason: `${role} ${typeof words === 'function' ? words(role, leaf) : words}` };
  // UNSPECIFIED is Node's name for every OpenSSL code it does not list; OpenSSL's message says what failed.
  return { ok: false, code, openssl, reason: openssl ? `${role} certificate chain refused by OpenSSL: ${openssl.slice(0, 120)}` : `${role} certificate chain refused by OpenSSL (${code})` };
}

/**
 * OpenSSL's own words for a failed verdict, as log fields and a suffix for
 * the log message: ` (OpenSSL CERT_HAS_EXPIRED: certificate has expired)`.
 * Nothing for a missing certificate (not OpenSSL's verdict), and no
 * `UNSPECIFIED` code when the reason already quotes OpenSSL's message.
 */
export function verdictDetail(v: ChainVerdict): { verifyCode?: string; openssl?: string; text: string } {
  if (v.ok || v.code === 'NO_CERTIFICATE') return { text: '' };
  if (v.code === 'UNSPECIFIED' && v.openssl) return { openssl: v.openssl, text: '' };
  return { verifyCode: v.code, openssl: v.openssl, text: ` (OpenSSL ${v.code}${v.openssl ? `: ${v.openssl}` : ''})` };
}
