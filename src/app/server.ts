/**
 * `knit server`: the control plane of a fleet. The CA (key 0600 in the data
 * dir), intentions, node records and join tokens over an HTTPS API whose
 * certificate comes from the same CA and is renewed in place; the operator
 * authenticates with a bearer token kept 0600 in the data dir, agents with
 * their certificates. With ZooKeeper, the server holds the registry's
 * write credential and hands agents theirs at enrolment (both made on first
 * start, 0600 in the data dir, unless the registry URL names a file).
 */
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Server as HttpsServer } from 'node:https';
import type { ServerConfig } from '../config/node-config.js';
import { ControlPlane } from '../server/control-plane.js';
import { controlPlaneRoutes } from '../server/routes.js';
import { agentApiRoutes, fleetAuthenticator } from '../server/agent-routes.js';
import { serverId } from '../identity/spiffe.js';
import { LeafManager } from '../identity/leaf.js';
import { tlsOptions } from '../identity/tls.js';
import { writeFileAtomic } from '../files.js';
import { listenApi } from '../api/router.js';
import { registryRoutes } from '../api/registry-routes.js';
import type { Logger } from '../log/logger.js';
import { openRegistry, registryCredentials } from './registry.js';

export interface ServerHandle {
  trustDomain: string;
  port: number;
  operatorTokenFile: string;
  caCreated: boolean;
  stop(): Promise<void>;
}

/** A secret made on first start, 0600, never logged. */
async function secret(file: string, make: () => string): Promise<string> {
  try {
    return (await readFile(file, 'utf8')).trim();
  } catch {
    const value = make();
    await writeFileAtomic(file, `${value}\n`, 0o600);
    return value;
  }
}

const random = (): string => randomBytes(32).toString('hex');

export async function startServer(cfg: ServerConfig, log: Logger): Promise<ServerHandle> {
  // ZooKeeper credentials: the URL's files, else made here on first start (0600).
  const zk = cfg.registry.kind === 'zookeeper' ? cfg.registry : undefined;
  const access = {
    role: 'server' as const,
    auth: zk && !zk.authFile ? await secret(join(cfg.dataDir, 'registry-server.auth'), () => `knit-server:${random()}`) : undefined,
    agentAuth: zk && !zk.agentAuthFile ? await secret(join(cfg.dataDir, 'registry-agent.auth'), () => `knit-agent:${random()}`) : undefined,
  };
  const creds = await registryCredentials(cfg.registry, access);
  const agentAuth = creds.agent && `${creds.agent.user}:${creds.agent.password}`;
  const { registry } = await openRegistry(cfg.registry, cfg.dataDir, log, access);
  const cp = await ControlPlane.open({ dataDir: cfg.dataDir, registry, name: cfg.name, trustDomain: cfg.trustDomain, initialDefault: cfg.defaultIntention, leafTtlMs: cfg.leafTtlMs, vipRange: cfg.vipRange, log });
  const operatorTokenFile = join(cfg.dataDir, 'operator.token');
  const operatorToken = await secret(operatorTokenFile, random);
  const id = serverId(cp.trustDomain, cfg.name);
  // The API's own certificate is a leaf like any other: made here, renewed in place (open connections keep theirs).
  const apiCert = new LeafManager({
    id,
    service: 'control-plane API',
    sign: (csr) => cp.ca.signCsr(csr, id, { ttlMs: cfg.leafTtlMs, extraNames: cfg.advertise }),
    trustBundle: async () => cp.trustBundle(),
    // Renewals come long after `api` below is listening.
    onRenewed: (t) => (api.server as HttpsServer).setSecureContext(tlsOptions(t)),
    log,
  });
  const routes = [
    ...agentApiRoutes(cp, { agentTtlMs: cfg.agentTtlMs, rejoinWindowMs: cfg.rejoinWindowMs, agentRegistryAuth: agentAuth, registry, log }),
    ...controlPlaneRoutes(cp),
    ...registryRoutes(registry),
  ];
  const api = await listenApi(routes, cfg.listenHost, cfg.listenPort, log, {
    tls: tlsOptions(await apiCert.start()),
    authenticate: fleetAuthenticator(operatorToken, () => cp.trustDomain),
  });
  return {
    trustDomain: cp.trustDomain,
    port: api.port,
    operatorTokenFile,
    caCreated: cp.created,
    async stop() {
      apiCert.stop();
      api.server.close();
      api.server.closeAllConnections();
      await registry.close();
    },
  };
}
