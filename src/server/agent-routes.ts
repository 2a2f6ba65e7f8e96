/**
 * The control plane's API for agents and for the operator's node commands.
 *
 * - Enrolment with a join token: the node name and its services come from
 *   the token, never from the request; the agent's key is recorded in the
 *   node record in place of any earlier one.
 * - Renewal with the agent's current certificate, whose key must be the one
 *   recorded for the node (or the one before it, in case the answer to the
 *   last renewal was lost).
 * - Rejoin: an agent whose certificate has expired (a VM that was off)
 *   proves it holds the recorded key by signing a fresh server nonce, within
 *   the rejoin window after its certificate's expiry, unless revoked.
 * - Service leaves for services the node is allowed to run.
 * - `knit token create`, `knit node list|set|revoke` for the operator.
 */
import { randomBytes, timingSafeEqual, verify } from 'node:crypto';
import type http from 'node:http';
import type { TLSSocket } from 'node:tls';
import type { ControlPlane } from './control-plane.js';
import { DEFAULT_TOKEN_TTL_MS } from './tokens.js';
import { holdsKey } from './nodes.js';
import { field, type Authenticate, type Route } from '../api/router.js';
import { agentId, parseSpiffeId } from '../identity/spiffe.js';
import { csrInfo } from '../identity/ca.js';
import { rejoinProofInput } from '../identity/enrolment.js';
import { keyFingerprint } from '../identity/signed-doc.js';
import { KnitError } from '../errors.js';
import { parseDuration } from '../config/duration.js';
import { PeerIdentityReader } from '../identity/peer.js';
import { validateAllowance, type NodeRecord } from '../policy/nodes.js';
import type { Registry } from '../registry/registry.js';
import { EVENTS, type Logger } from '../log/logger.js';

/** Callers: the operator by bearer token, an agent by its client certificate. */
export function fleetAuthenticator(operatorToken: string, trustDomain: () => string): Authenticate {
  const want = Buffer.from(operatorToken);
  const peers = new PeerIdentityReader();
  return (req: http.IncomingMessage) => {
    const auth = req.headers.authorization;
    if (auth?.startsWith('Bearer ')) {
      const got = Buffer.from(auth.slice(7).trim());
      if (got.length === want.length && timingSafeEqual(got, want)) return { kind: 'operator' };
      return { kind: 'anonymous' };
    }
    const sock = req.socket as TLSSocket;
    if (sock.encrypted && sock.authorized) {
      const p = peers.read(sock, trustDomain());
      const cert = sock.getPeerX509Certificate();
      if (p.ok && p.id.what.kind === 'agent' && cert) {
        return { kind: 'agent', node: p.id.what.node, publicKey: cert.publicKey.export({ type: 'spki', format: 'pem' }).toString() };
      }
    }
    return { kind: 'anonymous' };
  };
}

/** What the server hands agents besides certificates. */
export interface AgentApiOptions {
  agentTtlMs: number;
  /** How long after its certificate expired an agent may still rejoin with its recorded key. */
  rejoinWindowMs: number;
  /** The registry credential agents write instances with (`user:password`), when the registry has ACLs. */
  agentRegistryAuth?: string;
  /** Where revoked nodes' instances are removed. */
  registry: Registry;
  log: Logger;
  now?: () => Date;
}

/** How long a rejoin nonce stays valid, and how many may be outstanding (a flood of requests cannot grow memory). */
const NONCE_TTL_MS = 60_000;
const MAX_NONCES = 10_000;

function agentCaller(caller: { kind: string }): { node: string; publicKey: string } {
  if (caller.kind !== 'agent') throw new KnitError('KNIT_ERR_UNAUTHORIZED', 'needs an agent certificate');
  return caller as { kind: 'agent'; node: string; publicKey: string };
}

/** A node record as `knit node list` shows it: the keys by fingerprint. */
function view(r: NodeRecord): Record<string, unknown> {
  const fp = (k?: string): string | undefined => (k ? keyFingerprint(k) : undefined);
  return {
    node: r.node,
    services: r.services,
    keyFingerprint: fp(r.publicKey),
    agentCertExpires: r.agentCertExpires,
    enrolledAt: r.enrolledAt,
    lastSeen: r.lastSeen,
    revokedAt: r.revokedAt,
  };
}

