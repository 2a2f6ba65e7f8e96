/**
 * Picks and opens the registry backend a URL names, with the credential
 * the caller's role uses. The only place that knows every backend.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseZkCredential, type RegistryUrl, type ZkCredential } from '../config/registry-url.js';
import type { Registry } from '../registry/registry.js';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { ZooKeeperRegistry, digestId, type ZooKeeperCredentials } from '../registry/zookeeper/zookeeper.js';
import { ConfigError, KnitError } from '../errors.js';
import type { Logger } from '../log/logger.js';
import { retrying } from '../retry.js';

/**
 * Who opens the registry and with what: `user:password` strings, used
 * unless the URL names credential files (`auth=file:`, `agent_auth=file:`).
 */
export interface RegistryAccess {
  role: 'server' | 'agent';
  /** This process's own credential. */
  auth?: string;
  /** Server only: the agents' credential, which the server's ACLs grant. */
  agentAuth?: string;
}

async function credentialFile(file: string): Promise<ZkCredential> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new ConfigError([{ file, message: `cannot read the ZooKeeper credential: ${(e as Error).message}` }]);
  }
  return parseZkCredential(text, file);
}

/** The effective credentials: the URL's files first, else the strings given. */
export async function registryCredentials(url: RegistryUrl, access: RegistryAccess): Promise<{ own?: ZkCredential; agent?: ZkCredential }> {
  if (url.kind !== 'zookeeper') return {};
  const own = url.authFile ? await credentialFile(url.authFile) : access.auth ? parseZkCredential(access.auth, 'credential') : undefined;
  const agent = url.agentAuthFile ? await credentialFile(url.agentAuthFile) : access.agentAuth ? parseZkCredential(access.agentAuth, 'agent credential') : undefined;
  return { own, agent };
}

/** Opens a registry client, waiting (and saying so) while a remote registry is unreachable. */
export async function openRegistry(url: RegistryUrl, dataDir: string, log: Logger, access?: RegistryAccess): Promise<{ registry: Registry; more: () => Promise<Registry> }> {
  switch (url.kind) {
    case 'embedded': {
      const store = await EmbeddedStore.open(join(dataDir));
      return { registry: store.client(), more: async () => store.client() };
    }
    case 'zookeeper': {
      const { own, agent } = access ? await registryCredentials(url, access) : {};
      let credentials: ZooKeeperCredentials | undefined;
      if (own && access?.role === 'server') {
        if (!agent) throw new KnitError('KNIT_ERR_CONFIG', 'knit server needs the agents\' ZooKeeper credential to grant it (agent_auth=file:... in the registry URL, or the one it makes in its data dir)');
        credentials = { role: 'server', ...own, agentId: digestId(agent.user, agent.password) };
      } else if (own) credentials = { role: 'agent', ...own };
      const open = () => retrying(`ZooKeeper at ${url.servers}`, log, () => ZooKeeperRegistry.connect({ servers: url.servers, root: url.root, sessionTimeoutMs: url.sessionTimeoutMs, log, connectTimeoutMs: 10_000, credentials }));
      return { registry: await open(), more: open };
    }
    case 'consul':
      throw new KnitError('KNIT_ERR_CONFIG', 'the consul:// registry is not implemented yet; use zk://... or embedded:');
  }
}
