/**
 * Hostile peer certificates made with the openssl CLI, not with knit's own
 * generator: a validator tested only against certificates its own code
 * made tends to share that code's blind spots. Leaves are signed with the
 * real CA key (so they reach knit's own checks past OpenSSL's chain
 * verification), except the cases whose point is a bad chain.
 *
 * Every case is made with `openssl genpkey` + `openssl req -new` and signed
 * with `openssl x509 -req -extfile` (or `openssl ca` where only it can set
 * the validity dates: OpenSSL 3.0's `x509` has no `-not_before`).
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const OPENSSL = process.env.KNIT_TEST_OPENSSL ?? '/usr/bin/openssl';

/** A certificate as a peer presents it. */
export interface OpensslLeaf {
  /** The leaf PEM followed by whatever intermediates the peer sends. */
  certChainPem: string;
  keyPem: string;
}

/** Every certificate the suite makes; `good` is the control that must be accepted. */
export const HOSTILE_CASES = [
  'good',
  'other-ca',
  'expired',
  'not-yet-valid',
  'two-uri-sans',
  'no-uri-san',
  'non-spiffe-uri',
  'ca-leaf',
  'leaf-signed-by-leaf',
  'wrong-trust-domain',
  'agent-id',
  'server-id',
  'other-namespace',
  'key-cert-sign',
  'crl-sign',
  'no-key-usage',
  'key-agreement-only',
  'rsa-1024',
  'rsa-2048',
  'ec-p384',
  'no-eku',
  'eku-server-only',
  'eku-client-only',
] as const;
export type HostileCase = (typeof HOSTILE_CASES)[number];

export interface OpensslCertsOptions {
  /** The trusted CA (e.g. `CertificateAuthority.create(td)` then `.material()`). */
  caCertPem: string;
  caKeyPem: string;
  trustDomain: string;
  /** The service the peer claims to be. */
  service: string;
  /** The namespace the good leaf is in; 'default' unless told. */
  namespace?: string;
}

export interface OpensslCerts {
  leaves: Record<HostileCase, OpensslLeaf>;
  /** The second, untrusted CA that signs the `other-ca` leaf. */
  otherCaPem: string;
  /** Removes the temporary directory (keys included). */
  cleanup(): Promise<void>;
}

type KeyKind = 'ec-p256' | 'ec-p384' | 'rsa-1024' | 'rsa-2048';

interface Spec {
  key?: KeyKind;
  uris: string[];
  /** Extension lines, replacing the good leaf's lines of the same name; `null` drops that extension. */
  ext?: Record<string, string | null>;
  signer?: 'ca' | 'other-ca' | 'leaf';
  /** Validity as offsets from now, in ms; default -1 min .. +1 h. */
  validity?: [number, number];
}

/** The extensions knit's CA gives a leaf (X.509-SVID): the control every case departs from. */
const GOOD_EXT: Record<string, string> = {
  basicConstraints: 'critical,CA:FALSE',
  keyUsage: 'critical,digitalSignature',
  extendedKeyUsage: 'serverAuth,clientAuth',
  subjectKeyIdentifier: 'hash',
};

/** A minimal config, so that the host's openssl.cnf cannot add extensions of its own. */
const REQ_CNF = '[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n';

async function openssl(args: string[], cwd: string): Promise<void> {
  try {
    await run(OPENSSL, args, { cwd, env: { ...process.env, OPENSSL_CONF: join(cwd, 'req.cnf') } });
  } catch (e) {
    const err = e as Error & { stderr?: string };
    throw new Error(`openssl ${args.join(' ')} failed: ${err.stderr ?? err.message}`, { cause: e });
  }
}

const genKeyArgs: Record<KeyKind, string[]> = {
  'ec-p256': ['-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256'],
  'ec-p384': ['-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-384'],
  'rsa-1024': ['-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:1024'],
  'rsa-2048': ['-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:2048'],
};

