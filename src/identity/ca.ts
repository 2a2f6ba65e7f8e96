/**
 * The certificate authority: a self-signed EC P-256 root (10 years) whose
 * key never leaves the control plane, and the signing of leaf CSRs made by
 * agents. The CA, not the CSR, decides the identity: a CSR must ask for
 * exactly the SPIFFE ID the caller is entitled to, or it is refused.
 *
 * Leaves follow the X.509-SVID rules: exactly one URI SAN, cA=false,
 * critical KeyUsage digitalSignature only, EKU serverAuth + clientAuth,
 * clamped to the root's expiry.
 */
import { createPublicKey, randomBytes } from 'node:crypto';
import { isIP } from 'node:net';
import { KnitError } from '../errors.js';
import { trustDomainId, type SpiffeId } from './spiffe.js';
import { x509, generateKeyPair, importKeyPair, certInfo, SIGN_ALG, EKU, type KeyPair, type CertInfo } from './x509.js';

export const ROOT_TTL_MS = 10 * 365 * 24 * 3600 * 1000;
export const DEFAULT_LEAF_TTL_MS = 24 * 3600 * 1000;
/** Backdating absorbs clock skew between hosts (Linkerd allows 20 s; a minute costs nothing). */
const BACKDATE_MS = 60_000;
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

/** A signed leaf and the chain to send with it. */
export interface SignedLeaf {
  certPem: string;
  /** Intermediates between the leaf and the root (empty for a single-level CA). */
  chainPem: string[];
  notAfter: Date;
}

function serial(): string {
  // 128 random bits, top bit cleared so the DER integer stays positive.
  const b = randomBytes(16);
  b[0] = b[0]! & 0x7f;
  return b.toString('hex');
}

/** A CA that can sign leaves. */
export class CertificateAuthority {
  private constructor(
    readonly trustDomain: string,
    readonly root: CertInfo,
    private readonly key: KeyPair,
  ) {}

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
      issuer: this.root.subject,
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

/** Makes an agent-side key and a CSR for `id`; the private key never leaves the caller. */
export async function createCsr(id: SpiffeId): Promise<{ keyPem: string; csrPem: string }> {
  const key = await generateKeyPair();
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: `CN=${id.path.split('/').pop() ?? id.trustDomain}`,
    keys: key.keys,
    signingAlgorithm: SIGN_ALG,
    extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'url', value: id.uri }])],
  });
  return { keyPem: key.privateKeyPem, csrPem: csr.toString('pem') };
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
  if (info.notAfter <= now || info.notBefore > new Date(now.getTime() + BACKDATE_MS)) bad(`not valid now (valid ${info.notBefore.toISOString()} to ${info.notAfter.toISOString()})`);
  return info;
}
