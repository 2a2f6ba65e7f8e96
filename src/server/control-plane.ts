/**
 * The control plane: the CA (its key stays here, written 0600), the trust
 * domain, and the intentions. `knit dev` runs it in-process; `knit server`
 * puts an HTTPS API in front of it.
 *
 * It signs a service leaf only for a node on which that service is
 * registered, so an agent cannot mint identities for services it does not
 * run.
 */
import { randomUUID } from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CertificateAuthority, DEFAULT_LEAF_TTL_MS, type SignedLeaf } from '../identity/ca.js';
import { serviceId, validateTrustDomain } from '../identity/spiffe.js';
import { IntentionStore } from '../policy/store.js';
import type { Action, IntentionSet } from '../policy/intentions.js';
import { KV_KEYS, type Registry } from '../registry/registry.js';
import { writeFileAtomic } from '../registry/embedded/embedded.js';
import { KnitError } from '../errors.js';
import { EVENTS, type Logger } from '../log/logger.js';
import type { CertSigner } from '../agent/certs.js';

export interface ControlPlaneOptions {
  dataDir: string;
  registry: Registry;
  /** Used only when the CA is created; a new `<uuid>.knit` otherwise. */
  trustDomain?: string;
  /** The default intention written when the registry has no intentions yet. */
  initialDefault: Action;
  leafTtlMs?: number;
  namespace?: string;
  log: Logger;
}

async function readIfExists(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

/** The CA plus intentions, backed by a data dir and a registry. */
export class ControlPlane {
  readonly intentions: IntentionStore;
  private constructor(
    readonly ca: CertificateAuthority,
    private readonly o: ControlPlaneOptions,
    /** The intentions in force when the control plane opened. */
    readonly initialIntentions: IntentionSet,
    readonly created: boolean,
  ) {
    this.intentions = new IntentionStore(o.registry);
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
    await o.registry.kvSet(KV_KEYS.caRoots, JSON.stringify([ca.rootPem]));
    const store = new IntentionStore(o.registry);
    const set = await store.seed({ defaultAction: o.initialDefault, intentions: [] });
    return new ControlPlane(ca, o, set, created);
  }

  trustBundle(): string[] {
    return [this.ca.rootPem];
  }

  /** Signs a CSR for `service` on behalf of `node`; refuses if the service is not registered there. */
  async signService(node: string, service: string, csrPem: string): Promise<SignedLeaf> {
    const instances = await this.o.registry.instances(service);
    if (!instances.some((i) => i.node === node)) {
      throw new KnitError('KNIT_ERR_UNAUTHORIZED', `service ${service} is not registered on node ${node}; refusing to sign`);
    }
    return this.ca.signCsr(csrPem, serviceId(this.trustDomain, service, this.o.namespace), { ttlMs: this.o.leafTtlMs ?? DEFAULT_LEAF_TTL_MS });
  }

  /** A signer for an agent in the same process (`knit dev`). */
  localSigner(node: string): CertSigner {
    return {
      signService: (service, csrPem) => this.signService(node, service, csrPem),
      trustBundle: async () => this.trustBundle(),
    };
  }
}
