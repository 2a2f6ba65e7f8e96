/**
 * The ZooKeeper backend of the Registry contract (node-zookeeper-client),
 * laid out as SmartStack's nerve does it:
 *
 *   <root>/services/<service>/<instance id, URI-encoded>   ephemeral, JSON Instance
 *   <root>/kv/<key, URI-encoded>                             persistent, the value
 *   <root>/server-id                                         JSON { server: [digest id] }
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
 *
 * Access. Without credentials a client writes everything open
 * (world:anyone ALL), as knit always did; on a protected tree it can still
 * read, and its writes reject KNIT_ERR_REGISTRY_DENIED. With digest
 * credentials (ids are `user:base64(sha1(user:password))`, see digestId):
 *
 *   znode                        server  agent    world
 *   <root>, kv, kv/<key>         ALL     -        READ
 *   kv/tokens%2F*, kv/nodes%2F*  ALL     -        -
 *   services                     ALL     CR       READ
 *   services/<service>           ALL     CDR      READ
 *   services/<service>/<id>      ALL     ALL      READ
 *   server-id                    ALL     R        -
 *
 * The server role creates this tree, and on every connect sets these ACLs
 * where they differ (migrating an open tree, or a new agent credential) and
 * closes instance znodes still writable by the world. The agent role puts
 * the server's id on what it creates; ZooKeeper shows digest ids in an ACL
 * only to clients with ADMIN on the node (others read `user:x`), so the
 * server publishes its id in `server-id`, readable by the agent credential
 * alone (not by the world: the hash of a weak password can be cracked).
 */
import { createHash } from 'node:crypto';
import zookeeper from 'node-zookeeper-client';
import type { ACL as ZkAcl, Client, Stat, Event as ZkEvent } from 'node-zookeeper-client';
import { KnitError, isKnitError, wrapError } from '../../errors.js';
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

const { Exception, CreateMode, State, ACL, Id, Permission } = zookeeper;

/**
 * A ZooKeeper digest credential and the part of knit it belongs to. The
 * server role needs the agents' digest id (digestId of the agents'
 * user:password) to grant it; an agent learns the server's id from the tree.
 */
export type ZooKeeperCredentials =
  | { role: 'server'; user: string; password: string; agentId: string }
  | { role: 'agent'; user: string; password: string };

export interface ZooKeeperOptions {
  /** `host:port,host:port` */
  servers: string;
  /** Path under which knit keeps everything, e.g. `/knit`. */
  root: string;
  sessionTimeoutMs: number;
  log: Logger;
  /** How long to wait for the first connection before failing. */
  connectTimeoutMs?: number;
  /** Absent: anonymous (an open tree as before, or read-only on a protected one). See the module doc. */
  credentials?: ZooKeeperCredentials;
}

/** ZooKeeper's digest ACL id of a credential: `user:base64(sha1("user:password"))`. */
export function digestId(user: string, password: string): string {
  return `${user}:${createHash('sha1').update(`${user}:${password}`, 'utf8').digest('base64')}`;
}

const DIGEST_ID = /^[^:]+:[A-Za-z0-9+/]{27}=$/;
/** KV keys that hold secrets or per-node state: no world READ. */
const PRIVATE_KV = /^(tokens|nodes)\//;
const SERVER_ID_NODE = 'server-id';

const enc = encodeURIComponent;

/** A znode name back to the key it encodes; a name knit did not write is taken as it is. */
function safeDecode(name: string): string {
  try {
    return decodeURIComponent(name);
  } catch {
    return name;
  }
}

function code(e: unknown): number | undefined {
  return e instanceof Exception ? e.getCode() : undefined;
}

/** @types/node-zookeeper-client calls the field `perms`; the library's ACL objects carry `permission`. */
function permsOf(a: ZkAcl): number {
  return (a as unknown as { permission?: number }).permission ?? a.perms;
}

function sameAcl(a: ZkAcl[], b: ZkAcl[]): boolean {
  const key = (l: ZkAcl[]): string => l.map((x) => `${x.id.scheme}:${x.id.id}:${permsOf(x)}`).sort().join('\n');
  return key(a) === key(b);
}