export function agentApiRoutes(cp: ControlPlane, o: AgentApiOptions): Route[] {
  const now = o.now ?? (() => new Date());
  const nonces = new Map<string, number>();

  const signAgent = async (node: string, csr: string) => {
    const leaf = await cp.ca.signCsr(csr, agentId(cp.trustDomain, node), { ttlMs: o.agentTtlMs });
    return leaf;
  };
  const answer = (leaf: { certPem: string; chainPem: string[] }, node: string) => ({
    cert: leaf.certPem,
    chain: leaf.chainPem,
    roots: cp.trustBundle(),
    trustDomain: cp.trustDomain,
    node,
    ...(o.agentRegistryAuth ? { registryAuth: o.agentRegistryAuth } : {}),
  });
  /** The agent node a CSR asks for, to explain a mismatch with the token's node. */
  const askedNode = (uri: string | undefined): string | undefined => {
    try {
      const id = uri ? parseSpiffeId(uri) : undefined;
      return id?.what.kind === 'agent' ? id.what.node : undefined;
    } catch {
      return undefined;
    }
  };

  return [
    { method: 'GET', path: '/v1/health', access: 'public', handler: () => ({ json: { status: 'ok', trustDomain: cp.trustDomain } }) },
    {
      method: 'POST',
      path: '/v1/agent/enrol',
      access: 'public',
      handler: async (req) => {
        const csr = field(req.body, 'csr');
        const grant = await cp.tokens.check(field(req.body, 'token'));
        const info = csrInfo(csr);
        const asked = askedNode(info.uri);
        if (asked !== grant.node) {
          throw new KnitError('KNIT_ERR_UNAUTHORIZED', `this join token is for node ${grant.node}, but the agent asked to be ${asked ?? 'something else'}: set "node: ${grant.node}" in agent.yaml, or create a token for ${asked ?? 'that node'}`);
        }
        const leaf = await signAgent(grant.node, csr);
        await cp.nodes.enrol(grant, info.publicKey, leaf.notAfter);
        await cp.tokens.forget(grant.id).catch(() => undefined);
        o.log.info({ event: EVENTS.nodeEnrolled, node: grant.node, services: grant.services, token: grant.id }, `node ${grant.node} enrolled (services ${grant.services.join(',')})`);
        return { json: answer(leaf, grant.node) };
      },
    },
    {
      method: 'POST',
      path: '/v1/agent/renew',
      access: 'agent',
      handler: async (req) => {
        const caller = agentCaller(req.caller);
        const csr = field(req.body, 'csr');
        const leaf = await signAgent(caller.node, csr);
        await cp.nodes.rekey(caller.node, caller.publicKey, csrInfo(csr).publicKey, leaf.notAfter);
        return { json: answer(leaf, caller.node) };
      },
    },
    {
      method: 'POST',
      path: '/v1/agent/challenge',
      access: 'public',
      handler: () => {
        const t = now().getTime();
        for (const [n, exp] of nonces) if (exp < t || nonces.size >= MAX_NONCES) nonces.delete(n);
        const nonce = randomBytes(32).toString('hex');
        nonces.set(nonce, t + NONCE_TTL_MS);
        return { json: { nonce, expiresInMs: NONCE_TTL_MS } };
      },
    },
    {
      method: 'POST',
      path: '/v1/agent/rejoin',
      access: 'public',
      handler: async (req) => {
        const node = field(req.body, 'node');
        const nonce = field(req.body, 'nonce');
        const csr = field(req.body, 'csr');
        const proof = field(req.body, 'proof');
        const exp = nonces.get(nonce);
        nonces.delete(nonce);
        if (exp === undefined || exp < now().getTime()) throw new KnitError('KNIT_ERR_UNAUTHORIZED', 'rejoin: unknown or expired nonce; ask for a new challenge');
        const rec = await cp.nodes.get(node);
        const refuse = (why: string): never => {
          o.log.warn({ event: EVENTS.rejoinRefused, node, reason: why }, `rejoin of node ${node} refused: ${why}`);
          throw new KnitError('KNIT_ERR_UNAUTHORIZED', `rejoin of node ${node} refused: ${why}`);
        };
        if (!rec?.publicKey) return refuse(`node ${node} is not known to the control plane; it needs a token (knit token create --node ${node} --services ...)`);
        if (rec.revokedAt) return refuse(`node ${node} was revoked at ${rec.revokedAt}; it needs a new token (knit token create --node ${node} --services ${rec.services.join(',')})`);
        const expired = rec.agentCertExpires ? Date.parse(rec.agentCertExpires) : 0;
        if (now().getTime() > expired + o.rejoinWindowMs) {
          return refuse(`its certificate expired at ${rec.agentCertExpires}, longer ago than the rejoin window (${Math.round(o.rejoinWindowMs / 3600_000)}h); it needs a new token (knit token create --node ${node} --services ${rec.services.join(',')})`);
        }
        const input = rejoinProofInput(cp.trustDomain, node, nonce, csr);
        const sig = Buffer.from(proof, 'base64');
        const proven = [rec.publicKey, rec.previousPublicKey].find((k) => k !== undefined && verify('sha256', input, { key: k, dsaEncoding: 'ieee-p1363' }, sig));
        if (!proven) return refuse('the proof is not signed with the key recorded for this node');
        const leaf = await signAgent(node, csr);
        if (!holdsKey(rec, proven)) return refuse('key changed during rejoin');
        await cp.nodes.rekey(node, proven, csrInfo(csr).publicKey, leaf.notAfter);
        o.log.info({ event: EVENTS.nodeRejoined, node }, `node ${node} rejoined with its recorded key`);
        return { json: answer(leaf, node) };
      },
    },
    {
      method: 'POST',
      path: '/v1/agent/sign',
      access: 'agent',
      handler: async (req) => {
        const caller = agentCaller(req.caller);
        const rec = await cp.nodes.get(caller.node);
        if (rec && !rec.revokedAt && !holdsKey(rec, caller.publicKey)) {
          throw new KnitError('KNIT_ERR_UNAUTHORIZED', `node ${caller.node} presented a key the control plane does not hold for it (re-enrolled elsewhere?)`);
        }
        const service = field(req.body, 'service');
        try {
          const leaf = await cp.signService(caller.node, service, field(req.body, 'csr'));
          return { json: { cert: leaf.certPem, chain: leaf.chainPem, roots: cp.trustBundle() } };
        } catch (e) {
          if (e instanceof KnitError && e.code === 'KNIT_ERR_UNAUTHORIZED') {
            o.log.warn({ event: EVENTS.signRefused, node: caller.node, service, reason: e.message }, e.message);
          }
          throw e;
        }
      },
    },
    {
      method: 'POST',
      path: '/v1/tokens',
      handler: async (req) => {
        const b = req.body as { ttl?: unknown; node?: unknown; services?: unknown } | undefined;
        const ms = b?.ttl === undefined ? DEFAULT_TOKEN_TTL_MS : typeof b.ttl === 'string' ? parseDuration(b.ttl) : undefined;
        if (ms === undefined || ms < 60_000 || ms > 30 * 24 * 3600_000) throw new KnitError('KNIT_ERR_BAD_REQUEST', '"ttl" must be a duration from 1m to 720h');
        const node = field(b, 'node');
        const t = await cp.tokens.create(node, validateAllowance(b?.services), ms);
        o.log.info({ event: EVENTS.tokenCreated, node, services: t.services, expiresAt: t.expiresAt }, `join token created for node ${node}`);
        return { json: t };
      },
    },
    { method: 'GET', path: '/v1/nodes', handler: async () => ({ json: (await cp.nodes.list()).map(view) }) },
    {
      method: 'PUT',
      path: '/v1/nodes/:node',
      handler: async (req) => {
        const rec = await cp.nodes.setServices(req.params.node!, validateAllowance((req.body as { services?: unknown } | undefined)?.services));
        o.log.info({ event: EVENTS.nodeChanged, node: rec.node, services: rec.services }, `node ${rec.node} may run ${rec.services.join(',')}`);
        return { json: view(rec) };
      },
    },
    {
      method: 'POST',
      path: '/v1/nodes/:node/revoke',
      handler: async (req) => {
        const rec = await cp.nodes.revoke(req.params.node!);
        const evicted: string[] = [];
        for (const s of await o.registry.listServices()) {
          for (const i of await o.registry.instances(s.name)) {
            if (i.node !== rec.node) continue;
            await o.registry.evict(i.service, i.id);
            evicted.push(i.id);
          }
        }
        o.log.warn({ event: EVENTS.nodeRevoked, node: rec.node, evicted }, `node ${rec.node} revoked; removed ${evicted.length} instance(s)`);
        return { json: { ...view(rec), evicted } };
      },
    },
  ];
}
