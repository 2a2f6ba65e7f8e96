/**
 * The embedded registry: one process's in-memory catalogue for a single
 * host (`knit dev`, or `knit server` configured with `embedded:`).
 *
 * Instances are ephemeral by the contract: they live in memory and belong
 * to the client that registered them, so they vanish with it (and with the
 * process). KV entries are durable: every acknowledged write has been
 * written to `<dataDir>/registry/kv.json` by write-temp, fsync, rename,
 * fsync-dir, so a crash at any point leaves either the old or the new file.
 */
import { byCodeUnit } from '../../compare.js';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from '../../files.js';
import { KnitError } from '../../errors.js';
import {
  isRoutable,
  validateKey,
  type HealthStatus,
  type Instance,
  type KvEntry,
  type Registry,
  type ServiceSummary,
  type Watch,
} from '../registry.js';

interface Owned {
  instance: Instance;
  owner: number;
}

/** The shared state behind every embedded client. */
export class EmbeddedStore {
  private readonly instances = new Map<string, Owned>();
  private readonly kv = new Map<string, KvEntry>();
  private readonly serviceWatchers = new Map<string, Set<(list: Instance[]) => void>>();
  private readonly keyWatchers = new Map<string, Set<(e: KvEntry | undefined) => void>>();
  private writes: Promise<unknown> = Promise.resolve();
  private nextOwner = 1;

  private constructor(private readonly file: string | undefined) {}

  /** Opens a store; with a data dir, KV is loaded from and persisted to it. */
  static async open(dataDir?: string): Promise<EmbeddedStore> {
    const file = dataDir ? join(dataDir, 'registry', 'kv.json') : undefined;
    const store = new EmbeddedStore(file);
    if (file) {
      let text: string | undefined;
      try {
        text = await readFile(file, 'utf8');
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `cannot read ${file}: ${(e as Error).message}`, { cause: e });
      }
      if (text !== undefined) {
        let parsed: Record<string, KvEntry>;
        try {
          parsed = JSON.parse(text) as Record<string, KvEntry>;
        } catch (e) {
          throw new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `${file} is corrupt: ${(e as Error).message}`, { cause: e });
        }
        for (const [k, v] of Object.entries(parsed)) store.kv.set(k, v);
      }
    }
    return store;
  }

  /** A new client; its instances are removed when it closes. */
  client(): Registry {
    return new EmbeddedClient(this, this.nextOwner++);
  }

  // ---- instances ---------------------------------------------------------

  /** @internal */
  put(owner: number, instance: Instance): void {
    const prev = this.instances.get(instance.id);
    this.instances.set(instance.id, { instance: structuredClone(instance), owner });
    this.notifyService(instance.service);
    if (prev && prev.instance.service !== instance.service) this.notifyService(prev.instance.service);
  }

  /** @internal */
  setHealth(owner: number, id: string, health: HealthStatus): void {
    const cur = this.instances.get(id);
    if (!cur || cur.owner !== owner) throw new KnitError('KNIT_ERR_NOT_FOUND', `instance ${id} is not registered by this client`);
    if (cur.instance.health === health) return;
    cur.instance = { ...cur.instance, health };
    this.notifyService(cur.instance.service);
  }

  /** @internal */
  remove(owner: number, id: string): void {
    const cur = this.instances.get(id);
    if (!cur || cur.owner !== owner) return;
    this.instances.delete(id);
    this.notifyService(cur.instance.service);
  }

  /** @internal Removes an instance whoever owns it, when it belongs to `service`. */
  evict(service: string, id: string): void {
    const cur = this.instances.get(id);
    if (!cur || cur.instance.service !== service) return;
    this.instances.delete(id);
    this.notifyService(service);
  }

  /** @internal */
  removeOwner(owner: number): void {
    for (const [id, o] of [...this.instances]) if (o.owner === owner) this.remove(owner, id);
  }

  /** @internal */
  list(service: string): Instance[] {
    return [...this.instances.values()]
      .filter((o) => o.instance.service === service)
      .map((o) => structuredClone(o.instance))
      .sort((a, b) => byCodeUnit(a.id, b.id));
  }

  /** @internal */
  services(): ServiceSummary[] {
    const by = new Map<string, ServiceSummary>();
    for (const { instance } of this.instances.values()) {
      const s = by.get(instance.service) ?? { name: instance.service, instances: 0, routable: 0 };
      s.instances++;
      if (isRoutable(instance)) s.routable++;
      by.set(instance.service, s);
    }
    return [...by.values()].sort((a, b) => byCodeUnit(a.name, b.name));
  }

  /** @internal */
  subscribeService(service: string, cb: (list: Instance[]) => void): () => void {
    const set = this.serviceWatchers.get(service) ?? new Set();
    this.serviceWatchers.set(service, set);
    set.add(cb);
    return () => set.delete(cb);
  }

  private notifyService(service: string): void {
    const set = this.serviceWatchers.get(service);
    if (!set?.size) return;
    for (const cb of [...set]) cb(this.list(service).filter(isRoutable));
  }

  // ---- kv ----------------------------------------------------------------

  /** @internal */
  get(key: string): KvEntry | undefined {
    const e = this.kv.get(validateKey(key));
    return e && { ...e };
  }

  /** Serialises writes so CAS checks and persistence happen in one order. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.writes.then(fn, fn);
    this.writes = run.catch(() => undefined);
    return run;
  }

  private async persist(next: Map<string, KvEntry>): Promise<void> {
    if (!this.file) return;
    try {
      await writeFileAtomic(this.file, JSON.stringify(Object.fromEntries(next), null, 1));
    } catch (e) {
      throw new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `cannot persist registry to ${this.file}: ${(e as Error).message}`, { cause: e });
    }
  }

  private checkVersion(key: string, expected: number | undefined): KvEntry | undefined {
    const cur = this.kv.get(key);
    if (expected !== undefined && (cur?.version ?? 0) !== expected) {
      throw new KnitError('KNIT_ERR_CAS_CONFLICT', `key ${key} is at version ${cur?.version ?? 0}, not ${expected}`);
    }
    return cur;
  }

  /** @internal */
  set(key: string, value: string, expected?: number): Promise<number> {
    validateKey(key);
    return this.serial(async () => {
      const cur = this.checkVersion(key, expected);
      const entry = { value, version: (cur?.version ?? 0) + 1 };
      const next = new Map(this.kv).set(key, entry);
      await this.persist(next);
      this.kv.set(key, entry);
      this.notifyKey(key);
      return entry.version;
    });
  }

  /** @internal */
  delete(key: string, expected?: number): Promise<void> {
    validateKey(key);
    return this.serial(async () => {
      const cur = this.checkVersion(key, expected);
      if (!cur) return;
      const next = new Map(this.kv);
      next.delete(key);
      await this.persist(next);
      this.kv.delete(key);
      this.notifyKey(key);
    });
  }

  /** @internal */
  subscribeKey(key: string, cb: (e: KvEntry | undefined) => void): () => void {
    const set = this.keyWatchers.get(key) ?? new Set();
    this.keyWatchers.set(key, set);
    set.add(cb);
    return () => set.delete(cb);
  }

  private notifyKey(key: string): void {
    for (const cb of [...(this.keyWatchers.get(key) ?? [])]) cb(this.get(key));
  }
}