/** `YYMMDDHHMMSSZ`, the UTCTime form `openssl ca -startdate` takes. */
function utcTime(d: Date): string {
  return d.toISOString().replace(/[-:T]/g, '').slice(2, 14) + 'Z';
}

/** Writes an extfile with section [v3]. */
function extFile(uris: string[], over: Record<string, string | null> = {}): string {
  const lines: Record<string, string | null> = { ...GOOD_EXT, ...(uris.length ? { subjectAltName: uris.map((u) => `URI:${u}`).join(',') } : {}), ...over };
  return '[v3]\n' + Object.entries(lines).filter(([, v]) => v !== null).map(([k, v]) => `${k} = ${v}`).join('\n') + '\n';
}

/**
 * Makes every case of HOSTILE_CASES for `service` in a fresh temp dir.
 * The CA key is written there (0600) only for as long as openssl needs it.
 */
export async function makeOpensslCerts(o: OpensslCertsOptions): Promise<OpensslCerts> {
  const dir = await mkdtemp(join(tmpdir(), 'knit-openssl-'));
  try {
    await writeFile(join(dir, 'req.cnf'), REQ_CNF);
    await writeFile(join(dir, 'ca.pem'), o.caCertPem);
    await writeFile(join(dir, 'ca.key'), o.caKeyPem, { mode: 0o600 });

    // A second CA, made by openssl and trusted by nobody.
    await writeFile(join(dir, 'other-ca.cnf'), `${REQ_CNF}CN = other CA\n[v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\nsubjectAltName = URI:spiffe://${o.trustDomain}\n`);
    await openssl(['genpkey', ...genKeyArgs['ec-p256'], '-out', 'other-ca.key'], dir);
    await openssl(['req', '-new', '-x509', '-config', 'other-ca.cnf', '-extensions', 'v3_ca', '-key', 'other-ca.key', '-days', '2', '-sha256', '-out', 'other-ca.pem'], dir);

    const td = o.trustDomain;
    const ns = o.namespace ?? 'default';
    const id = `spiffe://${td}/ns/${ns}/svc/${o.service}`;
    const hour = 3600_000;
    const day = 24 * hour;
    const specs: Record<HostileCase, Spec> = {
      good: { uris: [id] },
      'other-ca': { uris: [id], signer: 'other-ca' },
      expired: { uris: [id], validity: [-3 * day, -day] },
      'not-yet-valid': { uris: [id], validity: [day, 3 * day] },
      'two-uri-sans': { uris: [id, `spiffe://${td}/ns/${ns}/svc/db`] },
      'no-uri-san': { uris: [], ext: { subjectAltName: `DNS:${o.service}.example` } },
      'non-spiffe-uri': { uris: [`https://evil.example/${o.service}`] },
      'ca-leaf': { uris: [id], ext: { basicConstraints: 'critical,CA:TRUE', keyUsage: 'critical,digitalSignature,keyCertSign' } },
      'leaf-signed-by-leaf': { uris: [id], signer: 'leaf' },
      'wrong-trust-domain': { uris: [`spiffe://other.knit/ns/${ns}/svc/${o.service}`] },
      'agent-id': { uris: [`spiffe://${td}/agent/node-1`] },
      'server-id': { uris: [`spiffe://${td}/server/s1`] },
      'other-namespace': { uris: [`spiffe://${td}/ns/other/svc/${o.service}`] },
      'key-cert-sign': { uris: [id], ext: { keyUsage: 'critical,digitalSignature,keyCertSign' } },
      'crl-sign': { uris: [id], ext: { keyUsage: 'critical,digitalSignature,cRLSign' } },
      'no-key-usage': { uris: [id], ext: { keyUsage: null } },
      'key-agreement-only': { uris: [id], ext: { keyUsage: 'critical,keyAgreement' } },
      'rsa-1024': { uris: [id], key: 'rsa-1024', ext: { keyUsage: 'critical,digitalSignature,keyEncipherment' } },
      'rsa-2048': { uris: [id], key: 'rsa-2048', ext: { keyUsage: 'critical,digitalSignature,keyEncipherment' } },
      'ec-p384': { uris: [id], key: 'ec-p384' },
      'no-eku': { uris: [id], ext: { extendedKeyUsage: null } },
      'eku-server-only': { uris: [id], ext: { extendedKeyUsage: 'serverAuth' } },
      'eku-client-only': { uris: [id], ext: { extendedKeyUsage: 'clientAuth' } },
    };

    // The issuing leaf of `leaf-signed-by-leaf`: a good leaf (cA=false) of the real CA.
    const issuer = await makeLeaf(dir, 'issuing-leaf', { uris: [`spiffe://${td}/ns/${ns}/svc/issuer`] }, o.service);
    const entries = await Promise.all(
      HOSTILE_CASES.map(async (name) => {
        const leaf = await makeLeaf(dir, name, specs[name], o.service);
        // The peer sends the issuing leaf as its intermediate, so the chain is complete but invalid.
        return [name, name === 'leaf-signed-by-leaf' ? { ...leaf, certChainPem: leaf.certChainPem + issuer.certChainPem } : leaf] as const;
      }),
    );
    const leaves = Object.fromEntries(entries) as Record<HostileCase, OpensslLeaf>;
    const otherCaPem = await readFile(join(dir, 'other-ca.pem'), 'utf8');
    await rm(join(dir, 'ca.key'), { force: true });
    return { leaves, otherCaPem, cleanup: () => rm(dir, { recursive: true, force: true }) };
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e;
  }
}

