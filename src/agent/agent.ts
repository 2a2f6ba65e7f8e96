/**
 * The host agent: runs the services defined in its config dir. For each
 * service it binds the mesh inbound port, registers the instance (critical
 * until its checks pass), obtains a leaf, runs its health checks, and
 * starts one outbound listener per upstream fed by registry watches.
 * Intentions are watched once and applied to every inbound listener,
 * including the connections already open.
 *
 * A reload (SIGHUP) with any bad file changes nothing and reports every
 * problem; a good one starts, stops or restarts only the services whose
 * definitions changed.
 */
import { loadServices, type ServiceDefinition } from '../config/services.js';
import { formatProblem, KnitError, type FileProblem } from '../errors.js';
import { serviceId, type SpiffeId } from '../identity/spiffe.js';
import { EVENTS, type Logger } from '../log/logger.js';
import type { Metrics } from '../log/metrics.js';
import type { Decision, Evaluator } from '../policy/intentions.js';
import { IntentionStore } from '../policy/store.js';
import { InboundProxy } from '../proxy/inbound/inbound.js';
import { OutboundProxy } from '../proxy/outbound/outbound.js';
import type { HealthStatus, Instance, Registry, Watch } from '../registry/registry.js';
import { LeafManager, type CertSigner } from './certs.js';
import { CheckRunner, worst } from './health.js';
import { retrying } from '../retry.js';
import { readStored, serviceDir, writeStored } from './identity-store.js';

export interface AgentOptions {
  node: string;
  trustDomain: string;
  namespace?: string;
  servicesDir: string;
  /** Address peers dial (registered). */
  advertiseAddress: string;
  /** Address the mesh inbound listeners bind. */
  bindAddress: string;
  /** First mesh inbound port; 0 for ephemeral ports. */
  inboundPortBase: number;
  registry: Registry;
  signer: CertSigner;
  /** Where service leaves are kept across restarts; in memory only when absent. */
  dataDir?: string;
  log: Logger;
  metrics: Metrics;
}

/** Fail closed until the first intentions arrive. */
const NO_POLICY: Decision = { allow: false, reason: 'default', rule: 'default (deny: intentions not loaded yet)' };

/** What the admin API shows of one service. */
export interface ServiceState {
  id: string;
  name: string;
  health: HealthStatus;
  meshPort: number;
  app?: string;
  certificateExpires?: string;
  checks: Array<{ id: string; name: string; status: HealthStatus; output: string }>;
  upstreams: Array<{ destination: string; local: string; endpoints: string[] }>;
  connections: number;
}

/** Everything one service needs while it runs. */
class ServiceRuntime {
  inbound?: InboundProxy;
  readonly outbound: OutboundProxy[] = [];
  readonly watches: Watch[] = [];
  readonly checks = new Map<string, CheckRunner>();
  leaf?: LeafManager;
  meshPort = 0;
  health: HealthStatus = 'critical';
  readonly instanceId: string;
  readonly spiffe: SpiffeId;

  constructor(readonly def: ServiceDefinition, private readonly a: AgentOptions, private readonly policy: () => Evaluator | undefined) {
    this.instanceId = `${a.node}/${def.id}`;
    this.spiffe = serviceId(a.trustDomain, def.name, a.namespace);
  }