/** One client of the store; owns the instances it registers. */
class EmbeddedClient implements Registry {
  readonly kind = 'embedded';
  private closed = false;
  private readonly watches = new Set<() => void>();

  constructor(private readonly store: EmbeddedStore, private readonly owner: number) {}

  private live(): void {
    if (this.closed) throw new KnitError('KNIT_ERR_CLOSED', 'registry client is closed');
  }

  async register(instance: Instance): Promise<void> {
    this.live();
    this.store.put(this.owner, instance);
  }
  async setHealth(id: string, health: HealthStatus): Promise<void> {
    this.live();
    this.store.setHealth(this.owner, id, health);
  }
  async deregister(id: string): Promise<void> {
    this.live();
    this.store.remove(this.owner, id);
  }
  /** The embedded store has no credentials: every client lives in the one process that holds it, so any may evict. */
  async evict(service: string, id: string): Promise<void> {
    this.live();
    this.store.evict(service, id);
  }
  async instances(service: string): Promise<Instance[]> {
    this.live();
    return this.store.list(service);
  }
  async listServices(): Promise<ServiceSummary[]> {
    this.live();
    return this.store.services();
  }

  private subscribe<T>(initial: () => T, sub: (cb: (v: T) => void) => () => void, deliver: (v: T) => void): Watch {
    this.live();
    let open = true;
    const cb = (v: T): void => {
      if (open) deliver(v);
    };
    const unsub = sub(cb);
    // First delivery is asynchronous, like every later one, so callers never re-enter.
    queueMicrotask(() => cb(initial()));
    const close = (): void => {
      open = false;
      unsub();
      this.watches.delete(close);
    };
    this.watches.add(close);
    return { close };
  }

  watchService(service: string, onSnapshot: (instances: Instance[]) => void): Watch {
    let last: string | undefined;
    return this.subscribe(
      () => this.store.list(service).filter(isRoutable),
      (cb) => this.store.subscribeService(service, cb),
      (list) => {
        const key = JSON.stringify(list);
        if (key === last) return;
        last = key;
        onSnapshot(list);
      },
    );
  }

  async kvGet(key: string): Promise<KvEntry | undefined> {
    this.live();
    return this.store.get(key);
  }
  async kvSet(key: string, value: string, expectedVersion?: number): Promise<number> {
    this.live();
    return this.store.set(key, value, expectedVersion);
  }
  async kvDelete(key: string, expectedVersion?: number): Promise<void> {
    this.live();
    return this.store.delete(key, expectedVersion);
  }
  watchKey(key: string, onValue: (entry: KvEntry | undefined) => void): Watch {
    let last: number | undefined = -1;
    return this.subscribe(
      () => this.store.get(key),
      (cb) => this.store.subscribeKey(key, cb),
      (e) => {
        if (e?.version === last) return;
        last = e?.version;
        onValue(e);
      },
    );
  }

  /** Never called: the store lives in this client's process, so nothing can drop a live client's instances. */
  onResync(_listener: () => void): () => void {
    return () => undefined;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const close of [...this.watches]) close();
    this.store.removeOwner(this.owner);
  }
}
