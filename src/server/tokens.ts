/**
 * Join tokens: single use, expiring, for enrolling an agent once. A token
 * reads `knit.<id>.<secret>.<ca-sha256>`: the last part lets a new agent
 * check that it talks to the right control plane before it trusts it (as
 * kubeadm's discovery hash does). Only a hash of the secret is stored, in
 * the registry KV under `tokens/<id>`; redeeming deletes it with a
 * compare-and-set, so two agents racing on one token cannot both win.
 */
import { createHash, randomBytes, timingSafeEqual, X509Certificate } from 'node:crypto';
import { KnitError } from '../errors.js';
import type { Registry } from '../registry/registry.js';

export const DEFAULT_TOKEN_TTL_MS = 3600_000;

interface StoredToken {
  hash: string;
  expiresAt: string;
}

const sha256 = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

/** SHA-256 of a root certificate's DER, as join tokens carry it. */
export function caHash(rootPem: string): string {
  return sha256(new X509Certificate(rootPem).raw);
}

/** The parts of a join token; throws KNIT_ERR_BAD_REQUEST on a malformed one. */
export function parseJoinToken(token: string): { id: string; secret: string; caHash: string } {
  const m = /^knit\.([0-9a-f]{16})\.([0-9a-f]{64})\.([0-9a-f]{64})$/.exec(token.trim());
  if (!m) throw new KnitError('KNIT_ERR_BAD_REQUEST', 'malformed join token (expected knit.<id>.<secret>.<ca-hash>, as `knit token create` prints)');
  return { id: m[1]!, secret: m[2]!, caHash: m[3]! };
}

export class JoinTokens {
  constructor(private readonly registry: Registry, private readonly rootPem: () => string, private readonly now: () => Date = () => new Date()) {}

  /** Creates a token valid for `ttlMs`. */
  async create(ttlMs = DEFAULT_TOKEN_TTL_MS): Promise<{ token: string; expiresAt: string }> {
    const id = randomBytes(8).toString('hex');
    const secret = randomBytes(32).toString('hex');
    const expiresAt = new Date(this.now().getTime() + ttlMs).toISOString();
    await this.registry.kvSet(`tokens/${id}`, JSON.stringify({ hash: sha256(secret), expiresAt } satisfies StoredToken), 0);
    return { token: `knit.${id}.${secret}.${caHash(this.rootPem())}`, expiresAt };
  }

  /** Uses up a token; rejects KNIT_ERR_UNAUTHORIZED when it is unknown, used, wrong or expired. */
  async redeem(token: string): Promise<void> {
    const { id, secret } = parseJoinToken(token);
    const refused = (why: string): KnitError => new KnitError('KNIT_ERR_UNAUTHORIZED', `join token ${id}: ${why}`);
    const entry = await this.registry.kvGet(`tokens/${id}`);
    if (!entry) throw refused('unknown or already used');
    const stored = JSON.parse(entry.value) as StoredToken;
    const a = Buffer.from(stored.hash, 'hex');
    const b = Buffer.from(sha256(secret), 'hex');
    if (a.length !== b.length || !timingSafeEqual(a, b)) throw refused('wrong secret');
    try {
      await this.registry.kvDelete(`tokens/${id}`, entry.version);
    } catch {
      throw refused('already used');
    }
    if (Date.parse(stored.expiresAt) <= this.now().getTime()) throw refused(`expired at ${stored.expiresAt}; create a new one with knit token create`);
  }
}
