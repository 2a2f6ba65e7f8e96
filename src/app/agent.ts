/**
 * `knit agent`: one host of a fleet. Wires the agent's identity (enrolled
 * once with a join token, then renewed with itself, rejoined with its key
 * after a long absence), the control-plane client, the shared registry
 * (with the credential the control plane handed out), the services and the
 * admin API (loopback only unless configured otherwise, then behind a
 * bearer token).
 */
import { readFile } from 'node:fs/promises';
import { timingSafeEqual } from 'node:crypto';
import type http from 'node:http';
import type { AgentConfig } from '../config/node-config.js';
import { loadServicesStrict } from '../config/services.js';
import { Agent, type AgentOptions } from '../agent/agent.js';
import { agentRoutes } from '../agent/admin.js';
import { LeafManager } from '../identity/leaf.js';
import { ControlClient, enrol, rejoin, type AgentIdentity } from '../agent/control-client.js';
import { readAgentIdentity, readRegistryAuth, writeAgentIdentity, writeRegistryAuth } from '../agent/identity-store.js';
import { agentId } from '../identity/spiffe.js';
import { listenApi, type Authenticate, type Route } from '../api/router.js';
import { Metrics } from '../log/metrics.js';
import { EVENTS, type Logger } from '../log/logger.js';
import { ConfigError, KnitError } from '../errors.js';
import { openRegistry } from './registry.js';
import { retrying } from '../retry.js';

export interface AgentHandle {
  node: string;
  trustDomain: string;
  adminPort: number;
  /** How the identity was had: `enrolled` (join token), `rejoined` (recorded key), `stored`. */
  identity: 'enrolled' | 'rejoined' | 'stored';
  reload: Agent['reload'];
  stop(drainMs?: number): Promise<void>;
}

async function readToken(cfg: AgentConfig, why: string): Promise<string> {
  try {
    return (await readFile(cfg.joinTokenFile, 'utf8')).trim();
  } catch (e) {
    throw new ConfigError([{ file: cfg.joinTokenFile, message: `${why}, and no join token (${(e as Error).message}); create one with: knit token create --node ${cfg.node} --services ...` }]);
  }
}

/**
 * First identity: the stored one if still valid; an expired one rejoins
 * with its key (a VM that was off); else, or when rejoin is refused
 * (revoked, past the window), enrolment with the join token.
 */
async function agentIdentity(cfg: AgentConfig, log: Logger): Promise<AgentIdentity & { how: AgentHandle['identity'] }> {
  const stored = await readAgentIdentity(cfg.dataDir, cfg.node);
  if (stored && !stored.expired) return { tls: stored.tls, trustDomain: stored.trustDomain, how: 'stored' };
  let why = `no agent identity in ${cfg.dataDir}/agent`;
  if (stored) {
    try {
      const got = await retrying(`control plane at ${cfg.server} (rejoin with the stored key)`, log, () => rejoin(cfg.server, stored.tls, stored.trustDomain, cfg.node));
      await writeAgentIdentity(cfg.dataDir, got.tls);
      log.info({ event: EVENTS.nodeRejoined, node: cfg.node }, `certificate had expired; rejoined as ${agentId(got.trustDomain, cfg.node).uri} with the recorded key`);
      return { ...got, how: 'rejoined' };
    } catch (e) {
      if (!(e instanceof KnitError) || e.code !== 'KNIT_ERR_UNAUTHORIZED') throw e;
      why = e.message;
      log.error({ event: EVENTS.rejoinRefused, node: cfg.node, err: e.message }, `${e.message}; trying the join token`);
    }
  }
  const token = await readToken(cfg, why);
  const got = await retrying(`control plane at ${cfg.server} (enrolment)`, log, () => enrol(cfg.server, token, cfg.node));
  await writeAgentIdentity(cfg.dataDir, got.tls);
  log.info({ event: EVENTS.nodeEnrolled, node: cfg.node, trustDomain: got.trustDomain }, `enrolled as ${agentId(got.trustDomain, cfg.node).uri}`);
  return { ...got, how: 'enrolled' };
}

/** On an agent, intentions, nodes and the CA live on the control plane: say where, instead of a bare 404. */
function controlPlaneHints(server: string): Route[] {
  const hint = (): never => {
    throw new KnitError('KNIT_ERR_NOT_FOUND', `intentions, nodes and the CA are managed by the control plane: add --server ${server} (or set KNIT_SERVER)`);
  };
  const paths = ['/v1/intentions', '/v1/intentions/apply', '/v1/intentions/check', '/v1/ca/roots', '/v1/tokens', '/v1/nodes'];
  return paths.flatMap((path) => (['GET', 'PUT', 'POST', 'DELETE'] as const).map((method) => ({ method, path, handler: hint })));
}

