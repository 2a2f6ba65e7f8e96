/**
 * `knit agent`: one host of a fleet. Wires the agent's identity (enrolled
 * once with a join token, then renewed with itself), the control-plane
 * client, the shared registry, the services and the loopback admin API.
 */
import { readFile } from 'node:fs/promises';
import type http from 'node:http';
import type { AgentConfig } from '../config/node-config.js';
import { loadServicesStrict } from '../config/services.js';
import { Agent } from '../agent/agent.js';
import { agentRoutes } from '../agent/admin.js';
import { LeafManager } from '../agent/certs.js';
import { ControlClient, enrol } from '../agent/control-client.js';
import { readAgentIdentity, writeAgentIdentity } from '../agent/identity-store.js';
import { agentId } from '../identity/spiffe.js';
import { listenApi, type Route } from '../api/router.js';
import { Metrics } from '../log/metrics.js';
import type { Logger } from '../log/logger.js';
import { ConfigError, KnitError } from '../errors.js';
import type { ServiceTls } from '../proxy/tls.js';
import { openRegistry } from './registry.js';
import { retrying } from '../retry.js';

export interface AgentHandle {
  node: string;
  trustDomain: string;
  adminPort: number;
  enrolled: boolean;
  reload: Agent['reload'];
  stop(drainMs?: number): Promise<void>;
}

/** First identity: the stored one if still valid, else enrolment with the join token. */
async function agentIdentity(cfg: AgentConfig, log: Logger): Promise<{ tls: ServiceTls; trustDomain: string; enrolled: boolean }> {
  const stored = await readAgentIdentity(cfg.dataDir, cfg.node);
  if (stored) return { ...stored, enrolled: false };
  let token: string;
  try {
    token = (await readFile(cfg.joinTokenFile, 'utf8')).trim();
  } catch (e) {
    throw new ConfigError([{ file: cfg.joinTokenFile, message: `no valid agent identity in ${cfg.dataDir}/agent and no join token (${(e as Error).message}); create one with knit token create` }]);
  }
  const got = await retrying(`control plane at ${cfg.server} (enrolment)`, log, () => enrol(cfg.server, token, cfg.node));
  await writeAgentIdentity(cfg.dataDir, got.tls);
  log.info({ node: cfg.node, trustDomain: got.trustDomain }, `enrolled as ${agentId(got.trustDomain, cfg.node).uri}`);
  return { ...got, enrolled: true };
}

/** On an agent, intentions and the CA live on the control plane: say where, instead of a bare 404. */
function controlPlaneHints(server: string): Route[] {
  const hint = (): never => {
    throw new KnitError('KNIT_ERR_NOT_FOUND', `intentions and the CA are managed by the control plane: add --server ${server} (or set KNIT_SERVER)`);
  };
  const paths = ['/v1/intentions', '/v1/intentions/apply', '/v1/intentions/check', '/v1/ca/roots', '/v1/tokens'];
  return paths.flatMap((path) => (['GET', 'PUT', 'POST', 'DELETE'] as const).map((method) => ({ method, path, handler: hint })));
}

export async function startAgent(cfg: AgentConfig, log: Logger): Promise<AgentHandle> {
  const loaded = await loadServicesStrict(cfg.servicesDir);
  const ident = await agentIdentity(cfg, log);
  const client = new ControlClient(cfg.server, ident.trustDomain, ident.tls);
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
  const { registry } = await openRegistry(cfg.registry, cfg.dataDir, log);
  const metrics = new Metrics();
  const agent = new Agent({
    node: cfg.node, trustDomain: ident.trustDomain, servicesDir: cfg.servicesDir, advertiseAddress: cfg.advertise, bindAddress: cfg.bind,
    inboundPortBase: cfg.inboundPortBase, registry, signer: client, dataDir: cfg.dataDir, log, metrics,
  });
  let server: http.Server | undefined;
  try {
    const api = await listenApi([...agentRoutes(agent, registry, metrics), ...controlPlaneHints(cfg.server)], cfg.adminHost, cfg.adminPort, log);
    server = api.server;
    await agent.start(loaded.services);
    return {
      node: cfg.node,
      trustDomain: ident.trustDomain,
      adminPort: api.port,
      enrolled: ident.enrolled,
      reload: () => agent.reload(),
      async stop(drainMs = cfg.drainMs) {
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
