/**
 * One local service while it runs: its leaf, its registration, its
 * health checks and its upstreams, carried by the host's node proxy.
 *
 *   start: known to the node proxy -> leaf (stored, or from the control
 *          plane; refused or unreachable: wait in the background and retry)
 *   run:   certificate to the proxy, upstreams, health checks, registration
 *
 * What the registry should say (desired: the instance with the health its
 * checks give, or nothing while it waits, after it stopped, or after it was
 * critical longer than `deregister_critical_service_after`) is kept apart
 * from what the registry was last told (published). A publication that
 * fails is retried with backoff until the two agree again, and `resync()`
 * re-asserts the whole instance (after a reconnection or session
 * re-creation, and periodically: anti-entropy, as Consul's agent does), so
 * a lost write can never leave `passing` in the registry for an instance
 * that is critical.
 */
import type { ServiceDefinition } from '../config/services.js';
import { KnitError } from '../errors.js';
import { serviceId, type SpiffeId } from '../identity/spiffe.js';
import { EVENTS, type Logger } from '../log/logger.js';
import type { Metrics } from '../log/metrics.js';
import type { Evaluator } from '../policy/intentions.js';
import type { ServiceTls } from '../identity/tls.js';
import type { NodeProxy } from '../proxy/node-proxy.js';
import type { Upstream } from '../proxy/accept/upstream.js';
import type { HealthStatus, Instance, Registry, Watch } from '../registry/registry.js';
import { LeafManager, type CertSigner } from '../identity/leaf.js';
import { CheckRunner, worst } from './health.js';
import { readStored, serviceDir, writeStored } from './identity-store.js';

/** What a service needs from its agent. */
export interface ServiceContext {
  node: string;
  trustDomain: string;
  namespace?: string;
  advertiseAddress: string;
  /** The host's node proxy: it carries every mesh connection. */
  proxy: NodeProxy;
  registry: Registry;
  signer: CertSigner;
  dataDir?: string;
  log: Logger;
  metrics: Metrics;
  /** The intentions in force (undefined until the first arrive: deny). */
  policy: () => Evaluator | undefined;
  /** Whether an upstream instance may be routed to (node records). */
  routable: (i: Instance) => boolean;
  /** Longest wait between two attempts to get a refused or unreachable leaf. */
  identityRetryMaxMs?: number;
  /** Longest wait between two attempts to publish to the registry. */
  publishRetryMaxMs?: number;
}

/** What the admin API shows of one service. */
export interface ServiceState {
  id: string;
  name: string;
  health: HealthStatus;
  /** What the registry was last told: `absent`, or the published health; `unknown` after a failed write. */
  published: HealthStatus | 'absent' | 'unknown';
  /** The port it is registered with (a mesh stream's :authority names it); 0 for a client-only service. */
  port: number;
  app?: string;
  /** Transparent mode: plaintext clients outside the mesh are refused (strict) or carried (permissive). */
  inbound: 'strict' | 'permissive';
  certificateExpires?: string;
  /** Why the service is not running yet (waiting for its certificate), if it is not. */
  waiting?: string;
  /** Set while the instance is deregistered for having been critical too long. */
  deregisteredCritical?: string;
  checks: Array<{ id: string; name: string; status: HealthStatus; output: string }>;
  upstreams: Array<{ destination: string; local: string; endpoints: string[] }>;
  connections: number;
}

/** Fields of a definition that change only the registration, not listeners or connections. */
const REGISTRATION_ONLY = ['tags', 'meta', 'file'] as const;

/** True when `a` and `b` differ only in what a re-registration carries (tags, meta). */
export function onlyRegistrationDiffers(a: ServiceDefinition, b: ServiceDefinition): boolean {
  const strip = (d: ServiceDefinition): string => JSON.stringify({ ...d, ...Object.fromEntries(REGISTRATION_ONLY.map((k) => [k, undefined])) });
  return strip(a) === strip(b);
}

/** True when nothing at all differs (the source file's name aside). */
export function sameDefinition(a: ServiceDefinition, b: ServiceDefinition): boolean {
  return JSON.stringify({ ...a, file: '' }) === JSON.stringify({ ...b, file: '' });
}

