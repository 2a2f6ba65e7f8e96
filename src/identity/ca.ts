/**
 * The certificate authority: a self-signed EC P-256 root (10 years) whose
 * key never leaves the control plane, and the signing of leaf CSRs made by
 * agents. The CA, not the CSR, decides the identity: a CSR must ask for
 * exactly the SPIFFE ID the caller is entitled to, or it is refused.
 *
 * Leaves follow the X.509-SVID rules: exactly one URI SAN, cA=false,
 * critical KeyUsage digitalSignature only, EKU serverAuth + clientAuth,
 * clamped to the root's expiry.
 *
 * The one place that touches the x509 library (@peculiar/x509, with the
 * tsyringe and reflect-metadata it needs): making certificates is the
 * control plane's job, and only the control plane imports this module.
 * An agent makes its CSR and reads certificates with node:crypto (csr.ts,
 * x509.ts), sparing it the ~20 MB these libraries cost to load. ECDSA
 * P-256 with SHA-256 throughout: it is what SPIFFE implementations and
 * Linkerd use, and a P-256 handshake measured 5.7 ms here against 14 ms
 * for RSA.
 */
// @peculiar/x509 resolves its parsers through tsyringe, which needs the Reflect metadata polyfill.
import 'reflect-metadata';
import { createPublicKey, randomBytes, webcrypto } from 'node:crypto';
import { isIP } from 'node:net';
import * as x509 from '@peculiar/x509';
import { KnitError } from '../errors.js';
import { trustDomainId, type SpiffeId } from './spiffe.js';
import { certInfo, EKU, type CertInfo } from './x509.js';
import { CLOCK_SKEW_MS, type SignedLeaf } from './csr.js';

x509.cryptoProvider.set(webcrypto as unknown as Crypto);

// What agents and the control plane share, re-exported for the control plane's (and tests') convenience.
export { createCsr, validateLeaf, type SignedLeaf } from './csr.js';

export const EC_ALG = { name: 'ECDSA', namedCurve: 'P-256' } as const;
export const SIGN_ALG = { name: 'ECDSA', hash: 'SHA-256' } as const;

/** A key pair as PEM plus the live key for signing. */
export interface KeyPair {
  privateKeyPem: string;
  keys: CryptoKeyPair;
}

/** Makes a new EC P-256 key pair, exportable so it can be written to disk. */
export async function generateKeyPair(): Promise<KeyPair> {
  const keys = (await webcrypto.subtle.generateKey(EC_ALG, true, ['sign', 'verify']));
  const pkcs8 = await webcrypto.subtle.exportKey('pkcs8', keys.privateKey);
  return { keys, privateKeyPem: x509.PemConverter.encode(pkcs8, 'PRIVATE KEY') };
}

/** Imports a PKCS#8 PEM private key with its public half (derived from the JWK). */
export async function importKeyPair(privateKeyPem: string): Promise<KeyPair> {
  try {
    const der = x509.PemConverter.decodeFirst(privateKeyPem);
    const privateKey = await webcrypto.subtle.importKey('pkcs8', der, EC_ALG, true, ['sign']);
    const jwk = await webcrypto.subtle.exportKey('jwk', privateKey);
    delete jwk.d;
    jwk.key_ops = ['verify'];
    const publicKey = await webcrypto.subtle.importKey('jwk', jwk, EC_ALG, true, ['verify']);
    return { privateKeyPem, keys: { privateKey, publicKey } };
  } catch (e) {
    throw new KnitError('KNIT_ERR_CERT', `not an EC P-256 PKCS#8 private key: ${(e as Error).message}`, { cause: e });
  }
}

export { x509 };

export const ROOT_TTL_MS = 10 * 365 * 24 * 3600 * 1000;
export const DEFAULT_LEAF_TTL_MS = 24 * 3600 * 1000;
/** Backdating absorbs clock skew between hosts: as much as validateLeaf tolerates. */
const BACKDATE_MS = CLOCK_SKEW_MS;
/**
 * Shortest leaf the CA signs: below this, renewal churn outweighs any
 * benefit. Ten seconds lets a test watch a certificate expire; fleets use hours.
 */