/** The ACLs a client puts on what it creates and (server role) keeps on what exists. */
interface AclPlan {
  root: ZkAcl[];
  kv: ZkAcl[];
  kvKey(key: string): ZkAcl[];
  services: ZkAcl[];
  serviceDir: ZkAcl[];
  instance: ZkAcl[];
  serverId: ZkAcl[];
}

const worldAcl = (perms: number): ZkAcl => new ACL(perms, new Id('world', 'anyone'));
const digestAcl = (perms: number, id: string): ZkAcl => new ACL(perms, new Id('digest', id));

const OPEN = [worldAcl(Permission.ALL)];
const OPEN_PLAN: AclPlan = { root: OPEN, kv: OPEN, kvKey: () => OPEN, services: OPEN, serviceDir: OPEN, instance: OPEN, serverId: OPEN };

function protectedPlan(serverIds: string[], agentId: string): AclPlan {
  const server = serverIds.map((id) => digestAcl(Permission.ALL, id));
  const readable = [...server, worldAcl(Permission.READ)];
  return {
    root: readable,
    kv: readable,
    kvKey: (key) => (PRIVATE_KV.test(key) ? server : readable),
    services: [...server, digestAcl(Permission.CREATE | Permission.READ, agentId), worldAcl(Permission.READ)],
    serviceDir: [...server, digestAcl(Permission.CREATE | Permission.DELETE | Permission.READ, agentId), worldAcl(Permission.READ)],
    instance: [...server, digestAcl(Permission.ALL, agentId), worldAcl(Permission.READ)],
    serverId: [...server, digestAcl(Permission.READ, agentId)],
  };
}

