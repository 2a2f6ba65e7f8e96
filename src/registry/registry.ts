/**
 * The Registry contract: where instances of services are registered and
 * found, plus a small versioned key/value store for cluster state
 * (intentions, CA roots). Every backend (embedded, ZooKeeper, Consul)
 * implements exactly this and passes `registryContract()`.
 *
 * Only neutral types cross it: plain records and strings, never a
 * ZooKeeper or Consul client object.
 */
/** An instance's health, as Consul has it: warning still serves, critical does not. */
export type HealthStatus = 'passing' | 'warning' | 'critical';

/** One running instance of a service, as peers see it. */
export interface Instance {
  /** Unique in the registry; agents use `<node>/<service id>`. */
  id: string;
  /** Service name: what upstreams and intentions refer to. */
  service: string;
  /** Node (host) that runs it. */
  node: string;
  /** Address peers dial. */
  address: string;
  /**
   * The service's port as registered (Consul's service port): a mesh
   * stream's :authority names `address:port`. 0 for a client-only service.
   */
  port: number;
  /** The HBONE port of the agent that runs it (15008 by default): where peers dial to reach it. */
  hbonePort?: number;
  tags: string[];
  meta: Record<string, string>;
  health: HealthStatus;
}

/** A service as `knit services` lists it. */
export interface ServiceSummary {
  name: string;
  instances: number;
  /** Instances a peer would route to (passing or warning). */
  routable: number;
}

/** A value in the KV store with its version. */
export interface KvEntry {
  value: string;
  /** Positive; changes on every write of the key. */
  version: number;
}

/** A live subscription. */
export interface Watch {
  /** Stops delivery; no callback runs after it resolves. */
  close(): void;
}

/** Called when a watch cannot refresh; the last delivered state stays valid (fail static). */
export type WatchErrorHandler = (err: Error) => void;

/** True for instances peers should route to: warning still serves, critical does not. */
export function isRoutable(i: Pick<Instance, 'health'>): boolean {
  return i.health !== 'critical';
}

/**
 * A client of a registry. Instances it registers belong to it: they are
 * removed when it deregisters them, when it is closed, and when its owner
 * dies (the backend's session or lease ends). KV entries are durable.
 *
 * Methods reject with KnitError: KNIT_ERR_REGISTRY_UNAVAILABLE when the
 * backend cannot be reached (retryable), KNIT_ERR_CAS_CONFLICT when a
 * compare-and-set loses, KNIT_ERR_NOT_FOUND for an unknown instance,
 * KNIT_ERR_REGISTRY_DENIED when the backend refuses the operation to this
 * client's credential (a protected ZooKeeper tree: only knit server writes
 * KV, only agents and knit server write instances), KNIT_ERR_CLOSED after
 * close().
 *
 * Instance writes (register, setHealth, deregister) are wishes the client
 * keeps, not one-shot requests: one that rejects KNIT_ERR_REGISTRY_UNAVAILABLE
 * may still have taken effect, and the client keeps writing the latest wish
 * in the background until the backend holds it (a refusal such as
 * KNIT_ERR_REGISTRY_DENIED is not retried: the previous wish stands). A
 * caller may still retry; retries are idempotent. Whenever a backend has
 * lost this client's instances and written them all again, it says so
 * through onResync.
 */
export interface Registry {
  /** Backend name for messages: `embedded`, `zookeeper`, `consul`. */
  readonly kind: string;

  /**
   * Registers `instance`, or replaces the one with the same id. An id held
   * by another client is taken over (an agent restarted before its old
   * session lapsed owns its instances again); ids carry the node name, so
   * only the same node writes the same id. Resolves once a new watcher
   * would see it.
   */
  register(instance: Instance): Promise<void>;

  /** Changes the health of an instance this client registered. Rejects KNIT_ERR_NOT_FOUND otherwise. */
  setHealth(id: string, health: HealthStatus): Promise<void>;

  /** Removes an instance this client registered; resolves also if it is already gone. */
  deregister(id: string): Promise<void>;

  /**
   * Removes instance `id` of `service` whichever client registered it: the
   * control plane's `knit node revoke`. Resolves also if it is absent (an
   * `id` registered under another service is left alone). Watchers see it
   * go. The owner is not told and keeps counting the instance as its own, so
   * a live owner may write it again (the ZooKeeper backend re-creates it on
   * the owner's next health change or session recovery): revoking a node
   * must also take the owner's identity away. Rejects
   * KNIT_ERR_REGISTRY_DENIED when the backend keeps this to the control
   * plane and this client is not it (ZooKeeper: the server credential).
   */
  evict(service: string, id: string): Promise<void>;

  /** Every instance of a service, whatever its health, sorted by id. */
  instances(service: string): Promise<Instance[]>;

  /** Every service with at least one instance, sorted by name. */
  listServices(): Promise<ServiceSummary[]>;

  /**
   * Delivers the routable instances of `service` (sorted by id): once as
   * soon as they are known, then after every change. Snapshots are whole
   * lists, never diffs. While the backend is unreachable nothing is
   * delivered and `onError` is told; the caller keeps routing on the last
   * snapshot. Delivery resumes with a fresh snapshot on reconnection.
   */
  watchService(service: string, onSnapshot: (instances: Instance[]) => void, onError?: WatchErrorHandler): Watch;

  /** Reads a key; undefined when it does not exist. */
  kvGet(key: string): Promise<KvEntry | undefined>;

  /**
   * Writes a key. With `expectedVersion` it is a compare-and-set: 0 means
   * "must not exist yet", any other number must equal the current version.
   * Resolves with the new version; rejects KNIT_ERR_CAS_CONFLICT on a
   * mismatch. Durable once resolved.
   */
  kvSet(key: string, value: string, expectedVersion?: number): Promise<number>;

  /** Deletes a key (with an optional expected version); resolves also if absent. */
  kvDelete(key: string, expectedVersion?: number): Promise<void>;

  /** Delivers the key's entry (or undefined) now and after each change; fail static as watchService. */
  watchKey(key: string, onValue: (entry: KvEntry | undefined) => void, onError?: WatchErrorHandler): Watch;

  /**
   * Subscribes `listener` to resyncs: it runs each time the backend had lost
   * every instance of this client (ZooKeeper: its session expired) and the
   * client has registered them all again, as last asked, with their latest
   * health. The moment for an owner to re-assert what it knows better (an
   * agent re-publishes each service's current health). A backend that
   * cannot lose a live client's instances (embedded) never calls it.
   * Returns the function that unsubscribes; close() drops every listener.
   * Optional only so that wrappers written before it keep compiling; both
   * backends implement it, and a wrapper should forward it.
   */
  onResync?(listener: () => void): () => void;

  /**
   * Deregisters this client's instances and releases resources: no
   * callback runs and no backend session is opened after it. Idempotent.
   */
  close(): Promise<void>;
}

/** KV keys knit itself uses. */
export const KV_KEYS = {
  intentions: 'intentions',
  caRoots: 'ca/roots',
  trustDomain: 'ca/trust-domain',
} as const;

/** Keys are `/`-separated segments of `[A-Za-z0-9._-]`, so every backend can store them as paths. */
export function validateKey(key: string): string {
  if (!/^[A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)*$/.test(key)) {
    throw new Error(`invalid registry key ${JSON.stringify(key)}`);
  }
  return key;
}
