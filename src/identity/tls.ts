/**
 * The TLS material a local service (or the agent itself) presents and
 * trusts, and the secure contexts made from it: once per certificate, not
 * per connection (building key/cert/ca into every connect makes a new
 * OpenSSL context each time, a quarter of a proxy's connection rate).
 */
import tls from 'node:tls';

/** What a service presents and trusts. */
export interface ServiceTls {
  /** PEM of the leaf followed by any intermediates. */
  certChainPem: string;
  keyPem: string;
  /** Roots a peer must chain to. */
  trustBundlePem: string[];
}

/** TLS options for a service's current material (TLS 1.3 only: no legacy ciphers to audit). */
export function tlsOptions(t: ServiceTls): tls.SecureContextOptions {
  return { cert: t.certChainPem, key: t.keyPem, ca: t.trustBundlePem, minVersion: 'TLSv1.3' };
}

/** A client secure context for a service's current material, built once per renewal. */
export function secureContext(t: ServiceTls): tls.SecureContext {
  return tls.createSecureContext(tlsOptions(t));
}