  authorize = (source: SpiffeId): Decision => {
    const ev = this.policy();
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

  async start(port: number): Promise<void> {
    const { def, a } = this;
    const log = a.log;
    // 1. Bind the mesh port first: the registration must carry it.
    if (def.localServicePort !== undefined) {
      this.inbound = new InboundProxy({
        service: def.name, trustDomain: a.trustDomain, listenHost: a.bindAddress, listenPort: port,
        targetHost: def.localServiceAddress, targetPort: def.localServicePort, authorize: this.authorize, log, metrics: a.metrics,
      });
      this.meshPort = await this.inbound.start();
    }
    // 2. Register as critical: the control plane signs only for services registered on this node.
    this.health = 'critical';
    await a.registry.register(this.instance());
    // 3. Identity: a stored leaf that is still this service's and valid is used at once
    // (a restart while the control plane is away), else a new one is issued.
    const dir = a.dataDir && serviceDir(a.dataDir, def.name);
    const stored = dir ? await readStored(dir) : undefined;
    this.leaf = new LeafManager({
      id: this.spiffe, service: def.name, log,
      initial: stored?.info.spiffeId?.uri === this.spiffe.uri ? stored.tls : undefined,
      persist: dir ? (t) => writeStored(dir, t) : undefined,
      sign: (csr) => a.signer.signService(def.name, csr),
      trustBundle: () => a.signer.trustBundle(),
      onRenewed: (t) => {
        this.inbound?.setTls(t);
        for (const o of this.outbound) o.setTls(t);
      },
    });
    // Until the control plane answers, the service waits here (registered as critical), saying so.
    const tls = await retrying(`control plane for the certificate of ${def.name}`, log, () => this.leaf!.start());
    this.inbound?.setTls(tls);
    // 4. Upstreams.
    for (const up of def.upstreams) {
      const o = new OutboundProxy({
        source: def.name, destination: up.destinationName, trustDomain: a.trustDomain, namespace: a.namespace,
        listenHost: up.localBindAddress, listenPort: up.localBindPort, tls, log, metrics: a.metrics,
      });
      await o.start();
      this.outbound.push(o);
      this.watches.push(
        a.registry.watchService(up.destinationName, (list) => o.setEndpoints(list), (err) =>
          log.warn({ event: EVENTS.registryError, upstream: up.destinationName, err: err.message }, `watch of ${up.destinationName} failed; routing on the last known endpoints`)),
      );
    }
    // 5. Health: first probes run now, so the service is routable as soon as it is healthy.
    for (const c of def.checks) this.checks.set(c.id, new CheckRunner(c, () => void this.updateHealth()));
    await Promise.all([...this.checks.values()].map((c) => c.start()));
    await this.updateHealth(true);
    log.info({ event: EVENTS.serviceRegistered, id: this.instanceId, meshPort: this.meshPort, health: this.health }, `service ${def.name} registered (mesh port ${this.meshPort}, ${this.health})`);
  }

  private async updateHealth(force = false): Promise<void> {
    const next = worst([...this.checks.values()].map((c) => c.result.status));
    if (next === this.health && !force) return;
    const prev = this.health;
    this.health = next;
    if (prev !== next) {
      const outputs = [...this.checks.values()].map((c) => `${c.def.id}: ${c.result.output}`);
      this.a.log.info({ event: EVENTS.healthChanged, service: this.def.name, from: prev, to: next, checks: outputs }, `${this.def.name} is ${next}`);
    }
    try {
      await this.a.registry.setHealth(this.instanceId, next);
    } catch (e) {
      this.a.log.warn({ event: EVENTS.registryError, service: this.def.name, err: (e as Error).message }, 'cannot update health in the registry');
    }
  }

  reauthorize(): void {
    this.inbound?.setAuthorize(this.authorize);
  }

  state(): ServiceState {
    return {
      id: this.def.id,
      name: this.def.name,
      health: this.health,
      meshPort: this.meshPort,
      app: this.def.localServicePort !== undefined ? `${this.def.localServiceAddress}:${this.def.localServicePort}` : undefined,
      certificateExpires: this.leaf?.expires.toISOString(),
      checks: [...this.checks.values()].map((c) => ({ id: c.def.id, name: c.def.name, status: c.result.status, output: c.result.output })),
      upstreams: this.def.upstreams.map((u, i) => ({
        destination: u.destinationName,
        local: `${u.localBindAddress}:${u.localBindPort}`,
        endpoints: (this.outbound[i]?.endpointList ?? []).map((e) => `${e.address}:${e.port}`),
      })),
      connections: this.inbound?.connections ?? 0,
    };
  }

  async stop(drainMs: number): Promise<void> {
    for (const c of this.checks.values()) c.stop();
    for (const w of this.watches) w.close();
    this.leaf?.stop();
    await this.a.registry.deregister(this.instanceId).catch(() => undefined);
    await Promise.all([this.inbound?.close(drainMs), ...this.outbound.map((o) => o.close(drainMs))]);
    this.a.log.info({ event: EVENTS.serviceDeregistered, id: this.instanceId }, `service ${this.def.name} deregistered`);
  }
}

const sameDefinition = (a: ServiceDefinition, b: ServiceDefinition): boolean =>
  JSON.stringify({ ...a, file: '' }) === JSON.stringify({ ...b, file: '' });

/** The outcome of a reload. */
export interface ReloadResult {
  ok: boolean;
  problems: FileProblem[];
  started: string[];
  stopped: string[];
  restarted: string[];
}

/** One host's agent. */
export class Agent {
  private readonly runtimes = new Map<string, ServiceRuntime>();
  private evaluator: Evaluator | undefined;
  private intentionsWatch?: Watch;
  private reloading: Promise<ReloadResult> | undefined;

  constructor(private readonly o: AgentOptions) {}

  /** Loads the services (any bad file: throws ConfigError), watches intentions, starts everything. */
  async start(services: ServiceDefinition[]): Promise<void> {
    const store = new IntentionStore(this.o.registry);
    await new Promise<void>((resolve) => {
      this.intentionsWatch = store.watch(
        (ev) => {
          this.evaluator = ev;
          const set = ev?.set;
          this.o.log.info({ event: EVENTS.intentionsChanged, default: set?.defaultAction, count: set?.intentions.length ?? 0 }, 'intentions updated');
          for (const r of this.runtimes.values()) r.reauthorize();
          resolve();
        },
        (err) => {
          this.o.log.error({ event: EVENTS.registryError, err: err.message }, `intentions not applied, keeping the last good set: ${err.message}`);
          resolve();
        },
      );
    });
    await this.apply(services);
  }

