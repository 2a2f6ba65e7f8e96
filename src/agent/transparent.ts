/**
 * Transparent mode on one host: unmodified applications are carried
 * through the mesh without upstream ports.
 *
 * - The mesh as seen from here (`MeshView`): every service in the registry
 *   and its routable instances, so that a captured connection's original
 *   destination (an instance's address:port) maps to its service, and so
 *   that the redirect rules capture exactly the mesh's destinations.
 * - Virtual IPs: the control plane's signed `vips` table (server/vips.ts),
 *   verified like intentions; `<service>.knit` and
 *   `<service>.service.consul` resolve to them (proxy/transparent/dns.ts).
 * - The node proxy's capture listeners (15001 outbound, 15006 inbound).
 * - The netfilter rules (proxy/transparent/netfilter*), installed at start,
 *   kept current as instances and local services change, and removed on a
 *   clean stop.
 */
import type { Socket } from 'node:net';
import type { ServiceDefinition } from '../config/services.js';
import type { KnitError } from '../errors.js';
import { EVENTS, type Logger } from '../log/logger.js';
import type { Metrics } from '../log/metrics.js';
import type { Instance, Registry, Watch } from '../registry/registry.js';
import type { SignedKv } from '../registry/signed-kv.js';
import { decodeVips, VIPS_KEY, VIPS_KIND, type VipDocument } from '../server/vips.js';
import type { NodeProxy, TransparentRouting } from '../proxy/node-proxy.js';
import { MeshDns, readResolvConf, upstreamsFromResolvConf, type DnsUpstream } from '../proxy/transparent/dns.js';
import type { RedirectSpec } from '../proxy/transparent/netfilter-spec.js';
import { formatIp, invertVips, parseIp, parseRange, type VipRange } from '../proxy/transparent/vips.js';

/** How often the list of services is read again (new services; their instances are watched). */
const SERVICES_POLL_MS = 5000;
/** Changes to the rules are batched: a burst of registry events rewrites them once. */
const RULES_DEBOUNCE_MS = 200;
/** Unauthenticated callers remembered per permissive service, for `knit check`. */
const MAX_CALLERS = 64;
const HOUR_MS = 3_600_000;
const NONE: readonly Instance[] = Object.freeze([]);

/** Installs and removes the host's redirect rules (the netfilter module, or nothing when another tool owns them). */
export interface RedirectRules {
  install(spec: RedirectSpec): Promise<void>;
  cleanup(): Promise<void>;
}

export interface TransparentSettings {
  outboundPort: number;
  inboundPort: number;
  dnsPort: number;
  dnsHosts?: string[];
  outbound: 'passthrough' | 'deny';
  captureDns: boolean;
  /** The VIP range the rules capture until the control plane's table names its own. */
  vipRange: string;
  /** Everything of the rules but what the agent knows (ports, destinations, local service ports). */
  rules?: Omit<RedirectSpec, 'outboundPort' | 'inboundPort' | 'dnsPort' | 'hbonePort' | 'inboundPorts' | 'meshDestinations' | 'vipCidrs' | 'outbound' | 'captureDns'>;
}

export interface TransparentOptions {
  settings: TransparentSettings;
  proxy: NodeProxy;
  registry: Registry;
  kv: SignedKv;
  /** Instances peers may route to (node records). */
  routable: (i: Instance) => boolean;
  /** The services this agent runs now. */
  local: () => ServiceDefinition[];
  /** Absent: the rules are not the agent's to install (tests, or rules installed by hand). */
  redirect?: RedirectRules;
  /** resolv.conf to forward other names by; injectable for tests. */
  resolvConf?: string;
  log: Logger;
  metrics: Metrics;
  onRefused: (kind: string, e: KnitError) => void;
}

/** Every mesh service and its routable instances, kept current from the registry. */
class MeshView {
  private readonly watches = new Map<string, Watch>();
  private readonly instances = new Map<string, Instance[]>();
  private timer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(
    private readonly registry: Registry,
    private readonly routable: (i: Instance) => boolean,
    private readonly changed: () => void,
    private readonly log: Logger,
  ) {}