async function makeLeaf(root: string, name: string, spec: Spec, service: string): Promise<OpensslLeaf> {
  const dir = join(root, name);
  await mkdir(dir);
  await writeFile(join(dir, 'ext.cnf'), extFile(spec.uris, spec.ext));
  await openssl(['genpkey', ...genKeyArgs[spec.key ?? 'ec-p256'], '-out', join(dir, 'key.pem')], root);
  await openssl(['req', '-new', '-config', 'req.cnf', '-key', join(dir, 'key.pem'), '-subj', `/CN=${service}/O=hostile ${name}`, '-out', join(dir, 'req.csr')], root);
  const [caCert, caKey] = spec.signer === 'other-ca' ? ['other-ca.pem', 'other-ca.key'] : spec.signer === 'leaf' ? [join('issuing-leaf', 'cert.pem'), join('issuing-leaf', 'key.pem')] : ['ca.pem', 'ca.key'];
  const serial = `0x${randomBytes(16).toString('hex').replace(/^./, '1')}`;
  const out = join(dir, 'cert.pem');
  if (!spec.validity) {
    await openssl(['x509', '-req', '-in', join(dir, 'req.csr'), '-CA', caCert, '-CAkey', caKey, '-set_serial', serial, '-days', '1', '-sha256', '-extfile', join(dir, 'ext.cnf'), '-extensions', 'v3', '-out', out], root);
  } else {
    // `openssl ca` is the only 3.0 command that sets both dates; it needs a little database.
    const now = Date.now();
    await writeFile(join(dir, 'index.txt'), '');
    await writeFile(join(dir, 'serial'), `${serial.slice(2)}\n`);
    await writeFile(join(dir, 'ca.cnf'), `[ca]\ndefault_ca = own\n[own]\ndatabase = ${join(dir, 'index.txt')}\nnew_certs_dir = ${dir}\nserial = ${join(dir, 'serial')}\ndefault_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\norganizationName = optional\n`);
    await openssl(['ca', '-batch', '-notext', '-config', join(dir, 'ca.cnf'), '-cert', caCert, '-keyfile', caKey, '-in', join(dir, 'req.csr'), '-startdate', utcTime(new Date(now + spec.validity[0])), '-enddate', utcTime(new Date(now + spec.validity[1])), '-extfile', join(dir, 'ext.cnf'), '-extensions', 'v3', '-out', out], root);
  }
  return { certChainPem: await readFile(out, 'utf8'), keyPem: await readFile(join(dir, 'key.pem'), 'utf8') };
}
