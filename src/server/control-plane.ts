/**
 * The control plane: the CA (its key stays here, written 0600), the trust
 * domain, the intentions, the node records and the join tokens. `knit dev`
 * runs it in-process; `knit server` puts an HTTPS API in front of it.
 *
 * It decides identity: a service leaf is signed only for a service the
 * calling node is allowed to run (its node record, written by the operator
 * through join tokens and `knit node set`), never because an agent says it
 * runs it. Everything it keeps in the registry is signed by its document
 * signer (a short-lived `spiffe://<td>/server/<name>` leaf whose key lives
 * only in this process), so that the registry is storage, not authority.
 */
import { randomUUID } from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CertificateAuthority, DEFAULT_LEAF_TTL_MS, createCsr, importKeyPair, type SignedLeaf } from '../identity/ca.js';
import { serverId, serviceId, validateTrustDomain } from '../identity/spiffe.js';
import type { SignerMaterial } from '../identity/signed-doc.js';
import { IntentionStore } from '../policy/store.js';
import type { Action, IntentionSet } from '../policy/intentions.js';
import { refusal } from '../policy/nodes.js';
import { KV_KEYS, type Registry } from '../registry/registry.js';
import { SignedKv } from '../registry/signed-kv.js';
import { writeFileAtomic } from '../files.js';
import { KnitError } from '../errors.js';
import { EVENTS, type Logger } from '../log/logger.js';
import type { CertSigner } from '../identity/leaf.js';
import { NodeStore } from './nodes.js';
import { JoinTokens } from './tokens.js';
import { VipStore } from './vips.js';
import { DEFAULT_VIP_RANGE } from '../proxy/transparent/vips.js';

export interface ControlPlaneOptions {
  dataDir: string;
  registry: Registry;
  /** This server's name: its signer is `spiffe://<td>/server/<name>`. */
  name: string;
  /** Used only when the CA is created; a new `<uuid>.knit` otherwise. */
  trustDomain?: string;
  /** The default intention written when the registry has no intentions yet. */
  initialDefault: Action;
  leafTtlMs?: number;
  namespace?: string;
  /** Where transparent mode's virtual IPs come from (240.240.0.0/16). */
  vipRange?: string;
  log: Logger;
  now?: () => Date;
}

/** The `kind` the trust bundle document is signed as. */
export const ROOTS_KIND = 'trust-bundle';

