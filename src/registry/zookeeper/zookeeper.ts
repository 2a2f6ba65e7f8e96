/**
 * The ZooKeeper backend of the Registry contract (node-zookeeper-client),
 * laid out as SmartStack's nerve does it:
 *
 *   <root>/services/<service>/<instance id, URI-encoded>   ephemeral, JSON Instance
 *   <root>/kv/<key, URI-encoded>                             persistent, the value
 *
 * An instance is an ephemeral znode of this client's session, so an agent
 * that dies disappears with its session. Watches are one-shot in ZooKeeper:
 * every delivery re-arms them. On session expiry this client builds a new
 * session, re-registers everything it owns and re-arms every watch by
 * itself; while the connection is lost, watchers keep their last snapshot
 * (fail static) and are told through onError, and a fresh snapshot follows
 * the reconnection.
 *
 * KV versions are the znode's data version plus one (ZooKeeper starts at
 * 0), so 0 can keep meaning "does not exist".
 */
import zookeeper from 'node-zookeeper-client';
import type { Client, Stat, Event as ZkEvent } from 'node-zookeeper-client';
import { KnitError, wrapError } from '../../errors.js';
import type { Logger } from '../../log/logger.js';
import { EVENTS } from '../../log/logger.js';
import {
  isRoutable,
  validateKey,
  type HealthStatus,
  type Instance,
  type KvEntry,
  type Registry,
  type ServiceSummary,
  type Watch,
  type WatchErrorHandler,
} from '../registry.js';

const { Exception, CreateMode, State } = zookeeper;

export interface ZooKeeperOptions {
  /** `host:port,host:port` */
  servers: string;
  /** Path under which knit keeps everything, e.g. `/knit`. */
  root: string;
  sessionTimeoutMs: number;
  log: Logger;
  /** How long to wait for the first connection before failing. */
  connectTimeoutMs?: number;
}

const enc = encodeURIComponent;

function code(e: unknown): number | undefined {
  return e instanceof Exception ? e.getCode() : undefined;
}

/** Arms ZooKeeper watches once per key until they fire. */
interface Arms {
  /** A watcher for `key`, or undefined when one is already pending. */
  arm(key: string): ((e: ZkEvent) => void) | undefined;
  disarm(key: string): void;
}

/** One in-flight watch, refreshed (re-read and re-armed) whenever ZooKeeper says something changed. */
interface Refreshable {
  refresh(): void;
  fail(err: Error): void;
}

export class ZooKeeperRegistry implements Registry {
  readonly kind = 'zookeeper';
  private client!: Client;
  private closed = false;
  private readonly owned = new Map<string, Instance>();
  private readonly watches = new Set<Refreshable>();
  private wasDisconnected = false;
  private sessionGeneration = 0;
  private recovering: Promise<void> | undefined;
  private lostTimer: NodeJS.Timeout | undefined;

  private constructor(private readonly o: ZooKeeperOptions) {}

  /** Connects; rejects KNIT_ERR_REGISTRY_UNAVAILABLE naming the servers when they cannot be reached in time. */
  static async connect(o: ZooKeeperOptions): Promise<ZooKeeperRegistry> {
    const r = new ZooKeeperRegistry(o);
    await r.openSession();
    await r.mkdirp(`${o.root}/services`);
    await r.mkdirp(`${o.root}/kv`);
    return r;
  }