export class ServiceRuntime {
  readonly upstreams: Upstream[] = [];
  private readonly watches: Watch[] = [];
  readonly checks = new Map<string, CheckRunner>();
  private leaf?: LeafManager;
  /** Desired health, from the checks. */
  health: HealthStatus = 'critical';
  /** Why the service waits for its certificate; undefined once it has one. */
  waiting: string | undefined = 'starting';
  private stopped = false;
  private retryTimer: NodeJS.Timeout | undefined;
  /** The last registry snapshot per upstream, before the node-record filter. */
  private readonly snapshots: Instance[][] = [];
  readonly instanceId: string;
  readonly spiffe: SpiffeId;
  /** What the registry was last told: the instance as JSON, 'absent', or undefined when unknown. */
  private published: string | undefined = 'absent';
  private publishing: Promise<void> | undefined;
  private publishAgain = false;
  private publishTimer: NodeJS.Timeout | undefined;
  private publishFailures = 0;
  private criticalSince: number | undefined;
  private criticalTimer: NodeJS.Timeout | undefined;
  private deregisteredCritical: string | undefined;

  /** The port it is registered with: the one its definition names, else its application's. */
  get port(): number {
    return this.def.port ?? this.def.localServicePort ?? 0;
  }

  constructor(public def: ServiceDefinition, private readonly a: ServiceContext) {
    this.instanceId = `${a.node}/${def.id}`;
    this.spiffe = serviceId(a.trustDomain, def.name, a.namespace);
  }

  private instance(): Instance {
    return {
      id: this.instanceId,
      service: this.def.name,
      node: this.a.node,
      address: this.def.address ?? this.a.advertiseAddress,
      port: this.port,
      hbonePort: this.a.proxy.hbonePort,
      tags: this.def.tags,
      meta: this.def.meta,
      health: this.health,
    };
  }

  /**
   * Binds the mesh port, then asks for the service's identity. Resolves
   * once the service runs, or once the first attempt failed in a way a
   * retry may cure (refused by the control plane, control plane away): the
   * service then waits in the background and starts when its leaf comes.
   * Rejects only on what no retry cures (a port taken, a bad leaf).
   */
  async start(): Promise<void> {
    const { def, a } = this;
    a.proxy.setService(this.instanceId, { name: def.name, port: this.port, target: def.localServicePort !== undefined ? { host: def.localServiceAddress, port: def.localServicePort } : undefined, inbound: def.inbound });
    // A stored leaf that is still this service's and valid is used at once
    // (a restart while the control plane is away), else a new one is issued.
    const dir = a.dataDir && serviceDir(a.dataDir, def.name);
    const stored = dir ? await readStored(dir) : undefined;
    this.leaf = new LeafManager({
      id: this.spiffe, service: def.name, log: a.log,
      initial: stored?.info.spiffeId?.uri === this.spiffe.uri ? stored.tls : undefined,
      persist: dir ? (t) => writeStored(dir, t) : undefined,
      sign: (csr) => a.signer.signService(def.name, csr),
      trustBundle: () => a.signer.trustBundle(),
      onRenewed: (t) => a.proxy.setServiceTls(def.name, t),
    });
    await this.attempt(0);
  }

  /** One attempt at the leaf; on a curable failure, schedules the next and returns. */
  private async attempt(n: number): Promise<void> {
    if (this.stopped) return;
    let tls: ServiceTls;
    try {
      tls = await this.leaf!.start();
    } catch (e) {
      if (!(e instanceof KnitError) || !(e.retryable || e.code === 'KNIT_ERR_UNAUTHORIZED' || e.code === 'KNIT_ERR_CA')) throw e;
      const wait = Math.min(this.a.identityRetryMaxMs ?? 10_000, 500 * 2 ** n);
      if (this.waiting !== e.message) {
        this.a.log.warn({ event: EVENTS.certWaiting, service: this.def.name, err: e.message, retryInMs: wait }, `${this.def.name} waits for its certificate: ${e.message}`);
      }
      this.waiting = e.message;
      this.retryTimer = setTimeout(() => {
        this.attempt(n + 1).catch((err: Error) => {
          this.waiting = err.message;
          this.a.log.error({ event: EVENTS.certWaiting, service: this.def.name, err: err.message }, `${this.def.name} cannot start: ${err.message}`);
        });
      }, wait);
      this.retryTimer.unref();
      return;
    }
    if (this.stopped) return;
    await this.run(tls);
  }