/** Which credential a write needs, for the message of KNIT_ERR_REGISTRY_DENIED. */
type Need = 'server' | 'agent';

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
  /** This client's own digest id, when it has credentials. */
  private readonly ownId: string | undefined;
  /** Set by connect(): open, or learnt/computed for the credential's role. */
  private acl: AclPlan = OPEN_PLAN;

  private constructor(private readonly o: ZooKeeperOptions) {
    const c = o.credentials;
    if (c) {
      if (!/^[\x21-\x39\x3b-\x7e]+$/.test(c.user)) throw new KnitError('KNIT_ERR_CONFIG', 'ZooKeeper credential: the user must be printable ASCII without spaces or ":"');
      if (!c.password) throw new KnitError('KNIT_ERR_CONFIG', `ZooKeeper credential of ${c.user}: the password is empty`);
      if (c.role === 'server' && !DIGEST_ID.test(c.agentId)) throw new KnitError('KNIT_ERR_CONFIG', 'ZooKeeper server credential: agentId must be a digest id user:base64(sha1(user:password)), see digestId()');
      this.ownId = digestId(c.user, c.password);
    }
  }

  /**
   * Connects and prepares the tree for this client's role: anonymous creates
   * what is missing, open (on a protected tree it writes nothing); the server
   * creates and protects the tree; an agent reads the server's id. Rejects
   * KNIT_ERR_REGISTRY_UNAVAILABLE naming the servers when they cannot be
   * reached in time, or (agent) while knit server has not protected the tree
   * yet; KNIT_ERR_REGISTRY_DENIED when the tree refuses this credential;
   * KNIT_ERR_CONFIG for malformed credentials.
   */
  static async connect(o: ZooKeeperOptions): Promise<ZooKeeperRegistry> {
    const r = new ZooKeeperRegistry(o);
    await r.openSession();
    try {
      const c = o.credentials;
      if (!c) {
        // Exists before create: on a protected tree ZooKeeper checks the parent's CREATE before NODE_EXISTS.
        await r.ensurePath(`${o.root}/services`, OPEN, 'server');
        await r.ensurePath(`${o.root}/kv`, OPEN, 'server');
      } else if (c.role === 'server') {
        r.acl = protectedPlan([r.ownId!], c.agentId);
        await r.protectTree();
      } else {
        r.acl = protectedPlan(await r.readServerIds(), r.ownId!);
      }
    } catch (e) {
      await r.close();
      throw wrapError('KNIT_ERR_REGISTRY_UNAVAILABLE', `ZooKeeper: preparing ${o.root}`, e);
    }
    return r;
  }

  private async openSession(): Promise<void> {
    const client = zookeeper.createClient(this.o.servers, { sessionTimeout: this.o.sessionTimeoutMs, spinDelay: 200, retries: 1 });
    // Before connect(): the library keeps it and sends it first on every (re)connection of this client.
    const c = this.o.credentials;
    if (c) client.addAuthInfo('digest', Buffer.from(`${c.user}:${c.password}`, 'utf8'));
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
      } else if (s === State.AUTH_FAILED) {
        // Digest authentication does not fail on a wrong password (it only yields another id);
        // this is a malformed credential, and the library closes the connection for good.
        this.o.log.error({ event: EVENTS.registryError, servers: this.o.servers, user: c?.user }, 'ZooKeeper refused the credential');
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

  /**
   * Server role: creates the tree with its ACLs, then sets them wherever they
   * differ, parents first so that nothing new can be created open meanwhile.
   */
  private async protectTree(): Promise<void> {
    const { root } = this.o;
    const acl = this.acl;
    let changed = 0;
    const keep = async (path: string, want: ZkAcl[]): Promise<void> => {
      if (await this.enforceAcl(path, want)) changed++;
    };
    await this.ensurePath(root, acl.root, 'server');
    await keep(root, acl.root);
    const ids = Buffer.from(JSON.stringify({ server: [this.ownId] }));
    await Promise.all([
      this.ensurePath(`${root}/kv`, acl.kv, 'server').then(() => keep(`${root}/kv`, acl.kv)),
      this.ensurePath(`${root}/services`, acl.services, 'server').then(() => keep(`${root}/services`, acl.services)),
      this.ensureServerId(ids).then(() => keep(`${root}/${SERVER_ID_NODE}`, acl.serverId)),
    ]);
    const [keys, services] = await Promise.all([this.getChildren(`${root}/kv`), this.getChildren(`${root}/services`)]);
    await Promise.all([
      ...(keys ?? []).map((k) => keep(`${root}/kv/${k}`, acl.kvKey(safeDecode(k)))),
      ...(services ?? []).map(async (s) => {
        const dir = `${root}/services/${s}`;
        await keep(dir, acl.serviceDir);
        const children = (await this.getChildren(dir)) ?? [];
        await Promise.all(
          children.map(async (child) => {
            // An instance an anonymous agent wrote before the tree was protected: the world may not change it any more.
            const got = await this.getAcl(`${dir}/${child}`);
            if (got?.some((a) => a.id.scheme === 'world' && (permsOf(a) & ~Permission.READ) !== 0)) await keep(`${dir}/${child}`, acl.instance);
          }),
        );
      }),
    ]);
    if (changed) this.o.log.info({ root, znodes: changed }, `set knit's ACLs on ${changed} znode(s) under ${root}`);
  }

  private async ensureServerId(data: Buffer): Promise<void> {
    const path = `${this.o.root}/${SERVER_ID_NODE}`;
    await this.ensurePath(path, this.acl.serverId, 'server', data);
    const cur = await this.getData(path);
    if (cur && !cur.data.equals(data)) await this.call<Stat>('update', path, (c, cb) => c.setData(path, data, -1, cb));
  }

  /** Agent role: the server's digest id(s), which it puts on every znode it creates. */
  private async readServerIds(): Promise<string[]> {
    const path = `${this.o.root}/${SERVER_ID_NODE}`;
    const user = this.o.credentials?.user;
    let got: { data: Buffer } | undefined;
    try {
      got = await this.getData(path);
    } catch (e) {
      if (!isKnitError(e, 'KNIT_ERR_REGISTRY_DENIED')) throw e;
      throw new KnitError(
        'KNIT_ERR_REGISTRY_DENIED',
        `ZooKeeper denied reading ${path} to the agent credential "${user}": knit server grants agents another credential (its agent_auth file must hold the same user:password as this agent's auth file)`,
        { cause: e },
      );
    }
    if (!got) {
      throw new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `${this.o.root} in ZooKeeper is not protected yet (no ${path}): start knit server with auth= and agent_auth= in its registry URL; this agent waits for it`);
    }
    let ids: unknown;
    try {
      ids = (JSON.parse(got.data.toString('utf8')) as { server?: unknown }).server;
    } catch {
      ids = undefined;
    }
    if (!Array.isArray(ids) || ids.length === 0 || !ids.every((x) => typeof x === 'string' && DIGEST_ID.test(x))) {
      throw new KnitError('KNIT_ERR_REGISTRY_DENIED', `${path} does not hold { "server": [digest ids] }: it was not written by knit server`);
    }
    return ids as string[];
  }

  private live(): void {
    if (this.closed) throw new KnitError('KNIT_ERR_CLOSED', 'registry client is closed');
  }

  /**
   * Runs one ZooKeeper call as a promise, bounded so a lost connection cannot
   * hang a caller. NO_AUTH (and AUTH_FAILED) become KNIT_ERR_REGISTRY_DENIED
   * here, the one place, naming `op`, `path` and the credential it `need`s.
   */
  private call<T>(op: string, path: string, fn: (c: Client, cb: (err: unknown, v: T) => void) => void, need: Need = 'server'): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const bound = Math.max(this.o.sessionTimeoutMs, 5000);
      const timer = setTimeout(() => reject(new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `ZooKeeper ${op} ${path} did not answer within ${bound} ms`)), bound);
      fn(this.client, (err, v) => {
        clearTimeout(timer);
        const c = code(err);
        if (c === Exception.NO_AUTH || c === Exception.AUTH_FAILED) reject(this.denied(op, path, need, err));
        // ZooKeeper's Exception is not an Error subclass; it is kept as is so callers can read its code.
        // eslint-disable-next-line @typescript-eslint/prefer-promise-reject-errors
        else if (err) reject(err);
        else resolve(v);
      });
    });
  }

  private denied(op: string, path: string, need: Need, cause: unknown): KnitError {
    const c = this.o.credentials;
    const needs = need === 'server' ? "knit's server credential" : "knit's agent or server credential";
    let have: string;
    if (!c) have = 'this client has no credential (auth=file:... in the registry URL)';
    else if (c.role === 'server' || need === 'agent') have = `this client's ${c.role} credential "${c.user}" is not the one the tree grants (another password, or knit server set up with another credential)`;
    else have = `this client has the ${c.role} credential "${c.user}"`;
    return new KnitError('KNIT_ERR_REGISTRY_DENIED', `ZooKeeper denied ${op} ${path}: it needs ${needs}; ${have}`, { cause });
  }

  private unavailable(what: string, e: unknown): KnitError {
    return wrapError('KNIT_ERR_REGISTRY_UNAVAILABLE', `ZooKeeper ${what}`, e);
  }

  private exists(path: string): Promise<Stat | undefined> {
    return this.call<Stat | undefined>('exists', path, (c, cb) => c.exists(path, (err, st) => cb(err, st ?? undefined)));
  }

  /**
   * Creates whatever is missing of `path` with `acl` (`data` on the last
   * znode). Never creates what exists: on a protected tree ZooKeeper checks
   * the parent's CREATE permission before NODE_EXISTS, so a blind mkdirp
   * would be refused even where nothing needs creating.
   */
  private async ensurePath(path: string, acl: ZkAcl[], need: Need, data?: Buffer): Promise<void> {
    if (await this.exists(path)) return;
    let at = '';
    for (const part of path.split('/').slice(1)) {
      const p = (at += `/${part}`);
      if (await this.exists(p)) continue;
      await this.call<string | undefined>(
        'create',
        p,
        (c, cb) => {
          const done = (err: unknown, made: string): void => (code(err) === Exception.NODE_EXISTS ? cb(null, undefined) : cb(err, made));
          if (data && p === path) c.create(p, data, acl, CreateMode.PERSISTENT, done);
          else c.create(p, acl, CreateMode.PERSISTENT, done);
        },
        need,
      );
    }
  }

  private getAcl(path: string): Promise<ZkAcl[] | undefined> {
    return this.call<ZkAcl[] | undefined>('read the ACL of', path, (c, cb) => c.getACL(path, (err, acls) => (code(err) === Exception.NO_NODE ? cb(null, undefined) : cb(err, acls))));
  }

  /** Sets `want` as the ACL of `path` unless it is already; true when it changed something. */
  private async enforceAcl(path: string, want: ZkAcl[]): Promise<boolean> {
    const got = await this.getAcl(path);
    if (!got || sameAcl(got, want)) return false;
    await this.call<Stat | undefined>('set the ACL of', path, (c, cb) => c.setACL(path, want, -1, (err, st) => (code(err) === Exception.NO_NODE ? cb(null, undefined) : cb(err, st))));
    this.o.log.debug({ path }, 'set the ACL of a znode');
    return true;
  }

  private getData(path: string, watcher?: (e: ZkEvent) => void): Promise<{ data: Buffer; stat: Stat } | undefined> {
    return this.call<{ data: Buffer; stat: Stat } | undefined>('read', path, (c, cb) => {
      const done = (err: unknown, data: Buffer, stat: Stat): void => (code(err) === Exception.NO_NODE ? cb(null, undefined) : cb(err, err ? undefined : { data, stat }));
      if (watcher) c.getData(path, watcher, done);
      else c.getData(path, done);
    });
  }

  private getChildren(path: string, watcher?: (e: ZkEvent) => void): Promise<string[] | undefined> {
    return this.call<string[] | undefined>('list', path, (c, cb) => {
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
    await this.ensurePath(`${this.o.root}/services/${i.service}`, this.acl.serviceDir, 'agent').catch((e: unknown) => {
      throw this.unavailable(`register ${i.id}`, e);
    });
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        await this.call<string>('create', path, (c, cb) => c.create(path, data, this.acl.instance, CreateMode.EPHEMERAL, cb), 'agent');
        return;
      } catch (e) {
        if (code(e) !== Exception.NODE_EXISTS) throw this.unavailable(`register ${i.id}`, e);
      }
      const cur = await this.getData(path);
      if (!cur) continue;
      if (cur.stat.ephemeralOwner.equals(this.sessionId())) {
        await this.call<Stat>('update', path, (c, cb) => c.setData(path, data, -1, cb), 'agent');
        return;
      }
      // An earlier session of this node (a restart before it lapsed): take the instance over.
      await this.call<void>('remove', path, (c, cb) => c.remove(path, -1, (err) => cb(code(err) === Exception.NO_NODE ? null : err, undefined)), 'agent');
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
      await this.call<Stat>('update', path, (c, cb) => c.setData(path, Buffer.from(JSON.stringify(next)), -1, cb), 'agent');
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
    await this.call<void>('remove', path, (c, cb) => c.remove(path, got.stat.version, (err) => cb(code(err) === Exception.NO_NODE || code(err) === Exception.BAD_VERSION ? null : err, undefined)), 'agent').catch((e: unknown) => {
      throw this.unavailable(`deregister ${id}`, e);
    });
  }

  /**
   * Removes any client's instance. ZooKeeper lets the agent credential delete
   * in service directories (an agent takes over its own instances from an
   * earlier session), so keeping evict to the server is this client's check
   * for that role; for anonymous clients ZooKeeper itself refuses it.
   */
  async evict(service: string, id: string): Promise<void> {
    this.live();
    const c = this.o.credentials;
    const path = this.instancePath({ service, id });
    if (c?.role === 'agent') {
      throw new KnitError('KNIT_ERR_REGISTRY_DENIED', `evicting ${path} needs knit's server credential; this client has the agent credential "${c.user}" (an agent removes only its own instances, with deregister)`);
    }
    if (this.owned.get(id)?.service === service) this.owned.delete(id);
    await this.call<void>('remove', path, (cl, cb) => cl.remove(path, -1, (err) => cb(code(err) === Exception.NO_NODE ? null : err, undefined)), 'server').catch((e: unknown) => {
      throw this.unavailable(`evict ${id}`, e);
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
          if (created) await this.call<Stat>('exists', dir, (c, cb) => c.exists(dir, created, cb));
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
      await this.call<string>('create', path, (c, cb) => c.create(path, data, this.acl.kvKey(key), CreateMode.PERSISTENT, cb));
      return 1;
    };
    const set = async (v: number): Promise<number> => (await this.call<Stat>('write', path, (c, cb) => c.setData(path, data, v, cb))).version + 1;
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
      await this.call<void>('remove', path, (c, cb) => c.remove(path, expectedVersion === undefined ? -1 : expectedVersion - 1, (err) => cb(err, undefined)));
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
          const stat = await this.call<Stat | undefined>('exists', path, (c, cb) => c.exists(path, created, (err, st) => cb(err, st ?? undefined)));
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