export const MIN_LEAF_TTL_MS = 10_000;

/** What a CA persists: its certificate and its private key (to be written 0600). */
export interface CaMaterial {
  certPem: string;
  keyPem: string;
}

function serial(): string {
  // 128 random bits, top bit cleared so the DER integer stays positive.
  const b = randomBytes(16);
  b[0] = b[0]! & 0x7f;
  return b.toString('hex');
}

/** A CA that can sign leaves. */
export class CertificateAuthority {
  /** The root's subject as encoded, so that leaves name their issuer byte for byte. */
  private readonly issuer: x509.Name;

  private constructor(
    readonly trustDomain: string,
    readonly root: CertInfo,
    private readonly key: KeyPair,
  ) {
    this.issuer = new x509.X509Certificate(root.pem).subjectName;
  }

  /** The root certificate, PEM. */
  get rootPem(): string {
    return this.root.pem;
  }

  /** Creates a new root for a trust domain. */
  static async create(trustDomain: string, now = new Date(), ttlMs = ROOT_TTL_MS): Promise<CertificateAuthority> {
    const key = await generateKeyPair();
    const id = trustDomainId(trustDomain);
    const cert = await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber: serial(),
      name: `CN=knit root CA ${trustDomain.slice(0, 40)}, O=knit`,
      notBefore: new Date(now.getTime() - BACKDATE_MS),
      notAfter: new Date(now.getTime() + ttlMs),
      signingAlgorithm: SIGN_ALG,
      keys: key.keys,
      extensions: [
        new x509.BasicConstraintsExtension(true, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign | x509.KeyUsageFlags.digitalSignature, true),
        new x509.SubjectAlternativeNameExtension([{ type: 'url', value: id.uri }]),
        await x509.SubjectKeyIdentifierExtension.create(key.keys.publicKey),
      ],
    });
    return new CertificateAuthority(trustDomain, certInfo(cert.toString('pem')), key);
  }

  /** Loads a CA from its persisted material; checks the key matches the certificate. */
  static async load(material: CaMaterial): Promise<CertificateAuthority> {
    const info = certInfo(material.certPem);
    const td = info.spiffeId?.trustDomain;
    if (!info.isCa || !td || info.spiffeId?.path !== '') throw new KnitError('KNIT_ERR_CA', 'CA certificate is not a knit root (cA=true with a trust-domain URI SAN)');
    const key = await importKeyPair(material.keyPem);
    const spki = await x509.PublicKey.create(key.keys.publicKey);
    const certKey = new x509.X509Certificate(material.certPem).publicKey;
    if (Buffer.compare(Buffer.from(spki.rawData), Buffer.from(certKey.rawData)) !== 0) {
      throw new KnitError('KNIT_ERR_CA', 'CA private key does not match the CA certificate');
    }
    return new CertificateAuthority(td, info, key);
  }

  /** The material to persist; the key must be written 0600 and never sent anywhere. */
  material(): CaMaterial {
    return { certPem: this.root.pem, keyPem: this.key.privateKeyPem };
  }

  /**
   * Signs a CSR for exactly `id`. Refuses (KNIT_ERR_CA) a CSR with a bad
   * signature, a key other than EC P-256, a URI SAN other than `id`, more
   * than one URI SAN, or an ID from another trust domain. The leaf is
   * clamped to the root's expiry.
   */
  async signCsr(csrPem: string, id: SpiffeId, opts: { ttlMs?: number; now?: Date; extraNames?: string[] } = {}): Promise<SignedLeaf> {
    const now = opts.now ?? new Date();
    const ttl = opts.ttlMs ?? DEFAULT_LEAF_TTL_MS;
    if (ttl < MIN_LEAF_TTL_MS) throw new KnitError('KNIT_ERR_CA', `leaf TTL ${ttl} ms is below the minimum of ${MIN_LEAF_TTL_MS} ms`);
    if (id.trustDomain !== this.trustDomain) throw new KnitError('KNIT_ERR_CA', `${id.uri} is not in trust domain ${this.trustDomain}`);
    let csr: x509.Pkcs10CertificateRequest;
    try {
      csr = new x509.Pkcs10CertificateRequest(csrPem);
    } catch (e) {
      throw new KnitError('KNIT_ERR_CA', `not a PEM PKCS#10 CSR: ${(e as Error).message}`, { cause: e });
    }
    const alg = csr.publicKey.algorithm as EcKeyAlgorithm;
    if (alg.name !== 'ECDSA' || alg.namedCurve !== 'P-256') throw new KnitError('KNIT_ERR_CA', `CSR key must be EC P-256, got ${alg.name} ${alg.namedCurve ?? ''}`.trim());
    if (!(await csr.verify())) throw new KnitError('KNIT_ERR_CA', 'CSR signature does not verify');
    const sans = csr.extensions.filter((e): e is x509.SubjectAlternativeNameExtension => e instanceof x509.SubjectAlternativeNameExtension);
    if (sans.length > 1) throw new KnitError('KNIT_ERR_CA', 'CSR carries more than one SAN extension');
    const names = sans[0]?.names.items ?? [];
    const uris = names.filter((n) => n.type === 'url').map((n) => n.value);
    if (uris.length !== 1) throw new KnitError('KNIT_ERR_CA', `CSR must carry exactly one URI SAN, found ${uris.length}`);
    if (names.length !== 1) throw new KnitError('KNIT_ERR_CA', 'CSR must carry no SAN other than its SPIFFE ID');
    if (uris[0] !== id.uri) throw new KnitError('KNIT_ERR_CA', `CSR asks for ${uris[0]} but the caller may only have ${id.uri}`);

    const notAfter = new Date(Math.min(now.getTime() + ttl, this.root.notAfter.getTime()));
    const publicKey = await csr.publicKey.export();
    const leaf = await x509.X509CertificateGenerator.create({
      serialNumber: serial(),
      subject: `CN=${id.path.split('/').pop() ?? id.trustDomain}, O=knit`,
      issuer: this.issuer,
      notBefore: new Date(now.getTime() - BACKDATE_MS),
      notAfter,
      signingAlgorithm: SIGN_ALG,
      publicKey,
      signingKey: this.key.keys.privateKey,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
        new x509.ExtendedKeyUsageExtension([EKU.serverAuth, EKU.clientAuth], false),
        new x509.SubjectAlternativeNameExtension(
          [
            { type: 'url', value: id.uri },
            // Only for the control plane's own HTTPS certificate (app/server.ts); agents' requests never set it.
            ...(opts.extraNames ?? []).map((n) => (isIP(n) ? { type: 'ip' as const, value: n } : { type: 'dns' as const, value: n })),
          ],
          true,
        ),
        await x509.SubjectKeyIdentifierExtension.create(publicKey),
        await x509.AuthorityKeyIdentifierExtension.create(this.key.keys.publicKey),
      ],
    });
    return { certPem: leaf.toString('pem'), chainPem: [], notAfter };
  }
}

/** What the control plane reads from a CSR before deciding: its key (SPKI PEM) and the URI it asks for. */
export function csrInfo(csrPem: string): { publicKey: string; uri?: string } {
  let csr: x509.Pkcs10CertificateRequest;
  try {
    csr = new x509.Pkcs10CertificateRequest(csrPem);
  } catch (e) {
    throw new KnitError('KNIT_ERR_CA', `not a PEM PKCS#10 CSR: ${(e as Error).message}`, { cause: e });
  }
  const der = Buffer.from(csr.publicKey.rawData);
  const publicKey = createPublicKey({ key: der, format: 'der', type: 'spki' }).export({ type: 'spki', format: 'pem' }).toString();
  const san = csr.extensions.find((e): e is x509.SubjectAlternativeNameExtension => e instanceof x509.SubjectAlternativeNameExtension);
  return { publicKey, uri: san?.names.items.find((n) => n.type === 'url')?.value };
}