/** A remote admin API admits only callers with the bearer token in `file`; a loopback one admits local callers. */
async function adminAuthenticator(cfg: AgentConfig): Promise<Authenticate | undefined> {
  if (!cfg.adminTokenFile) return undefined;
  let token: string;
  try {
    token = (await readFile(cfg.adminTokenFile, 'utf8')).trim();
  } catch (e) {
    throw new ConfigError([{ file: cfg.file, field: 'admin_token_file', message: `cannot read ${cfg.adminTokenFile}: ${(e as Error).message}` }]);
  }
  if (token.length < 16) throw new ConfigError([{ file: cfg.file, field: 'admin_token_file', message: `${cfg.adminTokenFile} holds fewer than 16 characters; use a long random secret (e.g. the operator token)` }]);
  const want = Buffer.from(token);
  return (req: http.IncomingMessage) => {
    const got = Buffer.from((req.headers.authorization ?? '').replace(/^Bearer\s+/, '').trim());
    return got.length === want.length && timingSafeEqual(got, want) ? { kind: 'operator' } : { kind: 'anonymous' };
  };
}

export async function startAgent(cfg: AgentConfig, log: Logger): Promise<AgentHandle> {
  const loaded = await loadServicesStrict(cfg.servicesDir, { allowRemoteUpstreams: cfg.allowRemoteUpstreams });
  const authenticate = await adminAuthenticator(cfg);
  const ident = await agentIdentity(cfg, log);
  if (ident.registryAuth) await writeRegistryAuth(cfg.dataDir, ident.registryAuth);
  const client = new ControlClient(cfg.server, ident.trustDomain, cfg.node, ident.tls, (auth) => {
    void writeRegistryAuth(cfg.dataDir, auth).catch((e: Error) => log.warn({ event: EVENTS.registryError, err: e.message }, 'cannot store the registry credential'));
  });
  const agentLeaf = new LeafManager({
    id: agentId(ident.trustDomain, cfg.node),
    service: 'agent',
    initial: ident.tls,
    sign: (csr) => client.renewAgent(csr),
    trustBundle: () => client.trustBundle(),
    persist: (t) => writeAgentIdentity(cfg.dataDir, t),
    onRenewed: (t) => client.setIdentity(t),
    log,
  });
  await agentLeaf.start();
  const { registry } = await openRegistry(cfg.registry, cfg.dataDir, log, { role: 'agent', auth: await readRegistryAuth(cfg.dataDir) });
  const metrics = new Metrics();
  const agent = new Agent({
    node: cfg.node, trustDomain: ident.trustDomain, servicesDir: cfg.servicesDir, advertiseAddress: cfg.advertise, bindAddress: cfg.bind,
    hbonePort: cfg.hbonePort, maxStreamsPerTunnel: cfg.hboneMaxStreams, tunnelIdleMs: cfg.hboneIdleMs, registry, signer: client, dataDir: cfg.dataDir, log, metrics,
    trust: () => ({ roots: ident.tls.trustBundlePem, trustDomain: ident.trustDomain }),
    nodeRecords: true,
    maxConnectionsPerHost: cfg.maxConnectionsPerHost,
    tcp: Object.fromEntries(Object.entries(cfg.tcp).filter(([, v]) => v !== undefined)),
    loadOptions: { allowRemoteUpstreams: cfg.allowRemoteUpstreams },
    transparent: await transparentOf(cfg),
  });
  // After the registry lost and re-created this agent's session, re-assert everything at once (not at the next anti-entropy pass).
  const unsubscribe = registry.onResync?.(() => agent.resync());
  let server: http.Server | undefined;
  try {
    const api = await listenApi([...agentRoutes(agent, registry, metrics), ...controlPlaneHints(cfg.server)], cfg.adminHost, cfg.adminPort, log, { authenticate });
    server = api.server;
    await agent.start(loaded.services);
    return {
      node: cfg.node,
      trustDomain: ident.trustDomain,
      adminPort: api.port,
      identity: ident.how,
      reload: () => agent.reload(),
      async stop(drainMs = cfg.drainMs) {
        unsubscribe?.();
        agentLeaf.stop();
        await agent.stop(drainMs);
        server!.close();
        server!.closeAllConnections();
        await registry.close();
        await client.close();
      },
    };
  } catch (e) {
    agentLeaf.stop();
    await agent.stop(0).catch(() => undefined);
    server?.close();
    await registry.close();
    throw e;
  }
}

/** agent.yaml's transparent mode as the agent runs it: capture, DNS, and rules it installs and removes itself. */
async function transparentOf(cfg: AgentConfig): Promise<AgentOptions['transparent']> {
  const t = cfg.transparent;
  if (!t.enabled) return undefined;
  // Loaded only in transparent mode: an agent without it never reads the netfilter code.
  const { createRedirector, processRunner } = await import('../proxy/transparent/netfilter.js');
  const redirector = createRedirector({ run: processRunner() });
  return {
    settings: {
      outboundPort: t.outboundPort, inboundPort: t.inboundPort, dnsPort: t.dnsPort, outbound: t.outbound, captureDns: t.captureDns, vipRange: t.vipRange,
      rules: { agentUid: t.uid, excludeInboundPorts: t.excludeInboundPorts, excludeOutboundPorts: t.excludeOutboundPorts, excludeCidrs: t.excludeCidrs, excludeUids: t.excludeUids },
    },
    redirect: {
      install: async (spec) => void (await redirector.install(spec)),
      cleanup: async () => void (await redirector.cleanup()),
    },
  };
}
