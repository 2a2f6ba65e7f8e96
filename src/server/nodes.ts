/**
 * The control plane's node records (policy/nodes.ts), kept as one signed
 * document in the registry and changed only here, under compare-and-set:
 * enrolment (a join token names the node and its services), renewal and
 * rejoin (the agent's key is recorded in place of the old one), `knit node
 * set`, `knit node revoke`, and `last seen`.
 */
import { KnitError } from '../errors.js';
import { keyFingerprint } from '../identity/signed-doc.js';
import type { SignedKv } from '../registry/signed-kv.js';
import { byCodeUnit } from '../compare.js';
import { NODES_KEY, NODES_KIND, type NodeRecord, type NodesDocument } from '../policy/nodes.js';

/** `last seen` is written at most this often per node: every signing would otherwise rewrite the document. */
const LAST_SEEN_EVERY_MS = 60_000;

const empty = (): NodesDocument => ({ nodes: {}, usedTokens: {} });

/** What a redeemed join token grants. */
export interface TokenGrant {
  id: string;
  node: string;
  services: string[];
  expiresAt: string;
}

/** True when `spkiPem` is the node's current or previous key. */
export function holdsKey(record: NodeRecord, spkiPem: string): boolean {
  const fp = keyFingerprint(spkiPem);
  return [record.publicKey, record.previousPublicKey].some((k) => k !== undefined && keyFingerprint(k) === fp);
}

export class NodeStore {
  constructor(private readonly kv: SignedKv, private readonly now: () => Date = () => new Date()) {}

  /** Every node record. */
  async list(): Promise<NodeRecord[]> {
    const { doc } = await this.kv.read<NodesDocument>(NODES_KEY, NODES_KIND);
    return Object.values(doc?.body.nodes ?? {}).sort((a, b) => byCodeUnit(a.node, b.node));
  }

  async get(node: string): Promise<NodeRecord | undefined> {
    const { doc } = await this.kv.read<NodesDocument>(NODES_KEY, NODES_KIND);
    return doc?.body.nodes[node];
  }

  private async change(fn: (doc: NodesDocument) => NodeRecord): Promise<NodeRecord> {
    let out: NodeRecord | undefined;
    await this.kv.update<NodesDocument>(NODES_KEY, NODES_KIND, (cur) => {
      const doc = structuredClone(cur ?? empty());
      out = fn(doc);
      return doc;
    });
    return out!;
  }

  /**
   * Records an enrolment: the node gets the token's services and `publicKey`
   * in place of any earlier key (and loses a revocation). Rejects
   * KNIT_ERR_UNAUTHORIZED when the token was used already, in the same
   * compare-and-set, so a replayed token cannot enrol twice.
   */
  async enrol(grant: TokenGrant, publicKey: string, certExpires: Date): Promise<NodeRecord> {
    const at = this.now();
    return this.change((doc) => {
      if (doc.usedTokens[grant.id]) throw new KnitError('KNIT_ERR_UNAUTHORIZED', `join token ${grant.id}: unknown or already used`);
      for (const [id, exp] of Object.entries(doc.usedTokens)) if (Date.parse(exp) < at.getTime()) delete doc.usedTokens[id];
      doc.usedTokens[grant.id] = grant.expiresAt;
      const rec: NodeRecord = {
        node: grant.node,
        services: grant.services,
        publicKey,
        agentCertExpires: certExpires.toISOString(),
        enrolledAt: at.toISOString(),
        lastSeen: at.toISOString(),
      };
      doc.nodes[grant.node] = rec;
      return rec;
    });
  }

  /**
   * After a renewal or a rejoin: `newKey` becomes the node's key, the key it
   * proved (`provenKey`) its previous one. Refuses a revoked or unknown node
   * and a key the record does not hold.
   */
  async rekey(node: string, provenKey: string, newKey: string, certExpires: Date): Promise<NodeRecord> {
    const at = this.now();
    return this.change((doc) => {
      const rec = doc.nodes[node];
      if (!rec) throw new KnitError('KNIT_ERR_UNAUTHORIZED', `node ${node} is not known to the control plane; enrol it with a new token (knit token create --node ${node} --services ...)`);
      if (rec.revokedAt) throw new KnitError('KNIT_ERR_UNAUTHORIZED', `node ${node} was revoked at ${rec.revokedAt}; it needs a new token (knit token create --node ${node} --services ...)`);
      if (!holdsKey(rec, provenKey)) throw new KnitError('KNIT_ERR_UNAUTHORIZED', `node ${node} proved a key the control plane does not hold for it (re-enrolled elsewhere?); it needs a new token`);
      rec.previousPublicKey = provenKey;
      rec.publicKey = newKey;
      rec.agentCertExpires = certExpires.toISOString();
      rec.lastSeen = at.toISOString();
      return rec;
    });
  }

  /** Notes that the node called; written at most once a minute per node. */
  async touch(rec: NodeRecord): Promise<void> {
    const at = this.now();
    if (rec.lastSeen && at.getTime() - Date.parse(rec.lastSeen) < LAST_SEEN_EVERY_MS) return;
    await this.change((doc) => {
      const cur = doc.nodes[rec.node];
      if (!cur) throw new KnitError('KNIT_ERR_NOT_FOUND', `no node ${rec.node}`);
      cur.lastSeen = at.toISOString();
      return cur;
    });
  }

  /** `knit node set`: the services a node may run from its next signing on. */
  async setServices(node: string, services: string[]): Promise<NodeRecord> {
    return this.change((doc) => {
      const rec = doc.nodes[node];
      if (!rec) throw new KnitError('KNIT_ERR_NOT_FOUND', `no node ${node}; a node is created by enrolling it with a token (knit token create --node ${node} --services ...)`);
      rec.services = services;
      return rec;
    });
  }

  /** `knit node revoke`: no more renewals or signings; readers ignore its instances. */
  async revoke(node: string): Promise<NodeRecord> {
    const at = this.now();
    return this.change((doc) => {
      const rec = doc.nodes[node];
      if (!rec) throw new KnitError('KNIT_ERR_NOT_FOUND', `no node ${node}`);
      rec.revokedAt ??= at.toISOString();
      return rec;
    });
  }
}
