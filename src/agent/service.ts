/**
 * One local service while it runs: its mesh listener, its leaf, its
 * registration, its health checks and its upstreams.
 *
 *   start: bind the mesh port -> leaf (stored, or from the control plane;
 *          refused or unreachable: wait in the background and retry)
 *   run:   upstreams, health checks, registration
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
import type { Decision, Evaluator } from '../policy/intentions.js';
import { InboundProxy } from '../proxy/inbound/inbound.js';
import type { ServiceTls } from '../proxy/tls.js';
import { OutboundProxy } from '../proxy/outbound/outbound.js';
import type { ConnectionLimit, TcpOptions } from '../proxy/limits.js';
import type { RateLimitedLog } from '../log/ratelimit.js';
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
  bindAddress: string;
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
  /** Socket settings of every proxied connection. */
  tcp?: Partial<TcpOptions>;
  /** The host-wide connection cap every proxy of this agent counts against. */
  hostLimit?: ConnectionLimit;
  /** One rate-limited log for the whole data plane: a port scan cannot flood it. */
  logLimit?: RateLimitedLog;
}

/** What the admin API shows of one service. */
export interface ServiceState {
  id: string;
  name: string;
  health: HealthStatus;
  /** What the registry was last told: `absent`, or the published health; `unknown` after a failed write. */
  published: HealthStatus | 'absent' | 'unknown';
  meshPort: number;
  app?: string;
  certificateExpires?: string;
  /** Why the service is not running yet (waiting for its certificate), if it is not. */
  waiting?: string;
  /** Set while the instance is deregistered for having been critical too long. */
  deregisteredCritical?: string;
  checks: Array<{ id: string; name: string; status: HealthStatus; output: string }>;
  upstreams: Array<{ destination: string; local: string; endpoints: string[] }>;
  connections: number;
}

/** Fail closed until the first intentions arrive. */
const NO_POLICY: Decision = { allow: false, reason: 'default', rule: 'default (deny: intentions not loaded yet)' };

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
  inbound?: InboundProxy;
  readonly outbound: OutboundProxy[] = [];
  private readonly watches: Watch[] = [];
  readonly checks = new Map<string, CheckRunner>();
  private leaf?: LeafManager;
  meshPort = 0;
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

  constructor(public def: ServiceDefinition, private readonly a: ServiceContext) {
    this.instanceId = `${a.node}/${def.id}`;
    this.spiffe = serviceId(a.trustDomain, def.name, a.namespace);
  }

  authorize = (source: SpiffeId): Decision => {
    const ev = this.a.policy();
    if (!ev) return NO_POLICY;
    return ev.evaluate(source.what.kind === 'service' ? source.what.service : source.uri, this.def.name);
  };

  private instance(): Instance {
    return {
      id: this.instanceId,
      service: this.def.name,
      node: this.a.node,
      address: this.def.address ?? this.a.advertiseAddress,
      port: this.meshPort,
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
  async start(port: number): Promise<void> {
    const { def, a } = this;
    if (def.localServicePort !== undefined) {
      this.inbound = new InboundProxy({
        service: def.name, trustDomain: a.trustDomain, namespace: a.namespace, listenHost: a.bindAddress, listenPort: port,
        targetHost: def.localServiceAddress, targetPort: def.localServicePort, authorize: this.authorize, log: a.log, metrics: a.metrics,
        hostLimit: a.hostLimit, logLimit: a.logLimit, tcp: a.tcp,
      });
      this.meshPort = await this.inbound.start();
    }
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
      onRenewed: (t) => {
        this.inbound?.setTls(t);
        for (const o of this.outbound) o.setTls(t);
      },
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
    this.inbound?.setTls(tls);
    def.upstreams.forEach((up, i) => {
      const o = new OutboundProxy({
        source: def.name, destination: up.destinationName, trustDomain: a.trustDomain, namespace: a.namespace,
        listenHost: up.localBindAddress, listenPort: up.localBindPort, tls, log, metrics: a.metrics,
        hostLimit: a.hostLimit, logLimit: a.logLimit, tcp: a.tcp,
      });
      this.outbound.push(o);
      this.snapshots.push([]);
      this.watches.push(
        a.registry.watchService(up.destinationName, (list) => {
          this.snapshots[i] = list;
          o.setEndpoints(list.filter(a.routable));
        }, (err) =>
          log.warn({ event: EVENTS.registryError, upstream: up.destinationName, err: err.message }, `watch of ${up.destinationName} failed; routing on the last known endpoints`)),
      );
    });
    await Promise.all(this.outbound.map((o) => o.start()));
    if (this.stopped) return;
    for (const c of def.checks) this.checks.set(c.id, new CheckRunner(c, () => this.checksChanged()));
    await Promise.all([...this.checks.values()].map((c) => c.start()));
    if (this.stopped) return;
    this.waiting = undefined;
    this.health = worst([...this.checks.values()].map((c) => c.result.status));
    this.trackCritical();
    await this.publish(true);
    log.info({ event: EVENTS.serviceRegistered, id: this.instanceId, meshPort: this.meshPort, health: this.health, published: this.published !== undefined }, `service ${def.name} registered (mesh port ${this.meshPort}, ${this.health})`);
  }

  /** Re-applies the node-record filter to every upstream's last snapshot. */
  refilter(): void {
    this.outbound.forEach((o, i) => o.setEndpoints((this.snapshots[i] ?? []).filter(this.a.routable)));
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

  reauthorize(): void {
    this.inbound?.setAuthorize(this.authorize);
  }

  state(): ServiceState {
    const published = this.published === undefined ? 'unknown' : this.published === 'absent' ? 'absent' : (JSON.parse(this.published) as Instance).health;
    return {
      id: this.def.id,
      name: this.def.name,
      health: this.health,
      published,
      meshPort: this.meshPort,
      app: this.def.localServicePort !== undefined ? `${this.def.localServiceAddress}:${this.def.localServicePort}` : undefined,
      certificateExpires: this.waiting ? undefined : this.leaf?.expires.toISOString(),
      waiting: this.waiting,
      deregisteredCritical: this.deregisteredCritical,
      checks: [...this.checks.values()].map((c) => ({ id: c.def.id, name: c.def.name, status: c.result.status, output: c.result.output })),
      upstreams: this.def.upstreams.map((u, i) => ({
        destination: u.destinationName,
        local: `${u.localBindAddress}:${u.localBindPort}`,
        endpoints: (this.outbound[i]?.endpointList ?? []).map((e) => `${e.address}:${e.port}`),
      })),
      connections: this.inbound?.connections ?? 0,
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
    await Promise.all([this.inbound?.close(drainMs), ...this.outbound.map((o) => o.close(drainMs))]);
    if (wasRunning) this.a.log.info({ event: EVENTS.serviceDeregistered, id: this.instanceId }, `service ${this.def.name} deregistered`);
  }
}
