/**
 * The ZooKeeper backend of the Registry contract (node-zookeeper-client),
 * laid out as SmartStack's nerve does it:
 *
 *   <root>/services/<service>/<instance id, URI-encoded>   ephemeral, JSON Instance
 *   <root>/kv/<key, URI-encoded>                             persistent, the value
 *   <root>/server-id                                         JSON { server: [digest id] }
 *
 * An instance is an ephemeral znode of this client's session, so an agent
 * that dies disappears with its session.
 *
 * Faults. This client keeps what its caller asked for (each instance it
 * owns, with its latest health) apart from what it knows ZooKeeper holds,
 * and writes the difference until there is none: a write that fails for a
 * lost connection is retried in the background (with a capped backoff, and
 * at once on reconnection) even though the call rejected; on session expiry
 * it builds a new session, writes every instance again, and then tells
 * onResync listeners. Writes of one instance are serialised, each writing
 * the latest wish, so a late re-registration cannot undo a newer health
 * change or resurrect a deregistered instance.
 *
 * Watches are one-shot in ZooKeeper. Every read of a watch sets the watch
 * again (node-zookeeper-client keeps one listener per path and function, so
 * this piles nothing up), so a watch is re-armed by any read that succeeds
 * and by nothing else: a read that fails is retried with a capped backoff,
 * at once on reconnection, and after a new session. While the connection is
 * lost, watchers keep their last snapshot (fail static) and are told through
 * onError; a fresh snapshot follows the reconnection.
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
import { byCodeUnit } from '../../compare.js';
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
  /**
   * How long a server may hold an accepted connection without answering
   * the session handshake before knit closes it and the library tries
   * again. Default a quarter of the session timeout, from 2 s to 10 s.
   */
  handshakeTimeoutMs?: number;
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

/**
 * Backoff of a failed watch read or instance write: doubling from 100 ms
 * (one lost packet costs little) up to 10 s, so that a watch or an instance
 * is right again within 10 s of ZooKeeper answering again even when no
 * reconnection event says so; a reconnection retries at once anyway.
 */
function faultRetryDelay(failures: number): number {
  return Math.min(10_000, 100 * 2 ** Math.min(failures, 10));
}

/** How often in a row a watch re-reads because its node came and went between two reads, before it backs off. */
const MAX_RACING_READS = 5;

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

/**
 * What stopClient() and the handshake watch need of node-zookeeper-client's
 * (1.1.x) connection manager: not part of its typed API. A release without
 * `state` and `socket` turns the handshake watch off, and the handshake
 * test in zookeeper.test.ts fails.
 */
interface ConnectionInternals {
  /** ConnectionManager.STATES: CM_CONNECTING while it connects and waits for the handshake's answer. */
  state?: number;
  socket?: { connecting?: boolean; destroyed?: boolean; remoteAddress?: string; remotePort?: number; destroy(): void };
  connect(): void;
  onSocketConnected(): void;
}
/** ConnectionManager.STATES.CONNECTING. */
const CM_CONNECTING = 1;

/**
 * Stops a client for good. A connected one is closed (its session ends
 * and its ephemeral znodes go at once). One that is not connected cannot
 * be: node-zookeeper-client's close() then only marks it closing, keeps
 * reconnecting, and throws an uncaught "Unknown code" when the connect
 * response it then gets arrives (its issues #22 and #70), which would take
 * the whole process down when ZooKeeper comes back. Such a client is
 * stopped instead by dropping its socket and giving it nothing to
 * reconnect with; its session, if it ever had one, expires on the server.
 */
function stopClient(client: Client): void {
  const state = client.getState();
  const cm = (client as unknown as { connectionManager?: ConnectionInternals }).connectionManager;
  if (state === State.SYNC_CONNECTED || state === State.CONNECTED_READ_ONLY || !cm) {
    client.close();
    return;
  }
  cm.connect = () => undefined;
  cm.onSocketConnected = function (this: ConnectionInternals) {
    this.socket?.destroy();
  };
  cm.socket?.destroy();
}

/** A ZooKeeper watcher: any event makes the watch that set it read again. */
type Watcher = (e: ZkEvent) => void;

