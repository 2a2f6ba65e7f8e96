/**
 * The control plane's API for agents: enrolment with a join token, renewal
 * of the agent's identity with that identity itself (so a VM never depends
 * on its expired bootstrap token), service leaves for services registered
 * on the agent's node, and join-token creation for operators.
 */
import { timingSafeEqual } from 'node:crypto';
import type http from 'node:http';
import type { TLSSocket } from 'node:tls';
import type { ControlPlane } from './control-plane.js';
import { JoinTokens, DEFAULT_TOKEN_TTL_MS } from './tokens.js';
import { field, type Authenticate, type Route } from '../api/router.js';
import { agentId, validateSegment } from '../identity/spiffe.js';
import { KnitError } from '../errors.js';
import { parseDuration } from '../config/duration.js';
import { PeerIdentityReader } from '../proxy/tls.js';
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
      if (p.ok && p.id.what.kind === 'agent') return { kind: 'agent', node: p.id.what.node };
    }
    return { kind: 'anonymous' };
  };
}

const nodeOf = (caller: { kind: string; node?: string }): string => {
  if (caller.kind !== 'agent' || !caller.node) throw new KnitError('KNIT_ERR_UNAUTHORIZED', 'needs an agent certificate');
  return caller.node;
};

export function agentApiRoutes(cp: ControlPlane, tokens: JoinTokens, agentTtlMs: number, log: Logger): Route[] {
  const signAgent = async (node: string, csr: string) => {
    const leaf = await cp.ca.signCsr(csr, agentId(cp.trustDomain, node), { ttlMs: agentTtlMs });
    return { cert: leaf.certPem, chain: leaf.chainPem, roots: cp.trustBundle(), trustDomain: cp.trustDomain };
  };
  return [
    { method: 'GET', path: '/v1/health', access: 'public', handler: () => ({ json: { status: 'ok', trustDomain: cp.trustDomain } }) },
    {
      method: 'POST',
      path: '/v1/agent/enrol',
      access: 'public',
      handler: async (req) => {
        const node = field(req.body, 'node');
        try {
          validateSegment(node, 'node name');
        } catch (e) {
          throw new KnitError('KNIT_ERR_BAD_REQUEST', (e as Error).message);
        }
        const csr = field(req.body, 'csr');
        await tokens.redeem(field(req.body, 'token'));
        log.info({ event: EVENTS.certIssued, node }, `agent ${node} enrolled`);
        return { json: await signAgent(node, csr) };
      },
    },
    {
      method: 'POST',
      path: '/v1/agent/renew',
      access: 'agent',
      handler: async (req) => ({ json: await signAgent(nodeOf(req.caller), field(req.body, 'csr')) }),
    },
    {
      method: 'POST',
      path: '/v1/agent/sign',
      access: 'agent',
      handler: async (req) => {
        const leaf = await cp.signService(nodeOf(req.caller), field(req.body, 'service'), field(req.body, 'csr'));
        return { json: { cert: leaf.certPem, chain: leaf.chainPem, roots: cp.trustBundle() } };
      },
    },
    {
      method: 'POST',
      path: '/v1/tokens',
      handler: async (req) => {
        const ttl = (req.body as { ttl?: unknown } | undefined)?.ttl;
        const ms = ttl === undefined ? DEFAULT_TOKEN_TTL_MS : typeof ttl === 'string' ? parseDuration(ttl) : undefined;
        if (ms === undefined || ms < 60_000 || ms > 30 * 24 * 3600_000) throw new KnitError('KNIT_ERR_BAD_REQUEST', '"ttl" must be a duration from 1m to 720h');
        return { json: await tokens.create(ms) };
      },
    },
  ];
}