  async start(): Promise<void> {
    await this.poll();
    this.timer = setInterval(() => void this.poll(), SERVICES_POLL_MS);
    this.timer.unref();
  }

  private async poll(): Promise<void> {
    let names: string[];
    try {
      names = (await this.registry.listServices()).map((s) => s.name);
    } catch (e) {
      this.log.warn({ event: EVENTS.registryError, err: (e as Error).message }, `cannot list the mesh's services; routing on the last known ones: ${(e as Error).message}`);
      return;
    }
    if (this.closed) return;
    for (const name of names) {
      if (this.watches.has(name)) continue;
      this.watches.set(name, this.registry.watchService(name, (list) => {
        this.instances.set(name, list.filter(this.routable));
        this.changed();
      }, (err) => this.log.warn({ event: EVENTS.registryError, service: name, err: err.message }, `watch of ${name} failed; routing on its last known instances`)));
    }
  }

  /** Routable instances of `service` (the same array until it changes). */
  of(service: string): readonly Instance[] {
    return this.instances.get(service) ?? NONE;
  }

  /** Node records changed: what is routable may have. */
  refilter(): void {
    void this.poll();
  }

  /** Every routable instance by `<canonical address>|<port>` (see `endpointKey`). */
  byAddress(): Map<string, Instance> {
    const out = new Map<string, Instance>();
    for (const list of this.instances.values()) for (const i of list) if (i.port) out.set(endpointKey(i.address, i.port), i);
    return out;
  }

  close(): void {
    this.closed = true;
    clearInterval(this.timer);
    for (const w of this.watches.values()) w.close();
  }
}

/** What `knit check` shows about a permissive service: who is still calling it in plaintext. */
export interface UnauthenticatedCallers {
  service: string;
  callers: Array<{ address: string; count: number; lastSeen: string }>;
}

export class TransparentMode {
  private readonly view: MeshView;
  private vips = new Map<string, string>();
  private byVip = new Map<string, string>();
  private range: VipRange | undefined;
  private index = new Map<string, Instance>();
  private dns: MeshDns | undefined;
  private vipWatch: Watch | undefined;
  private rulesTimer: NodeJS.Timeout | undefined;
  private rulesApplied = '';
  private rulesError: string | undefined;
  private installing: Promise<void> = Promise.resolve();
  private readonly callers = new Map<string, Map<string, { count: number; last: number }>>();
  private stopped = false;

  constructor(private readonly o: TransparentOptions) {
    this.view = new MeshView(o.registry, o.routable, () => {
      this.index = this.view.byAddress();
      this.scheduleRules();
    }, o.log);
  }

  /** The proxy's side of it: how original destinations and sources map to the mesh. */
  private routing(): TransparentRouting {
    return {
      destination: (address, port) => {
        const svc = this.byVip.get(canonical(address));
        if (svc) return { service: svc };
        const inst = this.index.get(endpointKey(address, port));
        return inst ? { service: inst.service, instance: inst } : undefined;
      },
      endpoints: (service) => this.view.of(service),
      source: (app) => this.sourceOf(app),
      outbound: this.o.settings.outbound,
      onUnauthenticated: (service, remote) => this.remember(service, remote),
    };
  }

  /**
   * Which local service an unmodified application speaks as: the host's
   * only service, or the one service marked `proxy.mode: transparent`.
   * Several without a mark is refused with what to do: guessing would
   * lend one service's identity to another's process.
   */
  private sourceOf(_app: Socket): { service: string } | { error: string } {
    const local = this.o.local();
    const names = [...new Set(local.map((d) => d.name))];
    if (names.length === 1) return { service: names[0]! };
    const marked = [...new Set(local.filter((d) => d.mode === 'transparent').map((d) => d.name))];
    if (marked.length === 1) return { service: marked[0]! };
    if (names.length === 0) return { error: 'this host runs no mesh service to speak as' };
    return { error: `this host runs ${names.length} services (${names.join(', ')}) and ${marked.length ? `${marked.length} are` : 'none is'} marked connect.sidecar_service.proxy.mode: transparent; mark exactly the one unmodified applications here speak as` };
  }

