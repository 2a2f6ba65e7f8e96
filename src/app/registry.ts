/**
 * Picks and opens the registry backend a URL names. The only place that
 * knows every backend.
 */
import { join } from 'node:path';
import type { RegistryUrl } from '../config/registry-url.js';
import type { Registry } from '../registry/registry.js';
import { EmbeddedStore } from '../registry/embedded/embedded.js';
import { ZooKeeperRegistry } from '../registry/zookeeper/zookeeper.js';
import { KnitError } from '../errors.js';
import type { Logger } from '../log/logger.js';
import { retrying } from '../retry.js';

/** Opens a registry client, waiting (and saying so) while a remote registry is unreachable. */
export async function openRegistry(url: RegistryUrl, dataDir: string, log: Logger): Promise<{ registry: Registry; more: () => Promise<Registry> }> {
  switch (url.kind) {
    case 'embedded': {
      const store = await EmbeddedStore.open(join(dataDir));
      return { registry: store.client(), more: async () => store.client() };
    }
    case 'zookeeper': {
      const open = () => retrying(`ZooKeeper at ${url.servers}`, log, () => ZooKeeperRegistry.connect({ servers: url.servers, root: url.root, sessionTimeoutMs: url.sessionTimeoutMs, log, connectTimeoutMs: 10_000 }));
      return { registry: await open(), more: open };
    }
    case 'consul':
      throw new KnitError('KNIT_ERR_CONFIG', 'the consul:// registry is not implemented yet; use zk://... or embedded:');
  }
}
