/**
 * TLS pieces shared by the inbound and outbound proxies: the material a
 * service presents, and reading the SPIFFE ID of the peer. Node's default
 * `checkServerIdentity` only knows DNS names and rejects URI-only
 * certificates, so knit compares the peer's single URI SAN itself.
 */
import tls from 'node:tls';
import type { TLSSocket } from 'node:tls';
import { certInfoFromDer } from '../identity/x509.js';
import type { SpiffeId } from '../identity/spiffe.js';

/** What a service presents and trusts. */
export interface ServiceTls {
  /** PEM of the leaf followed by any intermediates. */
  certChainPem: string;
  keyPem: string;
  /** Roots a peer must chain to. */
  trustBundlePem: string[];
}

/** Why a peer's identity was not accepted; always a reason, never a bare null. */
export type PeerIdentity = { ok: true; id: SpiffeId } | { ok: false; reason: string };

/** Cache of parsed peer certificates by SHA-256 fingerprint: a peer reconnecting is not parsed again. */
const MAX_CACHE = 1024;

/** Reads and caches the SPIFFE identities of peers. */
export class PeerIdentityReader {
  private readonly cache = new Map<string, PeerIdentity>();

  /** The peer's identity: exactly one URI SAN, a valid SPIFFE ID in `trustDomain`. */
  read(socket: TLSSocket, trustDomain: string): PeerIdentity {
    const cert = socket.getPeerX509Certificate();
    if (!cert) return { ok: false, reason: 'peer presented no certificate' };
    const fp = cert.fingerprint256;
    let got = this.cache.get(fp);
    if (!got) {
      got = this.parse(cert.raw);
      if (this.cache.size >= MAX_CACHE) this.cache.delete(this.cache.keys().next().value!);
      this.cache.set(fp, got);
    }
    if (got.ok && got.id.trustDomain !== trustDomain) return { ok: false, reason: `peer ${got.id.uri} is not in trust domain ${trustDomain}` };
    return got;
  }

  private parse(der: Buffer): PeerIdentity {
    try {
      const info = certInfoFromDer(der);
      if (info.uris.length !== 1) return { ok: false, reason: `peer certificate has ${info.uris.length} URI SANs, an X.509-SVID has exactly one` };
      if (!info.spiffeId) return { ok: false, reason: `peer URI SAN ${info.uris[0]?.slice(0, 200)} is not a valid SPIFFE ID` };
      if (info.isCa) return { ok: false, reason: 'peer certificate is a CA certificate' };
      return { ok: true, id: info.spiffeId };
    } catch (e) {
      return { ok: false, reason: `peer certificate cannot be parsed: ${(e as Error).message}` };
    }
  }
}

/** TLS options for a service's current material (TLS 1.3 only: no legacy ciphers to audit). */
export function tlsOptions(t: ServiceTls): tls.SecureContextOptions {
  return { cert: t.certChainPem, key: t.keyPem, ca: t.trustBundlePem, minVersion: 'TLSv1.3' };
}

/** A client secure context for a service's current material, built once per renewal. */
export function secureContext(t: ServiceTls): tls.SecureContext {
  return tls.createSecureContext(tlsOptions(t));
}