  /** With a leaf: upstreams, health checks, then the registration (critical until the first checks pass). */
  private async run(tls: ServiceTls): Promise<void> {
    const { def, a } = this;
    const log = a.log;
    a.proxy.setServiceTls(def.name, tls);
    for (const [i, up] of def.upstreams.entries()) {
      const u = await a.proxy.addUpstream({ source: def.name, destination: up.destinationName, listenHost: up.localBindAddress, listenPort: up.localBindPort });
      this.upstreams.push(u);
      this.snapshots.push([]);
      if (this.stopped) break;
      this.watches.push(
        a.registry.watchService(up.destinationName, (list) => {
          this.snapshots[i] = list;
          u.setEndpoints(list.filter(a.routable));
        }, (err) =>
          log.warn({ event: EVENTS.registryError, upstream: up.destinationName, err: err.message }, `watch of ${up.destinationName} failed; routing on the last known endpoints`)),
      );
    }
    if (this.stopped) return;
    for (const c of def.checks) this.checks.set(c.id, new CheckRunner(c, () => this.checksChanged()));
    await Promise.all([...this.checks.values()].map((c) => c.start()));
    if (this.stopped) return;
    this.waiting = undefined;
    this.health = worst([...this.checks.values()].map((c) => c.result.status));
    this.trackCritical();
    await this.publish(true);
    log.info({ event: EVENTS.serviceRegistered, id: this.instanceId, port: this.port, health: this.health, published: this.published !== undefined }, `service ${def.name} registered (port ${this.port}, ${this.health})`);
  }

  /** Re-applies the node-record filter to every upstream's last snapshot. */
  refilter(): void {
    this.upstreams.forEach((u, i) => u.setEndpoints((this.snapshots[i] ?? []).filter(this.a.routable)));
  }

  private checksChanged(): void {
    const next = worst([...this.checks.values()].map((c) => c.result.status));
    if (next === this.health) return;
    const prev = this.health;
    this.health = next;
    const outputs = [...this.checks.values()].map((c) => `${c.def.id}: ${c.result.output}`);
    this.a.log.info({ event: EVENTS.healthChanged, service: this.def.name, from: prev, to: next, checks: outputs }, `${this.def.name} is ${next}`);
    this.trackCritical();
    void this.publish();
  }

  /** `deregister_critical_service_after`: critical that long, the instance leaves the registry until it passes again. */
  private trackCritical(): void {
    const limit = this.def.deregisterCriticalAfterMs;
    if (this.health !== 'critical') {
      this.criticalSince = undefined;
      clearTimeout(this.criticalTimer);
      if (this.deregisteredCritical) {
        this.a.log.info({ event: EVENTS.serviceRegistered, service: this.def.name }, `${this.def.name} is ${this.health} again: registering it again`);
        this.deregisteredCritical = undefined;
      }
      return;
    }
    if (limit === undefined || this.criticalSince !== undefined) return;
    this.criticalSince = Date.now();
    clearTimeout(this.criticalTimer);
    this.criticalTimer = setTimeout(() => {
      if (this.stopped || this.health !== 'critical') return;
      this.deregisteredCritical = `critical for ${Math.round(limit / 1000)} s (deregister_critical_service_after)`;
      this.a.log.warn({ event: EVENTS.serviceDeregistered, service: this.def.name, afterMs: limit }, `${this.def.name} deregistered: ${this.deregisteredCritical}`);
      void this.publish();
    }, limit);
    this.criticalTimer.unref();
  }

  /** What the registry should say now: the instance, or nothing. */
  private desired(): Instance | undefined {
    if (this.stopped || this.waiting !== undefined || this.deregisteredCritical) return undefined;
    return this.instance();
  }

