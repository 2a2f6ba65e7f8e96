/**
 * Join tokens: single use, expiring, each bound to one node name and the
 * services that node may run. A token reads
 * `knit.<id>.<secret>.<ca-sha256>`: the last part lets a new agent check
 * that it talks to the right control plane before it trusts it (as
 * kubeadm's discovery hash does). The registry keeps, under `tokens/<id>`,
 * a document signed by the control plane with a hash of the secret, the
 * node, the services and the expiry: a registry writer can neither mint a
 * token nor widen one. A token is used up in the same compare-and-set that
 * records the node (server/nodes.ts), so a replay, or two agents racing on
 * one token, cannot enrol twice.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { KnitError } from '../errors.js';
import type { SignedKv } from '../registry/signed-kv.js';
import { validateSegment } from '../identity/spiffe.js';
import { validateAllowance } from '../policy/nodes.js';
import type { TokenGrant } from './nodes.js';
import { caHash, parseJoinToken } from '../identity/enrolment.js';

export const DEFAULT_TOKEN_TTL_MS = 3600_000;
/** The `kind` token documents are signed as. */
export const TOKEN_KIND = 'join-token';

interface StoredToken {
  id: string;
  hash: string;
  expiresAt: string;
  node: string;
  services: string[];
}

const sha256 = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

const keyOf = (id: string): string => `tokens/${id}`;

/** A created token, as `knit token create` prints it. */
export interface CreatedToken {
  token: string;
  expiresAt: string;
  node: string;
  services: string[];
}

export class JoinTokens {
  constructor(private readonly kv: SignedKv, private readonly rootPem: () => string, private readonly now: () => Date = () => new Date()) {}

  /** Creates a token for `node` allowing `services`, valid for `ttlMs`. */
  async create(node: string, services: string[], ttlMs = DEFAULT_TOKEN_TTL_MS): Promise<CreatedToken> {
    try {
      validateSegment(node, 'node name');
    } catch (e) {
      throw new KnitError('KNIT_ERR_BAD_REQUEST', (e as Error).message.replace(/^invalid SPIFFE ID [^:]*: /, ''));
    }
    const allowed = validateAllowance(services);
    const id = randomBytes(8).toString('hex');
    const secret = randomBytes(32).toString('hex');
    const expiresAt = new Date(this.now().getTime() + ttlMs).toISOString();
    const stored: StoredToken = { id, hash: sha256(secret), expiresAt, node, services: allowed };
    if (!(await this.kv.create(keyOf(id), TOKEN_KIND, stored))) throw new KnitError('KNIT_ERR_CAS_CONFLICT', `token id ${id} exists already; try again`);
    return { token: `knit.${id}.${secret}.${caHash(this.rootPem())}`, expiresAt, node, services: allowed };
  }

  /**
   * Checks a token and returns what it grants; rejects KNIT_ERR_UNAUTHORIZED
   * when it is unknown, used, forged (the stored document does not verify),
   * of the wrong secret or expired. Using it up is the caller's
   * compare-and-set on the node records (`NodeStore.enrol`), then `forget`.
   */
  async check(token: string): Promise<TokenGrant> {
    const { id, secret } = parseJoinToken(token);
    const refused = (why: string): KnitError => new KnitError('KNIT_ERR_UNAUTHORIZED', `join token ${id}: ${why}`);
    let got;
    try {
      got = await this.kv.read<StoredToken>(keyOf(id), TOKEN_KIND);
    } catch (e) {
      if (e instanceof KnitError && e.code === 'KNIT_ERR_SIGNATURE') throw refused(`its stored record is not the control plane's (${e.message}); refusing`);
      throw e;
    }
    const stored = got.doc?.body;
    if (!stored) throw refused('unknown or already used');
    if (stored.id !== id) throw refused('its stored record names another token; refusing');
    const a = Buffer.from(stored.hash, 'hex');
    const b = Buffer.from(sha256(secret), 'hex');
    if (a.length !== b.length || !timingSafeEqual(a, b)) throw refused('wrong secret');
    if (Date.parse(stored.expiresAt) <= this.now().getTime()) {
      await this.forget(id).catch(() => undefined);
      throw refused(`expired at ${stored.expiresAt}; create a new one with knit token create --node ${stored.node} --services ${stored.services.join(',')}`);
    }
    return { id, node: stored.node, services: stored.services, expiresAt: stored.expiresAt };
  }

  /** Removes a used or expired token's record. */
  async forget(id: string): Promise<void> {
    await this.kv.delete(keyOf(id));
  }
}