  private remember(service: string, remote: string): void {
    let m = this.callers.get(service);
    if (!m) this.callers.set(service, (m = new Map<string, { count: number; last: number }>()));
    const e = m.get(remote) ?? { count: 0, last: 0 };
    e.count++;
    e.last = Date.now();
    m.set(remote, e);
    if (m.size > MAX_CALLERS) {
      const oldest = [...m.entries()].sort((a, b) => a[1].last - b[1].last)[0]!;
      m.delete(oldest[0]);
    }
  }

  /** Plaintext callers of the last hour, by service. */
  unauthenticated(now = Date.now()): UnauthenticatedCallers[] {
    return [...this.callers.entries()].map(([service, m]) => ({
      service,
      callers: [...m.entries()].filter(([, e]) => now - e.last < HOUR_MS).map(([address, e]) => ({ address, count: e.count, lastSeen: new Date(e.last).toISOString() })),
    })).filter((s) => s.callers.length > 0);
  }

  /** Starts the view, the VIP table, DNS, the capture listeners, then the rules (last: nothing is redirected to a port not yet listening). */
  async start(): Promise<void> {
    const s = this.o.settings;
    await new Promise<void>((resolve) => {
      this.vipWatch = this.o.kv.watch<VipDocument>(VIPS_KEY, VIPS_KIND, (doc) => {
        try {
          this.setVips(doc ? decodeVips(doc.body) : undefined);
        } catch (e) {
          this.o.onRefused('vips', e as KnitError);
        }
        resolve();
      }, (err) => {
        this.o.onRefused('vips', err);
        resolve();
      }, (err) => {
        this.o.log.error({ event: EVENTS.registryError, err: err.message }, `virtual IPs not read, keeping the last good table: ${err.message}`);
        resolve();
      });
    });
    await this.view.start();
    this.index = this.view.byAddress();
    await this.o.proxy.startCapture({ outboundPort: s.outboundPort, inboundPort: s.inboundPort, routing: this.routing() });
    const resolvPath = this.o.resolvConf ?? '/etc/resolv.conf';
    let upstreams: DnsUpstream[] = [];
    const refreshUpstreams = async (): Promise<void> => {
      upstreams = upstreamsFromResolvConf(await readResolvConf(resolvPath));
    };
    await refreshUpstreams().catch((e: Error) => this.o.log.warn({ event: EVENTS.registryError, err: e.message }, `cannot read ${resolvPath}: names outside the mesh will not resolve (${e.message})`));
    const dns = (hosts: string[]): MeshDns => (this.dns = new MeshDns({
      lookup: (service) => this.vips.get(service),
      reverse: (ip) => this.byVip.get(canonical(ip)),
      vipRange: this.range,
      upstreams: () => upstreams,
      hosts,
      port: s.dnsPort,
      onQuery: (q) => this.o.metrics.inc('knit_dns_queries_total', 'DNS queries the agent answered, by how each ended (mesh, nxdomain, forwarded, servfail, formerr, ...)', { kind: q.kind }),
    }));
    const dnsPort = await dns(s.dnsHosts ?? ['127.0.0.1', '::1']).start().catch((e: Error) => {
      // No IPv6 loopback on this host: IPv4 alone.
      if (s.dnsHosts) throw e;
      return dns(['127.0.0.1']).start();
    });
    this.o.log.info({ event: EVENTS.listening, role: 'dns', port: dnsPort }, `DNS for mesh names on 127.0.0.1:${dnsPort} (<service>.knit, <service>.service.consul)`);
    if (this.o.redirect) await this.applyRules();
  }

  private setVips(doc: VipDocument | undefined): void {
    this.vips = new Map(Object.entries(doc?.services ?? {}));
    this.byVip = new Map([...invertVips(this.vips)].map(([ip, svc]) => [canonical(ip), svc]));
    if (doc) {
      try {
        this.range = parseRange(doc.range);
      } catch {
        // A range the control plane wrote but this agent cannot read: the addresses themselves still resolve.
      }
    }
    this.o.log.info({ event: EVENTS.vipsChanged, services: this.vips.size }, `virtual IPs: ${this.vips.size} service(s)`);
    this.scheduleRules();
  }

