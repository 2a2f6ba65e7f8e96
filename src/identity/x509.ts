/**
 * Reading certificates with node:crypto alone: what knit checks of a
 * certificate (its SPIFFE ID, cA, KeyUsage, EKU, key, validity), for the
 * agent, the proxies and the control plane alike. node:crypto parses and
 * OpenSSL verifies; the fields it does not expose come from der.ts. The x509
 * library (@peculiar/x509) is only for making certificates, in ca.ts, which
 * only the control plane loads: it costs ~20 MB of memory an agent does not
 * need to spend.
 */
import { createHash, X509Certificate } from 'node:crypto';
import { KnitError } from '../errors.js';
import { parseSpiffeId, type SpiffeId } from './spiffe.js';
import { OID, readBasicConstraints, readCertificate, readExtKeyUsage, readKeyUsage, readSubjectAltName, toPem, type KeyUsageName } from './der.js';

export type { KeyUsageName } from './der.js';

/** Facts about a certificate that knit checks, read from PEM. */
export interface CertInfo {
  /** The certificate re-armoured: 64-character lines, no trailing newline. */
  pem: string;
  /** The serial number, lowercase hex, without DER's leading 00 sign octet. */
  serial: string;
  subject: string;
  notBefore: Date;
  notAfter: Date;
  /** The basicConstraints cA flag as written (false when the extension is absent). */
  isCa: boolean;
  uris: string[];
  /** The single URI SAN parsed as a SPIFFE ID, when there is exactly one and it is valid. */
  spiffeId?: SpiffeId;
  keyUsage: { digitalSignature: boolean; keyCertSign: boolean; cRLSign: boolean; critical: boolean } | undefined;
  eku: string[];
  /** SHA-256 of the DER, hex. */
  fingerprint: string;
  /**
   * Every KeyUsage bit set, by its RFC 5280 name (`digitalSignature`,
   * `keyAgreement`, `keyEncipherment`, ...); empty when the extension is
   * absent (then `keyUsage` is undefined). A list beside `keyUsage`, not
   * more fields in it, so that code comparing `keyUsage` whole keeps working.
   */
  keyUsages: KeyUsageName[];
  /** The subject's public key: algorithm and size, as node:crypto reads them. */
  publicKey: PublicKeyInfo;
}

/** A certificate's public key, enough to decide whether knit accepts it. */
export interface PublicKeyInfo {
  /** node:crypto's `asymmetricKeyType`: 'ec', 'rsa', 'rsa-pss', 'ed25519', ...; 'unknown' if node cannot read it. */
  type: string;
  /** For EC keys, the NIST name when there is one ('P-256', 'P-384', 'P-521'), else OpenSSL's curve name. */
  curve?: string;
  /** Key size in bits: the RSA modulus length, or the EC curve's field size. */
  bits?: number;
  /** A short label for messages: 'EC P-256', 'RSA-1024', 'ed25519'. */
  label: string;
}

/** OpenSSL's curve names (as node reports them) to NIST names and sizes. */
const CURVES: Record<string, [string, number]> = {
  prime256v1: ['P-256', 256],
  secp384r1: ['P-384', 384],
  secp521r1: ['P-521', 521],
};

/** Reads the key type and size with node:crypto, which knows every algorithm OpenSSL does. */
function publicKeyInfo(cert: X509Certificate): PublicKeyInfo {
  try {
    const key = cert.publicKey;
    const type = key.asymmetricKeyType ?? 'unknown';
    const d = key.asymmetricKeyDetails ?? {};
    if (type === 'ec') {
      const [curve, bits] = CURVES[d.namedCurve ?? ''] ?? [d.namedCurve ?? 'unknown curve', undefined];
      return { type, curve, bits, label: `EC ${curve}` };
    }
    if (type === 'rsa' || type === 'rsa-pss') return { type, bits: d.modulusLength, label: `${type.toUpperCase()}-${d.modulusLength ?? '?'}` };
    return { type, label: type };
  } catch {
    return { type: 'unknown', label: 'unknown key type' };
  }
}

const OID_SERVER_AUTH = '1.3.6.1.5.5.7.3.1';
const OID_CLIENT_AUTH = '1.3.6.1.5.5.7.3.2';
export const EKU = { serverAuth: OID_SERVER_AUTH, clientAuth: OID_CLIENT_AUTH } as const;

/** Reads a certificate node:crypto has parsed; throws KNIT_ERR_CERT if its DER is not what RFC 5280 allows. */
function infoOf(cert: X509Certificate): CertInfo {
  const der = cert.raw;
  const f = readCertificate(der);
  const san = f.extensions.get(OID.subjectAltName);
  const bc = f.extensions.get(OID.basicConstraints);
  const ku = f.extensions.get(OID.keyUsage);
  const eku = f.extensions.get(OID.extKeyUsage);
  const uris = san ? readSubjectAltName(san.value).uris : [];
  const keyUsages = ku ? readKeyUsage(ku.value) : [];
  let spiffeId: SpiffeId | undefined;
  if (uris.length === 1) {
    try {
      spiffeId = parseSpiffeId(uris[0]!);
    } catch {
      spiffeId = undefined;
    }
  }
  return {
    pem: toPem(der, 'CERTIFICATE'),
    serial: f.serial,
    subject: f.subject,
    notBefore: f.notBefore,
    notAfter: f.notAfter,
    isCa: bc ? readBasicConstraints(bc.value).ca : false,
    uris,
    spiffeId,
    keyUsage: ku
      ? { digitalSignature: keyUsages.includes('digitalSignature'), keyCertSign: keyUsages.includes('keyCertSign'), cRLSign: keyUsages.includes('cRLSign'), critical: ku.critical }
      : undefined,
    eku: eku ? readExtKeyUsage(eku.value) : [],
    fingerprint: createHash('sha256').update(der).digest('hex'),
    keyUsages,
    publicKey: publicKeyInfo(cert),
  };
}

/** Parses a certificate with node:crypto, then reads it; throws KNIT_ERR_CERT on garbage. */
function parseWith(input: string | Buffer, what: string): CertInfo {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(input);
  } catch (e) {
    throw new KnitError('KNIT_ERR_CERT', `not a ${what} X.509 certificate: ${(e as Error).message}`, { cause: e });
  }
  return infoOf(cert);
}

/** Parses one PEM certificate (the first, if `pem` holds several); throws KNIT_ERR_CERT on garbage. */
export function certInfo(pem: string): CertInfo {
  return parseWith(pem, 'PEM');
}

/** Parses one DER certificate (as TLS sockets hand it over); throws KNIT_ERR_CERT on garbage. */
export function certInfoFromDer(der: Buffer): CertInfo {
  return parseWith(der, 'DER');
}

/** Splits a PEM bundle into its certificates. */
export function splitPem(bundle: string): string[] {
  return bundle.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
}
