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
import { issueServerCert, type ServerCert } from '../identity/ca.js';
import { serverId } from '../identity/spiffe.js';
import { renewalDelay, retryDelay } from '../agent/certs.js';
import { writeFileAtomic } from '../registry/embedded/embedded.js';
import { listenApi } from '../api/router.js';
import { registryRoutes } from '../api/registry-routes.js';
import { EVENTS, type Logger } from '../log/logger.js';
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
  const tlsOf = (c: ServerCert) => ({ cert: c.certPem, key: c.keyPem, ca: cp.trustBundle(), minVersion: 'TLSv1.3' as const });
  let cert = await issueServerCert(cp.ca, id, cfg.advertise, cfg.leafTtlMs);
  const tokens = new JoinTokens(registry, () => cp.ca.rootPem);
  const { server, port } = await listenApi([...agentApiRoutes(cp, tokens, cfg.agentTtlMs, log), ...controlPlaneRoutes(cp), ...registryRoutes(registry)], cfg.listenHost, cfg.listenPort, log, {
    tls: tlsOf(cert),
    authenticate: fleetAuthenticator(op.token, () => cp.trustDomain),
  });
  // The server's own certificate is renewed like any leaf; open connections keep theirs.
  let timer: NodeJS.Timeout;
  const schedule = (delayMs?: number): void => {
    const now = new Date();
    timer = setTimeout(() => {
      issueServerCert(cp.ca, id, cfg.advertise, cfg.leafTtlMs).then(
        (c) => {
          cert = c;
          (server as HttpsServer).setSecureContext(tlsOf(c));
          schedule();
        },
        (e: Error) => {
          log.error({ event: EVENTS.certRenewFailed, err: e.message }, `renewing the API certificate failed: ${e.message}`);
          schedule(retryDelay(0, cert.notAfter.getTime() - Date.now()));
        },
      );
    }, Math.min(delayMs ?? renewalDelay(now, cert.notAfter, now, Math.random()), 2 ** 31 - 1));
    timer.unref();
  };
  schedule();
  return {
    trustDomain: cp.trustDomain,
    port,
    operatorTokenFile: op.file,
    caCreated: cp.created,
    async stop() {
      clearTimeout(timer);
      server.close();
      server.closeAllConnections();
      await registry.close();
    },
  };
}