  /** The local services changed (reload): their ports are what inbound capture takes. */
  localChanged(): void {
    this.scheduleRules();
  }

  refilter(): void {
    this.view.refilter();
  }

  private scheduleRules(): void {
    if (!this.o.redirect || this.stopped || this.rulesTimer) return;
    this.rulesTimer = setTimeout(() => {
      this.rulesTimer = undefined;
      void this.applyRules();
    }, RULES_DEBOUNCE_MS);
    this.rulesTimer.unref();
  }

  /** The spec the rules should match now. */
  spec(): RedirectSpec | undefined {
    const s = this.o.settings;
    if (!s.rules) return undefined;
    const inboundPorts = [...new Set(this.o.local().map((d) => d.port ?? d.localServicePort ?? 0).filter((p) => p > 0))].sort((a, b) => a - b);
    const dests = [...this.index.values()].map((i) => ({ address: i.address, port: i.port }));
    dests.sort((a, b) => (a.address === b.address ? a.port - b.port : a.address < b.address ? -1 : 1));
    return {
      ...s.rules,
      outboundPort: s.outboundPort,
      inboundPort: s.inboundPort,
      dnsPort: s.dnsPort,
      hbonePort: this.o.proxy.hbonePort,
      inboundPorts,
      meshDestinations: dests,
      vipCidrs: [this.range?.cidr ?? s.vipRange],
      outbound: s.outbound,
      captureDns: s.captureDns,
    };
  }

  private applyRules(): Promise<void> {
    const run = async (): Promise<void> => {
      const spec = this.spec();
      if (!spec || !this.o.redirect || this.stopped) return;
      const key = JSON.stringify(spec);
      if (key === this.rulesApplied) return;
      try {
        await this.o.redirect.install(spec);
        this.rulesApplied = key;
        this.rulesError = undefined;
        this.o.log.info({ event: EVENTS.rulesInstalled, destinations: spec.meshDestinations.length, inboundPorts: spec.inboundPorts }, `redirect rules installed: ${spec.meshDestinations.length} mesh destination(s), inbound ports ${spec.inboundPorts.join(',') || 'none'}`);
      } catch (e) {
        this.rulesError = (e as Error).message;
        this.o.log.error({ event: EVENTS.rulesFailed, err: this.rulesError }, `redirect rules not installed: ${this.rulesError}`);
      }
    };
    this.installing = this.installing.then(run, run);
    return this.installing;
  }

  state(): { vips: Record<string, string>; rules: { installed: boolean; error?: string }; unauthenticated: UnauthenticatedCallers[]; dnsPort?: number } {
    return {
      vips: Object.fromEntries(this.vips),
      rules: { installed: this.rulesApplied !== '', ...(this.rulesError ? { error: this.rulesError } : {}) },
      unauthenticated: this.unauthenticated(),
      dnsPort: this.dns?.port,
    };
  }

  /** Stops; `removeRules` on a clean stop, so nothing is redirected to a port nobody listens on. */
  async stop(removeRules: boolean): Promise<void> {
    this.stopped = true;
    clearTimeout(this.rulesTimer);
    this.vipWatch?.close();
    this.view.close();
    await this.installing;
    if (removeRules && this.o.redirect && this.rulesApplied) {
      await this.o.redirect.cleanup().then(
        () => this.o.log.info({ event: EVENTS.rulesRemoved }, 'redirect rules removed'),
        (e: Error) => this.o.log.error({ event: EVENTS.rulesFailed, err: e.message }, `redirect rules not removed: ${e.message} (knit redirect-traffic --cleanup removes them)`),
      );
    }
    await this.dns?.close();
  }
}

/** The index key of an address and port: registry and kernel may spell one address differently. */
const endpointKey = (address: string, port: number): string => `${canonical(address)}|${port}`;

/** One spelling per address (IPv6 compressed, IPv4-mapped IPv6 as IPv4), so lookups match. */
function canonical(address: string): string {
  const a = address.startsWith('::ffff:') && address.includes('.') ? address.slice(7) : address;
  const ip = parseIp(a);
  return ip ? formatIp(ip.family, ip.value) : a;
}