/** One open watch, as the session handling sees it. */
interface LiveWatch {
  /** Reads again now (and so re-arms), whatever retry was pending. */
  refresh(): void;
  /** Tells the watcher about a fault; its last snapshot stays valid. */
  fail(err: Error): void;
  close(): void;
}

/**
 * An instance this client owns: what the caller last asked for, and what
 * this client last wrote to ZooKeeper (in which session). They differ
 * while a write is pending or failed; the entry goes once a deregistered
 * instance's znode is gone.
 */
interface Owned {
  /** The instance as last asked for; undefined once deregistered (until its znode is removed). */
  want: Instance | undefined;
  /** The last successful write, and the session generation it went to. */
  written: { instance: Instance; generation: number } | undefined;
}

export class ZooKeeperRegistry implements Registry {
  readonly kind = 'zookeeper';
  private client!: Client;
  /** A client still connecting (a new session): close() closes it too, so no session outlives close(). */
  private connecting: Client | undefined;
  private closed = false;
  /** Aborted by close(): ends every wait of the recovery and resync loops. */
  private readonly stop = new AbortController();
  private readonly owned = new Map<string, Owned>();
  /** Per instance id, the tail of its chain of writes (see locked()). */
  private readonly locks = new Map<string, Promise<void>>();
  private readonly watches = new Set<LiveWatch>();
  /** Per client, how to fail each call it still owes an answer (see closeClient()). */
  private readonly inflight = new WeakMap<Client, Set<() => void>>();
  private readonly resyncListeners = new Set<() => void>();
  private wasDisconnected = false;
  private sessionGeneration = 0;
  /** Set when the session is gone and a new one is needed; cleared by the recovery loop as it starts one. */
  private sessionLost = false;
  private recovering: Promise<void> | undefined;
  private resyncing: Promise<boolean> | undefined;
  /** Pending backoff waits; a reconnection or a new session cuts them short. */
  private readonly sleepers = new Set<() => void>();
  private lostTimer: NodeJS.Timeout | undefined;
  /** Per client that is not connected, its handshake watch (see watchHandshake()). */
  private readonly handshakeWatches = new Map<Client, NodeJS.Timeout>();
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