async function readIfExists(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

/**
 * The document signer's leaf: issued by the CA in-process (no network),
 * re-issued on use once past half its life, so that a signature is always
 * made by a currently valid certificate.
 */
class DocumentSigner {
  private cur: { material: SignerMaterial; renewAt: number } | undefined;
  private issuing: Promise<SignerMaterial> | undefined;

  constructor(private readonly ca: CertificateAuthority, private readonly name: string, private readonly ttlMs: number, private readonly now: () => Date) {}

  material(): Promise<SignerMaterial> {
    if (this.cur && this.now().getTime() < this.cur.renewAt) return Promise.resolve(this.cur.material);
    this.issuing ??= (async () => {
      const id = serverId(this.ca.trustDomain, this.name);
      const { keyPem, csrPem } = await createCsr(id);
      const now = this.now();
      const leaf = await this.ca.signCsr(csrPem, id, { ttlMs: this.ttlMs, now });
      const material = { chainPem: [leaf.certPem, ...leaf.chainPem], privateKey: (await importKeyPair(keyPem)).keys.privateKey };
      this.cur = { material, renewAt: now.getTime() + (leaf.notAfter.getTime() - now.getTime()) / 2 };
      return material;
    })().finally(() => (this.issuing = undefined));
    return this.issuing;
  }
}

/** The CA, intentions, node records and join tokens, backed by a data dir and a registry. */
export class ControlPlane {
  readonly kv: SignedKv;
  readonly intentions: IntentionStore;
  readonly nodes: NodeStore;
  readonly tokens: JoinTokens;
  readonly vips: VipStore;

  private constructor(
    readonly ca: CertificateAuthority,
    private readonly o: ControlPlaneOptions,
    /** The intentions in force when the control plane opened. */
    public initialIntentions: IntentionSet,
    readonly created: boolean,
  ) {
    const now = o.now ?? (() => new Date());
    const signer = new DocumentSigner(ca, o.name, o.leafTtlMs ?? DEFAULT_LEAF_TTL_MS, now);
    this.kv = new SignedKv({ registry: o.registry, trust: () => ({ roots: this.trustBundle(), trustDomain: ca.trustDomain }), signer: () => signer.material() });
    this.intentions = new IntentionStore(this.kv);
    this.nodes = new NodeStore(this.kv, now);
    this.tokens = new JoinTokens(this.kv, () => ca.rootPem, now);
    this.vips = new VipStore(this.kv, o.vipRange ?? DEFAULT_VIP_RANGE);
  }

  get trustDomain(): string {
    return this.ca.trustDomain;
  }

  /** Loads the CA from `<dataDir>/ca`, or creates it (and the trust domain) on first start. */
  static async open(o: ControlPlaneOptions): Promise<ControlPlane> {
    const dir = join(o.dataDir, 'ca');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const certPath = join(dir, 'root.pem');
    const keyPath = join(dir, 'root.key');
    const [certPem, keyPem] = await Promise.all([readIfExists(certPath), readIfExists(keyPath)]);
    let ca: CertificateAuthority;
    let created = false;
    if (certPem && keyPem) {
      ca = await CertificateAuthority.load({ certPem, keyPem });
    } else if (certPem || keyPem) {
      throw new KnitError('KNIT_ERR_CA', `${dir} holds only one of root.pem and root.key; restore the other or move both away to make a new CA`);
    } else {
      const td = validateTrustDomain(o.trustDomain ?? `${randomUUID()}.knit`);
      ca = await CertificateAuthority.create(td);
      const m = ca.material();
      // Key first: a crash between the two writes leaves a key without a cert, which the check above reports.
      await writeFileAtomic(keyPath, m.keyPem, 0o600);
      await writeFileAtomic(certPath, m.certPem, 0o644);
      created = true;
      o.log.info({ event: EVENTS.caCreated, trustDomain: td }, `created CA for trust domain ${td}`);
    }
    const cp = new ControlPlane(ca, o, { defaultAction: o.initialDefault, intentions: [] }, created);
    await cp.kv.replace(KV_KEYS.caRoots, ROOTS_KIND, { roots: cp.trustBundle() });
    try {
      cp.initialIntentions = await cp.intentions.seed({ defaultAction: o.initialDefault, intentions: [] });
    } catch (e) {
      if (!(e instanceof KnitError) || e.code !== 'KNIT_ERR_SIGNATURE') throw e;
      // Agents refuse it too and keep their last good set; the operator puts it right with a full apply.
      o.log.error({ event: EVENTS.documentRefused, kind: 'intentions', err: e.message }, `the intentions stored in the registry are not this control plane's (${e.message}): re-apply them with knit intention apply -f FILE`);
    }
    return cp;
  }

  trustBundle(): string[] {
    return [this.ca.rootPem];
  }

  private async signFor(service: string, csrPem: string): Promise<SignedLeaf> {
    // Every service that carries mesh traffic gets its virtual IP with its first certificate. A registry
    // hiccup here costs only the name (retried at the next signing), never the certificate.
    await this.vips.ensure(service).catch((e: Error) => this.o.log.warn({ event: EVENTS.registryError, service, err: e.message }, `no virtual IP for ${service} yet: ${e.message}`));
    return this.ca.signCsr(csrPem, serviceId(this.trustDomain, service, this.o.namespace), { ttlMs: this.o.leafTtlMs ?? DEFAULT_LEAF_TTL_MS });
  }

  /**
   * Signs a CSR for `service` on behalf of `node`. Refuses
   * (KNIT_ERR_UNAUTHORIZED, with the command that would allow it) when the
   * node is unknown, revoked, or not allowed to run the service.
   */
  async signService(node: string, service: string, csrPem: string): Promise<SignedLeaf> {
    const rec = await this.nodes.get(node);
    const why = refusal(rec, node, service);
    if (why) throw new KnitError('KNIT_ERR_UNAUTHORIZED', why);
    const leaf = await this.signFor(service, csrPem);
    await this.nodes.touch(rec!).catch(() => undefined);
    return leaf;
  }

  /**
   * A signer for the agent inside the same process (`knit dev`): one host
   * runs the whole mesh from one config dir that the same user controls,
   * so every service of it is allowed; there are no node records.
   */
  localSigner(): CertSigner {
    return {
      signService: (service, csrPem) => this.signFor(service, csrPem),
      trustBundle: async () => this.trustBundle(),
    };
  }
}
