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
 * problem; a good one is applied whole or not at all: new services start
 * first, changed ones are replaced one by one, and any failure puts back
 * every service as it was before and reports the failure. A change of tags
 * or meta only re-registers (no listener restarts, no connection reset).
 * Services start concurrently; stopping the agent cancels the ones still
 * starting.
 */
import { loadServices, type LoadOptions, type ServiceDefinition } from '../config/services.js';
import { formatProblem, KnitError, type FileProblem } from '../errors.js';
import { EVENTS, type Logger } from '../log/logger.js';
import type { Metrics } from '../log/metrics.js';
import type { Evaluator } from '../policy/intentions.js';
import { IntentionStore } from '../policy/store.js';
import { allows, NODES_KEY, NODES_KIND, type NodesDocument } from '../policy/nodes.js';
import { SignedKv } from '../registry/signed-kv.js';
import type { DocumentTrust } from '../identity/signed-doc.js';
import type { HealthStatus, Instance, Registry, Watch } from '../registry/registry.js';
import type { CertSigner } from '../identity/leaf.js';
import { ConnectionLimit, DEFAULT_MAX_HOST_CONNECTIONS, type TcpOptions } from '../proxy/limits.js';
import { NodeProxy } from '../proxy/node-proxy.js';
import { DEFAULT_HBONE_PORT } from '../proxy/hbone/wire.js';
import { RateLimitedLog } from '../log/ratelimit.js';
import type { RedirectRules, TransparentMode, TransparentSettings } from './transparent.js';
import { onlyRegistrationDiffers, sameDefinition, ServiceRuntime, type ServiceContext, type ServiceState } from './service.js';

export type { ServiceState };

export interface AgentOptions {
  node: string;
  trustDomain: string;
  namespace?: string;
  servicesDir: string;
  /** Address peers dial (registered). */
  advertiseAddress: string;
  /** Address the HBONE listener binds. */
  bindAddress: string;
  /** The HBONE port (15008 by default; 0 for any free port). */
  hbonePort?: number;
  /** HBONE streams per tunnel, and how long an idle tunnel is kept. */
  maxStreamsPerTunnel?: number;
  tunnelIdleMs?: number;
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
  /** How often every instance is re-asserted in the registry (anti-entropy); Consul's agent does it every minute. */
  antiEntropyMs?: number;
  /** Longest wait between two attempts to publish an instance to the registry. */
  publishRetryMaxMs?: number;
  /** Socket settings of every proxied connection (agent.yaml tcp_keepalive, idle_timeout, tcp_nodelay). */
  tcp?: Partial<TcpOptions>;
  /** Connections all proxies of this host may hold at once (agent.yaml max_connections_per_host). */
  maxConnectionsPerHost?: number;
  /** Transparent mode (agent.yaml transparent:): capture listeners, DNS, and the rules when `redirect` is given. */
  transparent?: { settings: TransparentSettings; redirect?: RedirectRules; resolvConf?: string };
}


/** The outcome of a reload. */
export interface ReloadResult {
  ok: boolean;
  problems: FileProblem[];
  started: string[];
  stopped: string[];
  restarted: string[];
  /** Re-registered with new tags or meta, nothing restarted. */
  updated: string[];
}

/** One host's agent. */
export class Agent {
  private readonly runtimes = new Map<string, ServiceRuntime>();
  private evaluator: Evaluator | undefined;
  private nodes: NodesDocument | undefined;
  private readonly watches: Watch[] = [];
  private reloading: Promise<ReloadResult> | undefined;
  private readonly kv: SignedKv;
  /** Runtimes whose start is in flight (a stop cancels them). */
  private readonly starting = new Set<ServiceRuntime>();
  private stopping = false;
  private antiEntropy: NodeJS.Timeout | undefined;
  /** Transparent mode, when agent.yaml turns it on. */
  transparent: TransparentMode | undefined;

  /** The host's node proxy: every mesh connection of every service here. */
  readonly proxy: NodeProxy;