  /**
   * A new client and session. Rejects KNIT_ERR_REGISTRY_UNAVAILABLE when it
   * cannot connect in time and KNIT_ERR_CLOSED when close() came first; in
   * both cases the new client is closed, so no session is left behind.
   */
  private async openSession(): Promise<void> {
    const client = zookeeper.createClient(this.o.servers, { sessionTimeout: this.o.sessionTimeoutMs, spinDelay: 200, retries: 1 });
    // Before connect(): the library keeps it and sends it first on every (re)connection of this client.
    const c = this.o.credentials;
    if (c) client.addAuthInfo('digest', Buffer.from(`${c.user}:${c.password}`, 'utf8'));
    const timeout = this.o.connectTimeoutMs ?? 30_000;
    const signal = this.stop.signal;
    this.connecting = client;
    try {
      await new Promise<void>((resolve, reject) => {
        let settled = false;
        const settle = (err?: KnitError): void => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          this.unwatchHandshake(client);
          signal.removeEventListener('abort', aborted);
          if (err) reject(err);
          else resolve();
        };
        const aborted = (): void => settle(new KnitError('KNIT_ERR_CLOSED', 'registry client closed while connecting to ZooKeeper'));
        const timer = setTimeout(() => settle(new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `cannot reach ZooKeeper at ${this.o.servers} within ${timeout} ms`)), timeout);
        signal.addEventListener('abort', aborted, { once: true });
        client.once('connected', () => settle());
        if (signal.aborted) aborted();
        else {
          this.watchHandshake(client);
          client.connect();
        }
      });
    } catch (e) {
      this.closeClient(client);
      throw e;
    } finally {
      if (this.connecting === client) this.connecting = undefined;
    }
    this.client = client;
    const generation = ++this.sessionGeneration;
    client.on('state', (s) => {
      this.o.log.debug({ event: EVENTS.registryClientState, state: s.toString(), generation }, 'ZooKeeper client state');
      if (generation !== this.sessionGeneration || this.closed) return;
      this.unwatchHandshake(client);
      if (s === State.DISCONNECTED) {
        this.watchHandshake(client);
        this.wasDisconnected = true;
        this.o.log.warn({ event: EVENTS.registryError, servers: this.o.servers }, 'disconnected from ZooKeeper; routing on the last known instances');
        for (const w of this.watches) w.fail(new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', 'disconnected from ZooKeeper'));
        // Past the session timeout the server has expired the session anyway; a client that
        // has not found out by then (seen with node-zookeeper-client after a server restart)
        // is replaced, as Curator does, so registrations and watches come back by themselves.
        clearTimeout(this.lostTimer);
        this.lostTimer = setTimeout(() => {
          if (this.wasDisconnected && generation === this.sessionGeneration && !this.closed) this.sessionExpired();
        }, this.o.sessionTimeoutMs * 1.5);
        this.lostTimer.unref();
      } else if (s === State.SYNC_CONNECTED && this.wasDisconnected) {
        clearTimeout(this.lostTimer);
        this.wasDisconnected = false;
        this.o.log.info({ event: EVENTS.registryError, servers: this.o.servers }, 'reconnected to ZooKeeper; resyncing');
        // The same session: ephemeral znodes are still there, but writes that failed meanwhile are not.
        this.wake();
        for (const w of this.watches) w.refresh();
        this.resyncInBackground();
      } else if (s === State.EXPIRED) {
        this.sessionExpired();
      } else if (s === State.AUTH_FAILED) {
        // Digest authentication does not fail on a wrong password (it only yields another id);
        // this is a malformed credential, and the library closes the connection for good.
        this.o.log.error({ event: EVENTS.registryError, servers: this.o.servers, user: c?.user }, 'ZooKeeper refused the credential');
      }
    });
  }

  /** The session is gone (expired, or lost for longer than it can live): start, or restart, recovery. */
  private sessionExpired(): void {
    if (this.closed) return;
    this.sessionLost = true;
    this.wake();
    this.recovering ??= this.recover().finally(() => (this.recovering = undefined));
  }

  /**
   * After session expiry: a new session, every watch re-armed, every owned
   * instance written again (retried until it is), then onResync listeners
   * told. A session lost again meanwhile starts over; close() ends it.
   */
  private async recover(): Promise<void> {
    while (this.sessionLost && !this.closed) {
      this.sessionLost = false;
      this.o.log.warn({ event: EVENTS.registryError }, `ZooKeeper session expired or lost; re-registering ${this.wanted()} instance(s)`);
      clearTimeout(this.lostTimer);
      this.closeClient(this.client);
      this.wasDisconnected = false;
      for (let attempt = 0; ; attempt++) {
        if (this.closed) return;
        try {
          await this.openSession();
          break;
        } catch (e) {
          if (this.closed) return;
          this.o.log.warn({ event: EVENTS.registryError, err: (e as Error).message }, 'still cannot reach ZooKeeper');
          await this.sleep(faultRetryDelay(attempt));
        }
      }
      // Every ZooKeeper watch of the old session is gone: re-read and re-arm all.
      for (const w of this.watches) w.refresh();
      if (await this.resyncLoop(true)) {
        this.o.log.info({ event: EVENTS.registryError, instances: this.wanted() }, `ZooKeeper session re-established; ${this.wanted()} instance(s) registered again`);
        for (const l of [...this.resyncListeners]) {
          try {
            l();
          } catch (e) {
            this.o.log.error({ event: EVENTS.registryError, err: (e as Error).message }, 'an onResync listener threw');
          }
        }
      }
    }
  }

  /** How many instances the caller wants registered. */
  private wanted(): number {
    let n = 0;
    for (const e of this.owned.values()) if (e.want) n++;
    return n;
  }

  /** Waits `ms`, or less when close(), a reconnection or a lost session cuts it short. */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.sleepers.delete(done);
        this.stop.signal.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      timer.unref();
      this.sleepers.add(done);
      this.stop.signal.addEventListener('abort', done, { once: true });
    });
  }

  private wake(): void {
    for (const s of [...this.sleepers]) s();
  }

  /** Starts the background resync unless one (or a recovery, which does its own) is running. */
  private resyncInBackground(): void {
    if (this.closed || this.recovering || this.resyncing) return;
    this.resyncing = this.resyncLoop(false).finally(() => (this.resyncing = undefined));
  }

  /**
   * Writes every owned instance that differs from what this session holds,
   * retrying with backoff until none does. True when done; false when
   * closed or when the session was lost (the recovery takes over). The
   * background loop also gives way to a recovery.
   */
  private async resyncLoop(recovery: boolean): Promise<boolean> {
    for (let failures = 0; ; ) {
      if (this.closed || this.sessionLost || (!recovery && this.recovering)) return false;
      const stale = [...this.owned.keys()].filter((id) => !this.inSync(id));
      if (!stale.length) return true;
      let failed: unknown;
      for (const id of stale) {
        if (this.closed || this.sessionLost) return false;
        await this.syncOne(id).catch((e: unknown) => (failed ??= e));
      }
      if (failed === undefined) continue;
      const wait = faultRetryDelay(failures++);
      // The first failure and then every tenth: a long outage must not flood the log.
      if (failures === 1 || failures % 10 === 0) {
        this.o.log.warn({ event: EVENTS.registryError, err: (failed as Error).message, failures, retryInMs: wait }, `instance(s) not written to ZooKeeper yet, retrying in ${wait} ms: ${(failed as Error).message}`);
      }
      await this.sleep(wait);
    }
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
    if (changed) this.o.log.info({ event: EVENTS.registryAclsSet, root, znodes: changed }, `set knit's ACLs on ${changed} znode(s) under ${root}`);
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
    const client = this.client;
    return new Promise<T>((resolve, reject) => {
      const bound = Math.max(this.o.sessionTimeoutMs, 5000);
      let calls = this.inflight.get(client);
      if (!calls) this.inflight.set(client, (calls = new Set()));
      const pending = calls;
      const settle = (): void => {
        clearTimeout(timer);
        pending.delete(abandon);
      };
      // A closed client may never call back a request it had queued: closeClient() fails it at once.
      const abandon = (): void => {
        settle();
        reject(new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `ZooKeeper ${op} ${path}: the session was closed`));
      };
      const timer = setTimeout(() => {
        settle();
        reject(new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `ZooKeeper ${op} ${path} did not answer within ${bound} ms`));
      }, bound);
      pending.add(abandon);
      fn(client, (err, v) => {
        settle();
        const c = code(err);
        if (c === Exception.NO_AUTH || c === Exception.AUTH_FAILED) reject(this.denied(op, path, need, err));
        // ZooKeeper's Exception is not an Error subclass; it is kept as is so callers can read its code.
        // eslint-disable-next-line @typescript-eslint/prefer-promise-reject-errors
        else if (err) reject(err);
        else resolve(v);
      });
    });
  }

  /**
   * node-zookeeper-client bounds a TCP connect (session timeout / servers)
   * but not the session handshake after it: a server that accepts the
   * connection and never answers holds the client until knit gives the
   * session up (1.5 session timeouts) and starts another. ZooKeeper 3.8
   * does that to a connection that arrives while it loads its database
   * after a restart (its worker throws a NullPointerException instead of
   * closing it), which is just when every client of the ensemble
   * reconnects. While the client is not connected, this closes a
   * connection left unanswered for handshakeTimeoutMs, and the library
   * tries again, in the same session if it is still alive.
   */
  private watchHandshake(client: Client): void {
    const cm = (client as unknown as { connectionManager?: ConnectionInternals }).connectionManager;
    if (!cm || this.handshakeWatches.has(client)) return;
    const ms = this.o.handshakeTimeoutMs ?? Math.min(10_000, Math.max(2_000, Math.floor(this.o.sessionTimeoutMs / 4)));
    let seen: ConnectionInternals['socket'];
    let since = 0;
    const timer = setInterval(() => {
      const sock = cm.socket;
      if (cm.state !== CM_CONNECTING || !sock || sock.connecting || sock.destroyed) {
        seen = undefined;
        return;
      }
      const now = Date.now();
      if (sock !== seen) {
        seen = sock;
        since = now;
      } else if (now - since >= ms) {
        seen = undefined;
        const server = `${sock.remoteAddress ?? '?'}:${sock.remotePort ?? '?'}`;
        this.o.log.warn({ event: EVENTS.registryError, servers: this.o.servers, server, ms }, `ZooKeeper at ${server} accepted the connection but did not answer the session handshake within ${ms} ms; connecting again`);
        sock.destroy();
      }
    }, Math.max(50, Math.min(1000, Math.floor(ms / 4))));
    timer.unref();
    this.handshakeWatches.set(client, timer);
  }

  private unwatchHandshake(client: Client): void {
    clearInterval(this.handshakeWatches.get(client));
    this.handshakeWatches.delete(client);
  }

  /** Closes a client, connected or not, and fails the calls it still owes an answer. */
  private closeClient(client: Client): void {
    this.unwatchHandshake(client);
    stopClient(client);
    for (const abandon of [...(this.inflight.get(client) ?? [])]) abandon();
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
    this.o.log.debug({ event: EVENTS.registryAclsSet, path }, 'set the ACL of a znode');
    return true;
  }

  private getData(path: string, watcher?: Watcher): Promise<{ data: Buffer; stat: Stat } | undefined> {
    return this.call<{ data: Buffer; stat: Stat } | undefined>('read', path, (c, cb) => {
      const done = (err: unknown, data: Buffer, stat: Stat): void => (code(err) === Exception.NO_NODE ? cb(null, undefined) : cb(err, err ? undefined : { data, stat }));
      if (watcher) c.getData(path, watcher, done);
      else c.getData(path, done);
    });
  }

  private getChildren(path: string, watcher?: Watcher): Promise<string[] | undefined> {
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

  /** Removes an instance's znode if it belongs to this session (another session's is someone else's now). */
  private async removeOwn(i: Instance): Promise<void> {
    const path = this.instancePath(i);
    const got = await this.getData(path);
    if (!got || !got.stat.ephemeralOwner.equals(this.sessionId())) return;
    await this.call<void>('remove', path, (c, cb) => c.remove(path, got.stat.version, (err) => cb(code(err) === Exception.NO_NODE || code(err) === Exception.BAD_VERSION ? null : err, undefined)), 'agent');
  }

  /**
   * Runs `fn` after every earlier write of instance `id` has settled: writes
   * of one instance never overlap, so each one writes the latest wish and
   * none can land after a newer one.
   */
  private locked(id: string, fn: () => Promise<void>): Promise<void> {
    const run = (this.locks.get(id) ?? Promise.resolve()).then(fn);
    const tail = run.catch(() => undefined);
    this.locks.set(id, tail);
    void tail.then(() => {
      if (this.locks.get(id) === tail) this.locks.delete(id);
    });
    return run;
  }

  /** True when ZooKeeper holds what the caller asked for instance `id`, in this session. */
  private inSync(id: string): boolean {
    const e = this.owned.get(id);
    if (!e) return true;
    return e.want !== undefined && e.written?.instance === e.want && e.written.generation === this.sessionGeneration;
  }

  /** Makes ZooKeeper hold the latest wish for instance `id` in the current session. Rejects as the failing call did. */
  private syncOne(id: string): Promise<void> {
    return this.locked(id, async () => {
      const e = this.owned.get(id);
      if (!e || this.inSync(id)) return;
      const generation = this.sessionGeneration;
      const want = e.want;
      // What this session wrote; an earlier session's znodes went with that session.
      const prev = e.written?.generation === generation ? e.written.instance : undefined;
      if (prev && (!want || this.instancePath(prev) !== this.instancePath(want))) {
        // Deregistered, or moved to another service: the znode this session wrote goes.
        await this.removeOwn(prev).catch((err: unknown) => {
          throw this.unavailable(`deregister ${id}`, err);
        });
        e.written = undefined;
      }
      if (!want) {
        if (this.owned.get(id) === e && e.want === undefined) this.owned.delete(id);
        return;
      }
      const path = this.instancePath(want);
      if (e.written && prev && this.instancePath(prev) === path) {
        // Written in this session already: one setData, unless the znode was evicted meanwhile.
        try {
          await this.call<Stat>('update', path, (c, cb) => c.setData(path, Buffer.from(JSON.stringify(want)), -1, cb), 'agent');
        } catch (err) {
          if (code(err) !== Exception.NO_NODE) throw this.unavailable(`update ${id}`, err);
          await this.createInstance(want);
        }
      } else {
        await this.createInstance(want);
      }
      // Only a write that succeeded changes what is known to be there: after a failure ZooKeeper
      // holds the previous write (or, if the answer was lost, perhaps this one; it is written again).
      e.written = { instance: want, generation };
    });
  }

  /**
   * Writes a new wish for instance `id` now. A fault that a retry may cure
   * keeps the wish (a background resync writes it, and the call may have
   * taken effect anyway); a refusal (KNIT_ERR_REGISTRY_DENIED) puts the
   * previous one back. Rejects with the KnitError either way.
   */
  private async write(id: string, what: string, rollback: () => void): Promise<void> {
    try {
      await this.syncOne(id);
    } catch (e) {
      const err = this.unavailable(what, e);
      if (err.retryable) this.resyncInBackground();
      else rollback();
      throw err;
    }
  }

  async register(instance: Instance): Promise<void> {
    this.live();
    const want = structuredClone(instance);
    let e = this.owned.get(want.id);
    if (!e) this.owned.set(want.id, (e = { want: undefined, written: undefined }));
    const entry = e;
    const before = entry.want;
    entry.want = want;
    await this.write(want.id, `register ${want.id}`, () => {
      if (entry.want !== want) return;
      entry.want = before;
      if (!before && !entry.written && this.owned.get(want.id) === entry) this.owned.delete(want.id);
    });
  }

  async setHealth(id: string, health: HealthStatus): Promise<void> {
    this.live();
    const e = this.owned.get(id);
    const cur = e?.want;
    if (!e || !cur) throw new KnitError('KNIT_ERR_NOT_FOUND', `instance ${id} is not registered by this client`);
    if (cur.health === health && this.inSync(id)) return;
    const want = { ...cur, health };
    e.want = want;
    await this.write(id, `set health of ${id}`, () => {
      if (e.want === want) e.want = cur;
    });
  }

  async deregister(id: string): Promise<void> {
    this.live();
    const e = this.owned.get(id);
    // Also when an earlier deregister of it failed: its znode is still to be removed.
    if (!e) return;
    const before = e.want;
    e.want = undefined;
    await this.write(id, `deregister ${id}`, () => {
      if (before && e.want === undefined && this.owned.get(id) === e) e.want = before;
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
    const remove = (): Promise<void> =>
      this.call<void>('remove', path, (cl, cb) => cl.remove(path, -1, (err) => cb(code(err) === Exception.NO_NODE ? null : err, undefined)), 'server').catch((e: unknown) => {
        throw this.unavailable(`evict ${id}`, e);
      });
    if (this.owned.get(id)?.want?.service !== service) return remove();
    // Its own instance: forgotten and removed after any write of it in flight, which would bring it back.
    await this.locked(id, async () => {
      this.owned.delete(id);
      await remove();
    });
  }

  /** Every instance of `service` (undefined when it has no directory), setting `watcher` on the list and on each one. */
  private async readInstances(service: string, watcher?: Watcher): Promise<Instance[] | undefined> {
    const dir = `${this.o.root}/services/${service}`;
    const children = await this.getChildren(dir, watcher);
    if (!children) return undefined;
    const list: Instance[] = [];
    await Promise.all(
      children.map(async (child) => {
        // Gone since the listing: the list's watch fires for that removal.
        const got = await this.getData(`${dir}/${child}`, watcher);
        if (!got) return;
        try {
          list.push(JSON.parse(got.data.toString('utf8')) as Instance);
        } catch {
          this.o.log.warn({ event: EVENTS.registryError, path: `${dir}/${child}` }, 'ignoring an instance znode that is not JSON');
        }
      }),
    );
    return list.sort((a, b) => byCodeUnit(a.id, b.id));
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
   * A watch that re-reads its state on every ZooKeeper event. `read` sets
   * `watcher` on everything it reads, so every read that succeeds re-arms
   * the watch whole: there is no "armed" bookkeeping that a failed read
   * could leave wrong. The one function per watch is what lets the library
   * keep a single listener per path however often it is set again. A
   * failed read is reported and retried with a capped backoff (at once on
   * reconnection); refreshes are coalesced so an event storm costs one read
   * at a time.
   */
  private watch<T>(read: (watcher: Watcher) => Promise<T>, same: (a: T, b: T) => boolean, deliver: (v: T) => void, onError?: WatchErrorHandler): Watch {
    this.live();
    let running = false;
    let dirty = false;
    let open = true;
    let failures = 0;
    let retry: NodeJS.Timeout | undefined;
    let last: { v: T } | undefined;
    const watcher: Watcher = () => w.refresh();
    const run = async (): Promise<void> => {
      let failed = false;
      do {
        dirty = false;
        let v: T;
        try {
          v = await read(watcher);
          failed = false;
          failures = 0;
        } catch (e) {
          failed = true;
          // The first failure of a streak and every tenth: an outage is told, not shouted (the retries run at most 10 s apart).
          if (open && ++failures % 10 === 1) onError?.(this.unavailable('watch', e));
          continue;
        }
        if (open && (!last || !same(last.v, v))) {
          last = { v };
          try {
            deliver(v);
          } catch (e) {
            this.o.log.error({ event: EVENTS.registryError, err: (e as Error).message }, `a registry watch callback threw: ${(e as Error).message}`);
          }
        }
      } while (dirty && open);
      running = false;
      if (failed && open) {
        retry = setTimeout(() => w.refresh(), faultRetryDelay(failures - 1));
        retry.unref();
      }
    };
    const w: LiveWatch = {
      refresh: () => {
        if (!open) return;
        clearTimeout(retry);
        retry = undefined;
        if (running) {
          dirty = true;
          return;
        }
        running = true;
        void run();
      },
      fail: (err) => {
        if (open) onError?.(err);
      },
      close: () => {
        open = false;
        clearTimeout(retry);
        this.watches.delete(w);
      },
    };
    this.watches.add(w);
    w.refresh();
    return { close: () => w.close() };
  }

  watchService(service: string, onSnapshot: (instances: Instance[]) => void, onError?: WatchErrorHandler): Watch {
    const dir = `${this.o.root}/services/${service}`;
    return this.watch<Instance[]>(
      async (watcher) => {
        for (let i = 0; i < MAX_RACING_READS; i++) {
          const list = await this.readInstances(service, watcher);
          if (list) return list.filter(isRoutable);
          // No such service yet: watch for its creation. Created meanwhile, exists() set a data
          // watch, which no new instance would fire: read its children instead.
          const stat = await this.call<Stat | undefined>('exists', dir, (c, cb) => c.exists(dir, watcher, (err, st) => cb(err, st ?? undefined)));
          if (!stat) return [];
        }
        throw new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `${dir} kept appearing and vanishing while it was read`);
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
      async (watcher) => {
        for (let i = 0; i < MAX_RACING_READS; i++) {
          const got = await this.getData(path, watcher);
          if (got) return { value: got.data.toString('utf8'), version: got.stat.version + 1 };
          // getData on a missing node arms nothing: exists() watches for its creation. Created
          // between the two reads, it is read again (its exists watch is a data watch by then).
          const stat = await this.call<Stat | undefined>('exists', path, (c, cb) => c.exists(path, watcher, (err, st) => cb(err, st ?? undefined)));
          if (!stat) return undefined;
        }
        throw new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', `${path} kept appearing and vanishing while it was read`);
      },
      (a, b) => a?.version === b?.version && a?.value === b?.value,
      onValue,
      onError,
    );
  }

  /**
   * `listener` runs each time this client has built a new ZooKeeper session
   * (the old one expired) and written every instance it owns again, with the
   * latest health it was given: the moment for an agent to re-assert its own
   * view. Returns the function that unsubscribes.
   */
  onResync(listener: () => void): () => void {
    this.resyncListeners.add(listener);
    return () => void this.resyncListeners.delete(listener);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stop.abort();
    clearTimeout(this.lostTimer);
    for (const w of [...this.watches]) w.close();
    this.owned.clear();
    this.resyncListeners.clear();
    // A session being opened by a recovery is closed too: none outlives close().
    if (this.connecting) this.closeClient(this.connecting);
    // Closing the session removes this client's ephemeral instances at once.
    this.closeClient(this.client);
  }
}