  private usedPorts(): Set<number> {
    return new Set([...this.runtimes.values()].map((r) => r.meshPort));
  }

  /** Starts one service; an automatic mesh port walks on from the base past ports other software holds. */
  private async startOne(def: ServiceDefinition): Promise<void> {
    const auto = def.meshPort === undefined && this.o.inboundPortBase > 0;
    const used = this.usedPorts();
    let port = def.meshPort ?? (auto ? this.o.inboundPortBase : 0);
    // Bounded so a host with every port taken fails with a clear error instead of spinning.
    for (let tries = 0; ; tries++) {
      while (auto && used.has(port)) port++;
      const r = new ServiceRuntime(def, this.o, () => this.evaluator);
      try {
        await r.start(port);
        this.runtimes.set(def.id, r);
        return;
      } catch (e) {
        await r.stop(0);
        const inUse = auto && r.meshPort === 0 && e instanceof KnitError && e.code === 'KNIT_ERR_LISTEN' && /EADDRINUSE/.test(e.message);
        if (!inUse || tries >= 100) throw e;
        used.add(port);
      }
    }
  }

  private async apply(next: ServiceDefinition[]): Promise<Omit<ReloadResult, 'ok' | 'problems'>> {
    const want = new Map(next.map((d) => [d.id, d]));
    const out = { started: [] as string[], stopped: [] as string[], restarted: [] as string[] };
    for (const [id, r] of [...this.runtimes]) {
      const d = want.get(id);
      if (d && sameDefinition(d, r.def)) continue;
      await r.stop(0);
      this.runtimes.delete(id);
      (d ? out.restarted : out.stopped).push(id);
    }
    for (const d of next) {
      if (this.runtimes.has(d.id)) continue;
      await this.startOne(d);
      if (!out.restarted.includes(d.id)) out.started.push(d.id);
    }
    return out;
  }

  /** Re-reads the config dir. Any problem: nothing changes and every problem is returned and logged. */
  reload(): Promise<ReloadResult> {
    const run = async (): Promise<ReloadResult> => {
      const loaded = await loadServices(this.o.servicesDir).catch((e: Error) => ({ services: [], problems: [{ file: this.o.servicesDir, message: e.message }], warnings: [], files: [] }));
      if (loaded.problems.length) {
        this.o.log.error({ event: EVENTS.servicesReloadFailed, problems: loaded.problems.map(formatProblem) }, `reload refused, keeping the ${this.runtimes.size} running service(s):\n${loaded.problems.map(formatProblem).join('\n')}`);
        return { ok: false, problems: loaded.problems, started: [], stopped: [], restarted: [] };
      }
      try {
        const changes = await this.apply(loaded.services);
        this.o.log.info({ event: EVENTS.servicesReloaded, ...changes }, 'services reloaded');
        return { ok: true, problems: [], ...changes };
      } catch (e) {
        this.o.log.error({ event: EVENTS.servicesReloadFailed, err: (e as Error).message }, `reload failed: ${(e as Error).message}`);
        return { ok: false, problems: [{ file: this.o.servicesDir, message: (e as Error).message }], started: [], stopped: [], restarted: [] };
      }
    };
    // One reload at a time; a reload asked for during another runs after it.
    this.reloading = (this.reloading ?? Promise.resolve()).then(run, run);
    return this.reloading;
  }

  /** A TTL check report; throws KNIT_ERR_NOT_FOUND for an unknown check. */
  reportCheck(checkId: string, status: HealthStatus, output?: string): void {
    for (const r of this.runtimes.values()) {
      const c = r.checks.get(checkId);
      if (!c) continue;
      if (c.def.kind !== 'ttl') throw new KnitError('KNIT_ERR_BAD_REQUEST', `check ${checkId} is a ${c.def.kind} check, not a ttl check`);
      c.report(status, output);
      return;
    }
    throw new KnitError('KNIT_ERR_NOT_FOUND', `no check ${checkId} on this agent`);
  }

  state(): { node: string; trustDomain: string; services: ServiceState[] } {
    return { node: this.o.node, trustDomain: this.o.trustDomain, services: [...this.runtimes.values()].map((r) => r.state()) };
  }

  /** Deregisters every service and drains open connections for at most `drainMs`. */
  async stop(drainMs = 0): Promise<void> {
    this.intentionsWatch?.close();
    await Promise.all([...this.runtimes.values()].map((r) => r.stop(drainMs)));
    this.runtimes.clear();
  }
}