  constructor(private readonly o: AgentOptions) {
    this.kv = new SignedKv({ registry: o.registry, trust: o.trust });
    this.proxy = new NodeProxy({
      node: o.node, trustDomain: o.trustDomain, namespace: o.namespace, listenHost: o.bindAddress, hbonePort: o.hbonePort ?? DEFAULT_HBONE_PORT,
      advertise: o.advertiseAddress, policy: () => this.evaluator, log: o.log, metrics: o.metrics, tcp: o.tcp,
      hostLimit: new ConnectionLimit('host', o.maxConnectionsPerHost ?? DEFAULT_MAX_HOST_CONNECTIONS), logLimit: new RateLimitedLog(o.log),
      maxStreams: o.maxStreamsPerTunnel, tunnelIdleMs: o.tunnelIdleMs,
    });
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
          this.proxy.reauthorize();
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
            this.transparent?.refilter();
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
    await this.proxy.start();
    await this.apply(services);
    if (this.o.transparent) {
      // Loaded only in transparent mode (DNS, netfilter): an agent without it does not carry them.
      const { TransparentMode } = await import('./transparent.js');
      this.transparent = new TransparentMode({
        ...this.o.transparent, proxy: this.proxy, registry: this.o.registry, kv: this.kv, routable: this.routable,
        local: () => [...this.runtimes.values()].map((r) => r.def), log: this.o.log, metrics: this.o.metrics, onRefused: (kind, e) => this.refused(kind, e),
      });
      await this.transparent.start();
    }
    this.antiEntropy = setInterval(() => this.resync(), this.o.antiEntropyMs ?? 60_000);
    this.antiEntropy.unref();
  }

  /** A revoked node stops serving: its services leave the registry, and say why. */
  private checkRevoked(): void {
    const rec = this.nodes?.nodes[this.o.node];
    if (!rec?.revokedAt || this.runtimes.size === 0) return;
    this.o.log.error({ event: EVENTS.nodeRevoked, node: this.o.node, revokedAt: rec.revokedAt }, `this node (${this.o.node}) was revoked by the control plane at ${rec.revokedAt}: stopping its services; it needs a new token (knit token create --node ${this.o.node} --services ...)`);
    const all = [...this.runtimes.values()];
    this.runtimes.clear();
    void Promise.all(all.map((r) => this.stopOne(r)));
  }

  /** The service context every runtime shares. */
  private context(): ServiceContext {
    return { ...this.o, proxy: this.proxy, policy: () => this.evaluator, routable: this.routable };
  }

  /** Starts one service; a stop of the agent while it starts cancels it. */
  private async startOne(def: ServiceDefinition): Promise<ServiceRuntime> {
    const r = new ServiceRuntime(def, this.context());
    this.starting.add(r);
    try {
      await r.start();
      if (this.stopping) throw new KnitError('KNIT_ERR_CLOSED', 'the agent is stopping');
      return r;
    } catch (e) {
      await r.stop(0);
      throw e;
    } finally {
      this.starting.delete(r);
    }
  }

  private async stopOne(r: ServiceRuntime, drainMs = 0): Promise<void> {
    await r.stop(drainMs);
  }