  private async openSession(): Promise<void> {
    const client = zookeeper.createClient(this.o.servers, { sessionTimeout: this.o.sessionTimeoutMs, spinDelay: 200, retries: 1 });
    const timeout = this.o.connectTimeoutMs ?? 30_000;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        client.close();
        reject(new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `cannot reach ZooKeeper at ${this.o.servers} within ${timeout} ms`));
      }, timeout);
      client.once('connected', () => {
        clearTimeout(timer);
        resolve();
      });
      client.connect();
    });
    this.client = client;
    const generation = ++this.sessionGeneration;
    client.on('state', (s) => {
      this.o.log.debug({ state: s.toString(), generation }, 'ZooKeeper client state');
      if (generation !== this.sessionGeneration || this.closed) return;
      if (s === State.DISCONNECTED) {
        this.wasDisconnected = true;
        this.o.log.warn({ event: EVENTS.registryError, servers: this.o.servers }, 'disconnected from ZooKeeper; routing on the last known instances');
        for (const w of this.watches) w.fail(new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', 'disconnected from ZooKeeper'));
        // Past the session timeout the server has expired the session anyway; a client that
        // has not found out by then (seen with node-zookeeper-client after a server restart)
        // is replaced, as Curator does, so registrations and watches come back by themselves.
        clearTimeout(this.lostTimer);
        this.lostTimer = setTimeout(() => {
          if (this.wasDisconnected && generation === this.sessionGeneration && !this.closed) void this.recover();
        }, this.o.sessionTimeoutMs * 1.5);
        this.lostTimer.unref();
      } else if (s === State.SYNC_CONNECTED && this.wasDisconnected) {
        clearTimeout(this.lostTimer);
        this.wasDisconnected = false;
        this.o.log.info({ event: EVENTS.registryError, servers: this.o.servers }, 'reconnected to ZooKeeper; resyncing');
        for (const w of this.watches) w.refresh();
      } else if (s === State.EXPIRED) {
        void this.recover();
      }
    });
  }

  /** After session expiry: a new session, every owned instance registered again, every watch re-armed. */
  private recover(): Promise<void> {
    this.recovering ??= (async () => {
      this.o.log.warn({ event: EVENTS.registryError }, `ZooKeeper session expired or lost; re-registering ${this.owned.size} instance(s)`);
      this.client.close();
      this.wasDisconnected = false;
      for (;;) {
        if (this.closed) return;
        try {
          await this.openSession();
          break;
        } catch (e) {
          this.o.log.warn({ event: EVENTS.registryError, err: (e as Error).message }, 'still cannot reach ZooKeeper');
        }
      }
      for (const i of this.owned.values()) {
        await this.createInstance(i).catch((e: Error) => this.o.log.error({ event: EVENTS.registryError, id: i.id, err: e.message }, 're-registration failed'));
      }
      // Every ZooKeeper watch of the old session is gone: re-read and re-arm all.
      for (const w of this.watches) w.refresh();
    })().finally(() => (this.recovering = undefined));
    return this.recovering;
  }

  private live(): void {
    if (this.closed) throw new KnitError('KNIT_ERR_CLOSED', 'registry client is closed');
  }

  /** Runs one ZooKeeper call as a promise, bounded so a lost connection cannot hang a caller. */
  private call<T>(what: string, fn: (c: Client, cb: (err: unknown, v: T) => void) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const bound = Math.max(this.o.sessionTimeoutMs, 5000);
      const timer = setTimeout(() => reject(new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `ZooKeeper ${what} did not answer within ${bound} ms`)), bound);
      fn(this.client, (err, v) => {
        clearTimeout(timer);
        // ZooKeeper's Exception is not an Error subclass; it is kept as is so callers can read its code.
        // eslint-disable-next-line @typescript-eslint/prefer-promise-reject-errors
        if (err) reject(err);
        else resolve(v);
      });
    });
  }

  private unavailable(what: string, e: unknown): KnitError {
    return wrapError('KNIT_ERR_REGISTRY_UNAVAILABLE', `ZooKeeper ${what}`, e);
  }

  private async mkdirp(path: string): Promise<void> {
    await this.call<string>(`mkdirp ${path}`, (c, cb) => c.mkdirp(path, cb)).catch((e: unknown) => {
      if (code(e) !== Exception.NODE_EXISTS) throw this.unavailable(`mkdirp ${path}`, e);
    });
  }

  private getData(path: string, watcher?: (e: ZkEvent) => void): Promise<{ data: Buffer; stat: Stat } | undefined> {
    return this.call<{ data: Buffer; stat: Stat } | undefined>(`read ${path}`, (c, cb) => {
      const done = (err: unknown, data: Buffer, stat: Stat): void => (code(err) === Exception.NO_NODE ? cb(null, undefined) : cb(err, err ? undefined : { data, stat }));
      if (watcher) c.getData(path, watcher, done);
      else c.getData(path, done);
    });
  }

  private getChildren(path: string, watcher?: (e: ZkEvent) => void): Promise<string[] | undefined> {
    return this.call<string[] | undefined>(`list ${path}`, (c, cb) => {
      const done = (err: unknown, children: string[]): void => (code(err) === Exception.NO_NODE ? cb(null, undefined) : cb(err, children));
      if (watcher) c.getChildren(path, watcher, done);
      else c.getChildren(path, done);
    });
  }

  private sessionId(): Buffer {
    return this.client.getSessionId();
  }

  private instancePath(i: Pick<Instance, 'service' | 'id'>): string {
    return `${this.o.root}/services/${i.service}/${enc(i.id)}`;
  }

  /** Creates (or takes over) the ephemeral znode of an instance in the current session. */
  private async createInstance(i: Instance): Promise<void> {
    const path = this.instancePath(i);
    const data = Buffer.from(JSON.stringify(i));
    await this.mkdirp(`${this.o.root}/services/${i.service}`);
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        await this.call<string>(`create ${path}`, (c, cb) => c.create(path, data, CreateMode.EPHEMERAL, cb));
        return;
      } catch (e) {
        if (code(e) !== Exception.NODE_EXISTS) throw this.unavailable(`register ${i.id}`, e);
      }
      const cur = await this.getData(path);
      if (!cur) continue;
      if (cur.stat.ephemeralOwner.equals(this.sessionId())) {
        await this.call<Stat>(`update ${path}`, (c, cb) => c.setData(path, data, -1, cb));
        return;
      }
      // An earlier session of this node (a restart before it lapsed): take the instance over.
      await this.call<void>(`remove ${path}`, (c, cb) => c.remove(path, -1, (err) => cb(code(err) === Exception.NO_NODE ? null : err, undefined)));
    }
    throw new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `could not register ${i.id}: it kept changing under us`);
  }

  async register(instance: Instance): Promise<void> {
    this.live();
    const copy = structuredClone(instance);
    const prev = this.owned.get(copy.id);
    if (prev && prev.service !== copy.service) await this.deregister(prev.id);
    await this.createInstance(copy);
    this.owned.set(copy.id, copy);
  }

  async setHealth(id: string, health: HealthStatus): Promise<void> {
    this.live();
    const cur = this.owned.get(id);
    if (!cur) throw new KnitError('KNIT_ERR_NOT_FOUND', `instance ${id} is not registered by this client`);
    if (cur.health === health) return;
    const next = { ...cur, health };
    const path = this.instancePath(next);
    try {
      await this.call<Stat>(`update ${path}`, (c, cb) => c.setData(path, Buffer.from(JSON.stringify(next)), -1, cb));
    } catch (e) {
      if (code(e) === Exception.NO_NODE) await this.createInstance(next);
      else throw this.unavailable(`set health of ${id}`, e);
    }
    this.owned.set(id, next);
  }

  async deregister(id: string): Promise<void> {
    this.live();
    const cur = this.owned.get(id);
    if (!cur) return;
    this.owned.delete(id);
    const path = this.instancePath(cur);
    const got = await this.getData(path).catch(() => undefined);
    if (!got || !got.stat.ephemeralOwner.equals(this.sessionId())) return;
    await this.call<void>(`remove ${path}`, (c, cb) => c.remove(path, got.stat.version, (err) => cb(code(err) === Exception.NO_NODE || code(err) === Exception.BAD_VERSION ? null : err, undefined))).catch((e: unknown) => {
      throw this.unavailable(`deregister ${id}`, e);
    });
  }

  private async readInstances(
    service: string,
    arm?: { children?: (e: ZkEvent) => void; data?: (child: string) => ((e: ZkEvent) => void) | undefined; missing?: (child?: string) => void },
  ): Promise<Instance[] | undefined> {
    const dir = `${this.o.root}/services/${service}`;
    const children = await this.getChildren(dir, arm?.children);
    if (!children) {
      arm?.missing?.();
      return undefined;
    }
    const list: Instance[] = [];
    await Promise.all(
      children.map(async (child) => {
        const got = await this.getData(`${dir}/${child}`, arm?.data?.(child));
        if (!got) {
          arm?.missing?.(child);
          return;
        }
        try {
          list.push(JSON.parse(got.data.toString('utf8')) as Instance);
        } catch {
          this.o.log.warn({ event: EVENTS.registryError, path: `${dir}/${child}` }, 'ignoring an instance znode that is not JSON');
        }
      }),
    );
    return list.sort((a, b) => a.id.localeCompare(b.id));
  }

  async instances(service: string): Promise<Instance[]> {
    this.live();
    try {
      return (await this.readInstances(service)) ?? [];
    } catch (e) {
      throw this.unavailable(`list instances of ${service}`, e);
    }
  }

  async listServices(): Promise<ServiceSummary[]> {
    this.live();
    try {
      const names = (await this.getChildren(`${this.o.root}/services`)) ?? [];
      const out: ServiceSummary[] = [];
      for (const name of names.sort()) {
        const list = (await this.readInstances(name)) ?? [];
        if (list.length) out.push({ name, instances: list.length, routable: list.filter(isRoutable).length });
      }
      return out;
    } catch (e) {
      throw this.unavailable('list services', e);
    }
  }

  /**
   * A watch that re-reads its state on every ZooKeeper event and re-arms.
   * Refreshes are coalesced so an event storm costs one read at a time, and
   * each ZooKeeper watch (keyed by kind and path) is armed once until it
   * fires: re-arming a pending one would pile listeners up in the client.
   */
  private watch<T>(read: (arms: Arms) => Promise<T>, same: (a: T, b: T) => boolean, deliver: (v: T) => void, onError?: WatchErrorHandler): Watch {
    this.live();
    let running = false;
    let dirty = false;
    let open = true;
    let last: { v: T } | undefined;
    let armed = new Set<string>();
    let generation = this.sessionGeneration;
    const arms: Arms = {
      arm: (key) => {
        // A new session has none of the old session's watches.
        if (generation !== this.sessionGeneration) {
          armed = new Set();
          generation = this.sessionGeneration;
        }
        if (armed.has(key)) return undefined;
        armed.add(key);
        return () => {
          armed.delete(key);
          w.refresh();
        };
      },
      // ZooKeeper sets no watch when the read found no node.
      disarm: (key) => armed.delete(key),
    };
    const w: Refreshable = {
      refresh: () => {
        if (!open) return;
        if (running) {
          dirty = true;
          return;
        }
        running = true;
        void (async () => {
          do {
            dirty = false;
            try {
              const v = await read(arms);
              if (open && (!last || !same(last.v, v))) {
                last = { v };
                deliver(v);
              }
            } catch (e) {
              if (open) onError?.(this.unavailable('watch', e));
              // Retried when the connection comes back (state handler) or on the next event.
            }
          } while (dirty && open);
          running = false;
        })();
      },
      fail: (err) => {
        if (open) onError?.(err);
      },
    };
    this.watches.add(w);
    w.refresh();
    return {
      close: () => {
        open = false;
        this.watches.delete(w);
      },
    };
  }

  watchService(service: string, onSnapshot: (instances: Instance[]) => void, onError?: WatchErrorHandler): Watch {
    const dir = `${this.o.root}/services/${service}`;
    return this.watch<Instance[]>(
      async (arms) => {
        const list = await this.readInstances(service, {
          children: arms.arm(`children:${dir}`),
          data: (child) => arms.arm(`data:${dir}/${child}`),
          missing: (child) => arms.disarm(child === undefined ? `children:${dir}` : `data:${dir}/${child}`),
        });
        if (list === undefined) {
          // No such service yet: watch for its creation.
          const created = arms.arm(`exists:${dir}`);
          if (created) await this.call<Stat>(`exists ${dir}`, (c, cb) => c.exists(dir, created, cb));
          return [];
        }
        return list.filter(isRoutable);
      },
      (a, b) => JSON.stringify(a) === JSON.stringify(b),
      onSnapshot,
      onError,
    );
  }

  private kvPath(key: string): string {
    return `${this.o.root}/kv/${enc(validateKey(key))}`;
  }

  async kvGet(key: string): Promise<KvEntry | undefined> {
    this.live();
    const path = this.kvPath(key);
    try {
      const got = await this.getData(path);
      return got && { value: got.data.toString('utf8'), version: got.stat.version + 1 };
    } catch (e) {
      throw this.unavailable(`read ${key}`, e);
    }
  }

  async kvSet(key: string, value: string, expectedVersion?: number): Promise<number> {
    this.live();
    const path = this.kvPath(key);
    const data = Buffer.from(value, 'utf8');
    const conflict = (): KnitError => new KnitError('KNIT_ERR_CAS_CONFLICT', `key ${key} is not at version ${expectedVersion}`);
    const create = async (): Promise<number> => {
      await this.call<string>(`create ${path}`, (c, cb) => c.create(path, data, CreateMode.PERSISTENT, cb));
      return 1;
    };
    const set = async (v: number): Promise<number> => (await this.call<Stat>(`write ${path}`, (c, cb) => c.setData(path, data, v, cb))).version + 1;
    try {
      if (expectedVersion === 0) return await create();
      if (expectedVersion !== undefined) return await set(expectedVersion - 1);
      for (;;) {
        try {
          return await set(-1);
        } catch (e) {
          if (code(e) !== Exception.NO_NODE) throw e;
        }
        try {
          return await create();
        } catch (e) {
          if (code(e) !== Exception.NODE_EXISTS) throw e;
        }
      }
    } catch (e) {
      const c = code(e);
      if (c === Exception.NODE_EXISTS || c === Exception.BAD_VERSION || (c === Exception.NO_NODE && expectedVersion !== undefined)) throw conflict();
      throw this.unavailable(`write ${key}`, e);
    }
  }

  async kvDelete(key: string, expectedVersion?: number): Promise<void> {
    this.live();
    const path = this.kvPath(key);
    try {
      await this.call<void>(`remove ${path}`, (c, cb) => c.remove(path, expectedVersion === undefined ? -1 : expectedVersion - 1, (err) => cb(err, undefined)));
    } catch (e) {
      const c = code(e);
      if (c === Exception.NO_NODE && expectedVersion === undefined) return;
      if (c === Exception.BAD_VERSION || c === Exception.NO_NODE) throw new KnitError('KNIT_ERR_CAS_CONFLICT', `key ${key} is not at version ${expectedVersion}`);
      throw this.unavailable(`delete ${key}`, e);
    }
  }

  watchKey(key: string, onValue: (entry: KvEntry | undefined) => void, onError?: WatchErrorHandler): Watch {
    const path = this.kvPath(key);
    return this.watch<KvEntry | undefined>(
      async (arms) => {
        const got = await this.getData(path, arms.arm(`data:${path}`));
        if (got) return { value: got.data.toString('utf8'), version: got.stat.version + 1 };
        arms.disarm(`data:${path}`);
        // getData on a missing node arms nothing: exists() watches for its creation.
        const created = arms.arm(`exists:${path}`);
        if (created) {
          const stat = await this.call<Stat | undefined>(`exists ${path}`, (c, cb) => c.exists(path, created, (err, st) => cb(err, st ?? undefined)));
          // Created between the two reads: the exists watch is set on a live node and will fire on its next change; read now.
          if (stat) return this.kvGet(key);
        }
        return undefined;
      },
      (a, b) => a?.version === b?.version && a?.value === b?.value,
      onValue,
      onError,
    );
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.lostTimer);
    this.watches.clear();
    this.owned.clear();
    // Closing the session removes this client's ephemeral instances at once.
    this.client.close();
  }
}
