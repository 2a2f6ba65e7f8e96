/**
 * `knit server`: the control plane of a fleet. The CA (key 0600 in the data
 * dir), intentions and join tokens over an HTTPS API whose certificate comes
 * from the same CA and is renewed in place; the operator authenticates with
 * a bearer token kept 0600 in the data dir, agents with their certificates.
 */
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Server as HttpsServer } from 'node:https';
import type { ServerConfig } from '../config/node-config.js';
import { ControlPlane } from '../server/control-plane.js';
import { controlPlaneRoutes } from '../server/routes.js';
import { agentApiRoutes, fleetAuthenticator } from '../server/agent-routes.js';
import { JoinTokens } from '../server/tokens.js';
import { serverId } from '../identity/spiffe.js';
import { LeafManager } from '../agent/certs.js';
import { tlsOptions } from '../proxy/tls.js';
import { writeFileAtomic } from '../registry/embedded/embedded.js';
import { listenApi } from '../api/router.js';
import { registryRoutes } from '../api/registry-routes.js';
import type { Logger } from '../log/logger.js';
import { openRegistry } from './registry.js';

export interface ServerHandle {
  trustDomain: string;
  port: number;
  operatorTokenFile: string;
  caCreated: boolean;
  stop(): Promise<void>;
}

/** The operator token: made on first start, 0600, never logged. */
async function operatorToken(dataDir: string): Promise<{ token: string; file: string }> {
  const file = join(dataDir, 'operator.token');
  try {
    return { token: (await readFile(file, 'utf8')).trim(), file };
  } catch {
    const token = randomBytes(32).toString('hex');
    await writeFileAtomic(file, `${token}\n`, 0o600);
    return { token, file };
  }
}

export async function startServer(cfg: ServerConfig, log: Logger): Promise<ServerHandle> {
  const { registry } = await openRegistry(cfg.registry, cfg.dataDir, log);
  const cp = await ControlPlane.open({ dataDir: cfg.dataDir, registry, trustDomain: cfg.trustDomain, initialDefault: cfg.defaultIntention, leafTtlMs: cfg.leafTtlMs, log });
  const op = await operatorToken(cfg.dataDir);
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
  const tokens = new JoinTokens(registry, () => cp.ca.rootPem);
  const api = await listenApi([...agentApiRoutes(cp, tokens, cfg.agentTtlMs, log), ...controlPlaneRoutes(cp), ...registryRoutes(registry)], cfg.listenHost, cfg.listenPort, log, {
    tls: tlsOptions(await apiCert.start()),
    authenticate: fleetAuthenticator(op.token, () => cp.trustDomain),
  });
  return {
    trustDomain: cp.trustDomain,
    port: api.port,
    operatorTokenFile: op.file,
    caCreated: cp.created,
    async stop() {
      apiCert.stop();
      api.server.close();
      api.server.closeAllConnections();
      await registry.close();
    },
  };
}