  /**
   * Applies a set of definitions whole or not at all. New services start
   * first (concurrently); changed ones are replaced one at a time (the old
   * one stops first, as it may hold the ports the new one wants); any
   * failure stops what was started, puts the old runtimes back, and
   * rejects. Then removed services stop and tag/meta changes re-register.
   */
  private async apply(next: ServiceDefinition[]): Promise<Omit<ReloadResult, 'ok' | 'problems'>> {
    // A mesh stream names its destination by port: two services of one host cannot share one.
    const byPort = new Map<number, ServiceDefinition>();
    for (const d of next) {
      const port = d.port ?? d.localServicePort ?? 0;
      const other = port ? byPort.get(port) : undefined;
      if (other) throw new KnitError('KNIT_ERR_CONFIG', `services ${other.id} (${other.file}) and ${d.id} (${d.file}) both register port ${port} on this host; a mesh connection names its destination by port, so each needs its own`);
      if (port) byPort.set(port, d);
    }
    const want = new Map(next.map((d) => [d.id, d]));
    const out = { started: [] as string[], stopped: [] as string[], restarted: [] as string[], updated: [] as string[] };
    const toStart = next.filter((d) => !this.runtimes.has(d.id));
    const toRestart = next.filter((d) => {
      const r = this.runtimes.get(d.id);
      return r && !sameDefinition(d, r.def) && !onlyRegistrationDiffers(d, r.def);
    });
    const toUpdate = next.filter((d) => {
      const r = this.runtimes.get(d.id);
      return r && !sameDefinition(d, r.def) && onlyRegistrationDiffers(d, r.def);
    });
    const toStop = [...this.runtimes.keys()].filter((id) => !want.has(id));

    const started: ServiceRuntime[] = [];
    const replaced: Array<{ old: ServiceDefinition; fresh?: ServiceRuntime }> = [];
    try {
      const results = await Promise.allSettled(toStart.map((d) => this.startOne(d)));
      for (const r of results) if (r.status === 'fulfilled') started.push(r.value);
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
      for (const d of toRestart) {
        const old = this.runtimes.get(d.id)!;
        await this.stopOne(old);
        this.runtimes.delete(d.id);
        const entry: { old: ServiceDefinition; fresh?: ServiceRuntime } = { old: old.def };
        replaced.push(entry);
        entry.fresh = await this.startOne(d);
        this.runtimes.set(d.id, entry.fresh);
      }
    } catch (e) {
      // Put everything back as it was; what cannot be put back is reported with the failure.
      const lost: string[] = [];
      await Promise.all(started.map((r) => this.stopOne(r)));
      for (const { old, fresh } of replaced.reverse()) {
        if (fresh) await this.stopOne(fresh);
        this.runtimes.delete(old.id);
        try {
          this.runtimes.set(old.id, await this.startOne(old));
        } catch (again) {
          lost.push(`${old.id}: ${(again as Error).message}`);
        }
      }
      const msg = (e as Error).message;
      throw new KnitError(e instanceof KnitError ? e.code : 'KNIT_ERR_LISTEN', lost.length ? `${msg}; and could not restart the previous ${lost.join('; ')}` : `${msg}; nothing changed`, { cause: e });
    }
    for (const r of started) {
      this.runtimes.set(r.def.id, r);
      out.started.push(r.def.id);
    }
    out.restarted.push(...toRestart.map((d) => d.id));
    for (const id of toStop) {
      const r = this.runtimes.get(id)!;
      this.runtimes.delete(id);
      await this.stopOne(r);
      out.stopped.push(id);
    }
    for (const d of toUpdate) {
      await this.runtimes.get(d.id)!.update(d);
      out.updated.push(d.id);
    }
    return out;
  }

  /** Re-reads the config dir. Any problem: nothing changes and every problem is returned and logged. */
  reload(): Promise<ReloadResult> {
    const run = async (): Promise<ReloadResult> => {
      const loaded = await loadServices(this.o.servicesDir, this.o.loadOptions).catch((e: Error) => ({ services: [], problems: [{ file: this.o.servicesDir, message: e.message }], warnings: [], files: [] }));
      if (loaded.problems.length) {
        this.o.log.error({ event: EVENTS.servicesReloadFailed, problems: loaded.problems.map(formatProblem) }, `reload refused, keeping the ${this.runtimes.size} running service(s):\n${loaded.problems.map(formatProblem).join('\n')}`);
        return { ok: false, problems: loaded.problems, started: [], stopped: [], restarted: [], updated: [] };
      }
      try {
        const changes = await this.apply(loaded.services);
        this.transparent?.localChanged();
        this.o.log.info({ event: EVENTS.servicesReloaded, ...changes }, 'services reloaded');
        return { ok: true, problems: [], ...changes };
      } catch (e) {
        this.o.log.error({ event: EVENTS.servicesReloadFailed, err: (e as Error).message }, `reload failed: ${(e as Error).message}`);
        return { ok: false, problems: [{ file: this.o.servicesDir, message: (e as Error).message }], started: [], stopped: [], restarted: [], updated: [] };
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

  state(): { node: string; trustDomain: string; hbonePort: number; services: ServiceState[]; transparent?: ReturnType<TransparentMode['state']> } {
    return {
      node: this.o.node, trustDomain: this.o.trustDomain, hbonePort: this.proxy.hbonePort, services: [...this.runtimes.values()].map((r) => r.state()),
      ...(this.transparent ? { transparent: this.transparent.state() } : {}),
    };
  }

  /** Re-asserts every instance in the registry (after a session re-creation; periodically as anti-entropy). */
  resync(): void {
    for (const r of this.runtimes.values()) void r.resync();
  }

  /** Deregisters every service, cancels those still starting, and drains open connections for at most `drainMs`. */
  async stop(drainMs = 0): Promise<void> {
    this.stopping = true;
    clearInterval(this.antiEntropy);
    for (const w of this.watches) w.close();
    await Promise.all([...[...this.starting].map((r) => r.stop(0)), ...[...this.runtimes.values()].map((r) => r.stop(drainMs))]);
    this.runtimes.clear();
    // Rules first: nothing is redirected to capture ports that are about to close.
    await this.transparent?.stop(true);
    await this.proxy.close(drainMs);
  }
}
