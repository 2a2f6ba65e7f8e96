/**
 * The host agent: runs the services defined in its config dir. For each
 * service it binds the mesh inbound port, obtains a leaf from the control
 * plane, registers the instance (critical until its checks pass), runs its
 * health checks, and starts one outbound listener per upstream fed by
 * registry watches. A service whose leaf is refused (not allowed on this
 * node) or cannot be had yet (control plane away) waits in the background,
 * saying why, and retries by itself; the other services run meanwhile.
 *
 * Nothing read from the registry is trusted for its own sake: intentions
 * and node records are documents signed by the control plane, verified
 * before they apply (the last good one stays in force otherwise), and
 * upstream endpoints are only instances that their node may run.
 *
 * A reload (SIGHUP) with any bad file changes nothing and reports every
 * problem; a good one starts, stops or restarts only the services whose
 * definitions changed.
 */
import { loadServices, type LoadOptions, type ServiceDefinition } from '../config/services.js';
import { formatProblem, KnitError, type FileProblem } from '../errors.js';
import { serviceId, type SpiffeId } from '../identity/spiffe.js';
import { EVENTS, type Logger } from '../log/logger.js';
import type { Metrics } from '../log/metrics.js';
import type { Decision, Evaluator } from '../policy/intentions.js';
import { IntentionStore } from '../policy/store.js';
import { allows, NODES_KEY, NODES_KIND, type NodesDocument } from '../policy/nodes.js';
import { SignedKv } from '../registry/signed-kv.js';
import type { DocumentTrust } from '../identity/signed-doc.js';
import { InboundProxy } from '../proxy/inbound/inbound.js';
import type { ServiceTls } from '../proxy/tls.js';
import { OutboundProxy } from '../proxy/outbound/outbound.js';
import type { HealthStatus, Instance, Registry, Watch } from '../registry/registry.js';
import { LeafManager, type CertSigner } from './certs.js';
import { CheckRunner, worst } from './health.js';
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
  /** The roots and trust domain signed documents must chain to. */
  trust: () => DocumentTrust;
  /**
   * Route only to instances whose node the control plane's node records
   * allow to run the service (a fleet); `knit dev` has no node records.
   */
  nodeRecords?: boolean;
  /** How service files are read on reload (agent.yaml decides). */
  loadOptions?: LoadOptions;
  log: Logger;
  metrics: Metrics;
  /** Longest wait between two attempts to get a refused or unreachable leaf. */
  identityRetryMaxMs?: number;
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
  /** Why the service is not running yet (waiting for its certificate), if it is not. */
  waiting?: string;
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
  /** Why the service waits for its certificate; undefined once it has one. */
  waiting: string | undefined = 'starting';
  private stopped = false;
  private retryTimer: NodeJS.Timeout | undefined;
  /** The last registry snapshot per upstream, before the node-record filter. */
  private readonly snapshots: Instance[][] = [];
  readonly instanceId: string;
  readonly spiffe: SpiffeId;

  constructor(
    readonly def: ServiceDefinition,
    private readonly a: AgentOptions,
    private readonly policy: () => Evaluator | undefined,
    private readonly routable: (i: Instance) => boolean,
  ) {
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

  /** With a leaf: register (critical until checks pass), upstreams, health checks. */
  private async run(tls: ServiceTls): Promise<void> {
    const { def, a } = this;
    const log = a.log;
    this.waiting = undefined;
    this.inbound?.setTls(tls);
    this.health = 'critical';
    await a.registry.register(this.instance());
    def.upstreams.forEach((up, i) => {
      const o = new OutboundProxy({
        source: def.name, destination: up.destinationName, trustDomain: a.trustDomain, namespace: a.namespace,
        listenHost: up.localBindAddress, listenPort: up.localBindPort, tls, log, metrics: a.metrics,
      });
      this.outbound.push(o);
      this.snapshots.push([]);
      this.watches.push(
        a.registry.watchService(up.destinationName, (list) => {
          this.snapshots[i] = list;
          o.setEndpoints(list.filter(this.routable));
        }, (err) =>
          log.warn({ event: EVENTS.registryError, upstream: up.destinationName, err: err.message }, `watch of ${up.destinationName} failed; routing on the last known endpoints`)),
      );
    });
    await Promise.all(this.outbound.map((o) => o.start()));
    for (const c of def.checks) this.checks.set(c.id, new CheckRunner(c, () => void this.updateHealth()));
    await Promise.all([...this.checks.values()].map((c) => c.start()));
    await this.updateHealth(true);
    log.info({ event: EVENTS.serviceRegistered, id: this.instanceId, meshPort: this.meshPort, health: this.health }, `service ${def.name} registered (mesh port ${this.meshPort}, ${this.health})`);
  }

  /** Re-applies the node-record filter to every upstream's last snapshot. */
  refilter(): void {
    this.outbound.forEach((o, i) => o.setEndpoints((this.snapshots[i] ?? []).filter(this.routable)));
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
      certificateExpires: this.waiting ? undefined : this.leaf?.expires.toISOString(),
      waiting: this.waiting,
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
    this.stopped = true;
    clearTimeout(this.retryTimer);
    for (const c of this.checks.values()) c.stop();
    for (const w of this.watches) w.close();
    this.leaf?.stop();
    const wasRunning = this.waiting === undefined;
    await this.a.registry.deregister(this.instanceId).catch(() => undefined);
    await Promise.all([this.inbound?.close(drainMs), ...this.outbound.map((o) => o.close(drainMs))]);
    if (wasRunning) this.a.log.info({ event: EVENTS.serviceDeregistered, id: this.instanceId }, `service ${this.def.name} deregistered`);
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
  private nodes: NodesDocument | undefined;
  private readonly watches: Watch[] = [];
  private reloading: Promise<ReloadResult> | undefined;
  private readonly kv: SignedKv;

  constructor(private readonly o: AgentOptions) {
    this.kv = new SignedKv({ registry: o.registry, trust: o.trust });
  }

  /**
   * Whether peers should route to an instance: with node records, only when
   * its node is known, not revoked, and allowed to run its service (until
   * the first verified node document arrives, nothing is: fail closed).
   */
  private readonly routable = (i: Instance): boolean => {
    if (!this.o.nodeRecords) return true;
    const rec = this.nodes?.nodes[i.node];
    return !!rec && !rec.revokedAt && allows(rec.services, i.service);
  };

  /** A signed document the agent refused: logged, counted, and the last good one stays. */
  private refused(kind: string, e: Error): void {
    this.o.metrics.inc('knit_registry_documents_refused_total', 'Documents read from the registry that were not the control plane\'s (unsigned, forged, rolled back) and were not applied', { kind });
    this.o.log.error({ event: EVENTS.documentRefused, kind, err: e.message }, `refused ${kind} from the registry, keeping the last good one: ${e.message}`);
  }

  /** Waits for the first intentions (and node records), then starts everything. */
  async start(services: ServiceDefinition[]): Promise<void> {
    const store = new IntentionStore(this.kv);
    const first: Array<Promise<void>> = [];
    first.push(new Promise<void>((resolve) => {
      this.watches.push(store.watch(
        (applied) => {
          this.evaluator = applied?.evaluator;
          const set = applied?.evaluator.set;
          this.o.log.info({ event: EVENTS.intentionsChanged, default: set?.defaultAction, count: set?.intentions.length ?? 0, seq: applied?.seq, signer: applied?.signer }, 'intentions updated');
          for (const r of this.runtimes.values()) r.reauthorize();
          resolve();
        },
        (err) => {
          this.refused('intentions', err);
          resolve();
        },
        (err) => {
          this.o.log.error({ event: EVENTS.registryError, err: err.message }, `intentions not applied, keeping the last good set: ${err.message}`);
          resolve();
        },
      ));
    }));
    if (this.o.nodeRecords) {
      first.push(new Promise<void>((resolve) => {
        this.watches.push(this.kv.watch<NodesDocument>(
          NODES_KEY,
          NODES_KIND,
          (doc) => {
            this.nodes = doc?.body;
            this.o.log.info({ event: EVENTS.nodesChanged, nodes: Object.keys(doc?.body.nodes ?? {}).length, seq: doc?.seq }, 'node records updated');
            for (const r of this.runtimes.values()) r.refilter();
            this.checkRevoked();
            resolve();
          },
          (err) => {
            this.refused('nodes', err);
            resolve();
          },
          (err) => {
            this.o.log.error({ event: EVENTS.registryError, err: err.message }, `node records not read, keeping the last good ones: ${err.message}`);
            resolve();
          },
        ));
      }));
    }
    await Promise.all(first);
    await this.apply(services);
  }

  /** A revoked node stops serving: its services leave the registry, and say why. */
  private checkRevoked(): void {
    const rec = this.nodes?.nodes[this.o.node];
    if (!rec?.revokedAt || this.runtimes.size === 0) return;
    this.o.log.error({ event: EVENTS.nodeRevoked, node: this.o.node, revokedAt: rec.revokedAt }, `this node (${this.o.node}) was revoked by the control plane at ${rec.revokedAt}: stopping its services; it needs a new token (knit token create --node ${this.o.node} --services ...)`);
    const all = [...this.runtimes.values()];
    this.runtimes.clear();
    void Promise.all(all.map((r) => r.stop(0)));
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
      const r = new ServiceRuntime(def, this.o, () => this.evaluator, this.routable);
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
      const loaded = await loadServices(this.o.servicesDir, this.o.loadOptions).catch((e: Error) => ({ services: [], problems: [{ file: this.o.servicesDir, message: e.message }], warnings: [], files: [] }));
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
    for (const w of this.watches) w.close();
    await Promise.all([...this.runtimes.values()].map((r) => r.stop(drainMs)));
    this.runtimes.clear();
  }
}