  /**
   * Makes the registry say what it should (desired), one write at a time;
   * with `force`, writes even when it believes the registry already agrees
   * (a resync). A failure leaves `published` unknown and retries with
   * backoff; a change while a write is in flight is written after it.
   */
  publish(force = false): Promise<void> {
    if (force) this.published = undefined;
    if (this.publishing) {
      this.publishAgain = true;
      return this.publishing;
    }
    this.publishing = (async () => {
      do {
        this.publishAgain = false;
        const want = this.desired();
        const key = want ? JSON.stringify(want) : 'absent';
        if (key === this.published) continue;
        try {
          if (want) await this.a.registry.register(want);
          else await this.a.registry.deregister(this.instanceId);
          this.published = key;
          if (this.publishFailures) this.a.log.info({ event: EVENTS.registryError, service: this.def.name }, `registry agrees again on ${this.def.name} after ${this.publishFailures} failed write(s)`);
          this.publishFailures = 0;
        } catch (e) {
          this.published = undefined;
          const wait = Math.min(this.a.publishRetryMaxMs ?? 30_000, 500 * 2 ** this.publishFailures++);
          this.a.metrics.inc('knit_registry_publish_failures_total', 'Registry writes of an instance that failed and were retried', { service: this.def.name });
          if (this.publishFailures === 1 || this.publishFailures % 10 === 0) {
            this.a.log.warn({ event: EVENTS.registryError, service: this.def.name, err: (e as Error).message, retryInMs: wait, failures: this.publishFailures }, `cannot publish ${this.def.name} to the registry (retrying): ${(e as Error).message}`);
          }
          clearTimeout(this.publishTimer);
          this.publishTimer = setTimeout(() => void this.publish(), wait);
          this.publishTimer.unref();
          break;
        }
      } while (this.publishAgain);
    })().finally(() => (this.publishing = undefined));
    return this.publishing;
  }

  /** Re-asserts the whole instance (anti-entropy, after a reconnection). */
  resync(): Promise<void> {
    return this.publish(true);
  }

  /** A new definition that differs only in tags/meta: re-registered, nothing restarted. */
  update(def: ServiceDefinition): Promise<void> {
    this.def = def;
    return this.publish();
  }

  state(): ServiceState {
    const published = this.published === undefined ? 'unknown' : this.published === 'absent' ? 'absent' : (JSON.parse(this.published) as Instance).health;
    return {
      id: this.def.id,
      name: this.def.name,
      health: this.health,
      published,
      port: this.port,
      app: this.def.localServicePort !== undefined ? `${this.def.localServiceAddress}:${this.def.localServicePort}` : undefined,
      inbound: this.def.inbound,
      certificateExpires: this.waiting ? undefined : this.leaf?.expires.toISOString(),
      waiting: this.waiting,
      deregisteredCritical: this.deregisteredCritical,
      checks: [...this.checks.values()].map((c) => ({ id: c.def.id, name: c.def.name, status: c.result.status, output: c.result.output })),
      upstreams: this.def.upstreams.map((u, i) => ({
        destination: u.destinationName,
        local: `${u.localBindAddress}:${u.localBindPort}`,
        endpoints: (this.upstreams[i]?.endpoints ?? []).map((e) => `${e.address}:${e.port}`),
      })),
      connections: this.a.proxy.flows.list().filter((f) => f.side !== 'outbound' && f.destination.service === this.def.name).length,
    };
  }

  /** Stops everything, whatever stage it is in (a start in flight, a leaf being waited for), and deregisters. */
  async stop(drainMs: number): Promise<void> {
    const wasRunning = this.waiting === undefined && !this.stopped;
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearTimeout(this.publishTimer);
    clearTimeout(this.criticalTimer);
    for (const c of this.checks.values()) c.stop();
    for (const w of this.watches) w.close();
    this.leaf?.stop();
    await this.publishing?.catch(() => undefined);
    await this.a.registry.deregister(this.instanceId).catch(() => undefined);
    await Promise.all([this.a.proxy.removeService(this.instanceId, drainMs), ...this.upstreams.map((u) => this.a.proxy.removeUpstream(u, drainMs))]);
    if (wasRunning) this.a.log.info({ event: EVENTS.serviceDeregistered, id: this.instanceId }, `service ${this.def.name} deregistered`);
  }
}
