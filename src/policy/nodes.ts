/**
 * Which node may run which service: the control plane's node records, as
 * one signed document in the registry (`nodes`). The server writes it on
 * enrolment, `knit node set` and `knit node revoke`; agents read it to
 * route only to instances that a node is allowed to run and that is not
 * revoked (a registry writer cannot add a node or widen an allowance).
 *
 * An allowance is a list of service names, each exact or ending in one
 * `*` that matches any rest (`web-*`); `*` alone allows every service.
 */
import { KnitError } from '../errors.js';
import { validateSegment } from '../identity/spiffe.js';

/** The registry key and the `kind` the nodes document is signed as. */
export const NODES_KEY = 'nodes';
export const NODES_KIND = 'nodes';

/** What the control plane knows of one node. */
export interface NodeRecord {
  node: string;
  /** Services the node may run: names or trailing-`*` globs. */
  services: string[];
  /** SPKI PEM of the agent's current key. */
  publicKey?: string;
  /** The key before the last renewal: an agent that lost the answer to its renewal is not locked out. */
  previousPublicKey?: string;
  /** When the agent's current certificate expires (ISO). */
  agentCertExpires?: string;
  enrolledAt?: string;
  lastSeen?: string;
  /** Set by `knit node revoke`: no renewal, no signing, instances ignored. */
  revokedAt?: string;
}

/** The signed document: every node, and the join tokens already used (so none can be replayed). */
export interface NodesDocument {
  nodes: Record<string, NodeRecord>;
  /** Used token id -> its expiry (ISO); pruned once expired, when a token is refused anyway. */
  usedTokens: Record<string, string>;
}

/** Checks an allowance list; throws KNIT_ERR_BAD_REQUEST naming the bad entry. */
export function validateAllowance(list: unknown): string[] {
  if (!Array.isArray(list) || list.length === 0) throw new KnitError('KNIT_ERR_BAD_REQUEST', '"services" must be a non-empty list of service names (a trailing * is a glob: web-*)');
  return list.map((s) => {
    if (typeof s !== 'string') throw new KnitError('KNIT_ERR_BAD_REQUEST', `service ${JSON.stringify(s)} is not a string`);
    if (s === '*') return s;
    const base = s.endsWith('*') ? s.slice(0, -1) : s;
    if (base.includes('*')) throw new KnitError('KNIT_ERR_BAD_REQUEST', `service pattern ${s}: only one trailing * is allowed`);
    try {
      validateSegment(base, 'service name');
    } catch (e) {
      throw new KnitError('KNIT_ERR_BAD_REQUEST', `service pattern ${s}: ${(e as Error).message.replace(/^invalid SPIFFE ID [^:]*: /, '')}`);
    }
    return s;
  });
}

/** True when `service` matches one of the allowance patterns. */
export function allows(patterns: readonly string[], service: string): boolean {
  return patterns.some((p) => (p.endsWith('*') ? service.startsWith(p.slice(0, -1)) : p === service));
}

/** Why a node may not run a service, or undefined when it may. */
export function refusal(record: NodeRecord | undefined, node: string, service: string): string | undefined {
  if (!record) return `node ${node} is not known to the control plane (enrol it with a token from: knit token create --node ${node} --services ...)`;
  if (record.revokedAt) return `node ${node} was revoked at ${record.revokedAt}`;
  if (!allows(record.services, service)) return `service ${service} is not allowed on node ${node}: knit node set ${node} --services ${[...record.services, service].join(',')}`;
  return undefined;
}
