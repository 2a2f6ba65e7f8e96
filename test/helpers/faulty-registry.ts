/**
 * A real registry client with writes that can be made to fail on demand:
 * the fault a ZooKeeper outage or a lost session causes, at a moment the
 * test chooses. Reads and watches go through untouched.
 */
import { KnitError } from '../../src/errors.js';
import type { Registry } from '../../src/registry/registry.js';

export interface FaultyRegistry extends Registry {
  /** While true, register/setHealth/deregister reject KNIT_ERR_REGISTRY_UNAVAILABLE. */
  failWrites: boolean;
  /** Writes that failed so far. */
  failed: number;
}

export function faulty(inner: Registry): FaultyRegistry {
  const r: FaultyRegistry = {
    kind: inner.kind,
    failWrites: false,
    failed: 0,
    async register(i) {
      if (r.failWrites) throw fail('register');
      return inner.register(i);
    },
    async setHealth(id, h) {
      if (r.failWrites) throw fail('setHealth');
      return inner.setHealth(id, h);
    },
    async deregister(id) {
      if (r.failWrites) throw fail('deregister');
      return inner.deregister(id);
    },
    evict: (s, id) => inner.evict(s, id),
    instances: (s) => inner.instances(s),
    listServices: () => inner.listServices(),
    watchService: (s, on, err) => inner.watchService(s, on, err),
    kvGet: (k) => inner.kvGet(k),
    kvSet: (k, v, e) => inner.kvSet(k, v, e),
    kvDelete: (k, e) => inner.kvDelete(k, e),
    watchKey: (k, on, err) => inner.watchKey(k, on, err),
    onResync: (l) => inner.onResync?.(l) ?? (() => undefined),
    close: () => inner.close(),
  };
  const fail = (what: string): KnitError => {
    r.failed++;
    return new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `injected fault: ${what} lost with the registry connection`);
  };
  return r;
}
