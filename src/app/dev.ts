/**
 * `knit dev`: the whole mesh on one host in one process. This composition
 * root picks the embedded registry, an in-process control plane and one
 * agent, and wires them; nothing else in knit chooses backends.
 */
import type http from 'node:http';
import { loadServicesStrict } from '../config/services.js';
import { defaultNodeName } from '../config/env.js';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { ControlPlane } from '../server/control-plane.js';
import { controlPlaneRoutes } from '../server/routes.js';
import { Agent, type ServiceState } from '../agent/agent.js';
import { agentRoutes } from '../agent/admin.js';
import { listenApi } from '../api/router.js';
import { Metrics } from '../log/metrics.js';
import type { Logger } from '../log/logger.js';
import type { Action } from '../policy/intentions.js';
import type { FileProblem } from '../errors.js';

export interface DevOptions {
  configDir: string;
  dataDir: string;
  adminHost: string;
  adminPort: number;
  /** The HBONE port (15008; 0: any free port). */
  hbonePort: number;
  trustDomain?: string;
  /** Default intention when the data dir has none yet; `knit dev` uses allow. */
  initialDefault: Action;
  log: Logger;
}

/** A running `knit dev`. */
export interface DevHandle {
  trustDomain: string;
  adminPort: number;
  hbonePort: number;
  defaultAction: Action;
  caCreated: boolean;
  services: ServiceState[];
  warnings: FileProblem[];
  reload: Agent['reload'];
  stop(drainMs?: number): Promise<void>;
}

/** Starts everything; throws ConfigError (nothing started) when any service file is bad. */
export async function startDev(o: DevOptions): Promise<DevHandle> {
  const loaded = await loadServicesStrict(o.configDir);
  const store = await EmbeddedStore.open(o.dataDir);
  const cpRegistry = store.client();
  const node = defaultNodeName();
  const cp = await ControlPlane.open({ dataDir: o.dataDir, registry: cpRegistry, name: node, trustDomain: o.trustDomain, initialDefault: o.initialDefault, log: o.log });
  const metrics = new Metrics();
  const agentRegistry = store.client();
  const agent = new Agent({
    node, trustDomain: cp.trustDomain, servicesDir: o.configDir, advertiseAddress: '127.0.0.1', bindAddress: '127.0.0.1',
    hbonePort: o.hbonePort, registry: agentRegistry, signer: cp.localSigner(), log: o.log, metrics,
    trust: () => ({ roots: cp.trustBundle(), trustDomain: cp.trustDomain }),
  });
  let server: http.Server | undefined;
  try {
    const api = await listenApi([...agentRoutes(agent, agentRegistry, metrics), ...controlPlaneRoutes(cp)], o.adminHost, o.adminPort, o.log);
    server = api.server;
    await agent.start(loaded.services);
    return {
      trustDomain: cp.trustDomain,
      adminPort: api.port,
      hbonePort: agent.proxy.hbonePort,
      defaultAction: cp.initialIntentions.defaultAction,
      caCreated: cp.created,
      services: agent.state().services,
      warnings: loaded.warnings,
      reload: () => agent.reload(),
      async stop(drainMs = 0) {
        await agent.stop(drainMs);
        await new Promise<void>((r) => server!.close(() => r()));
        server!.closeAllConnections();
        await agentRegistry.close();
        await cpRegistry.close();
      },
    };
  } catch (e) {
    await agent.stop(0).catch(() => undefined);
    server?.close();
    throw e;
  }
}
