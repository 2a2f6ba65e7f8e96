/**
 * `knit redirect-traffic`: installs, shows or removes transparent mode's
 * netfilter rules on this host or in a network namespace (a pod's, for a
 * Kubernetes init step). The spec comes from agent.yaml's `transparent:`
 * section and the service files (their ports are the inbound ports), with
 * no mesh destinations: the running agent fills those in.
 */
import { access } from 'node:fs/promises';
import { loadAgentConfig, type AgentConfig } from '../config/node-config.js';
import { loadServicesStrict } from '../config/services.js';
import { ConfigError } from '../errors.js';
import {
  createRedirector, processRunner, redirectSpec,
  type BackendName, type CleanupResult, type CommandRunner, type InstallResult, type RedirectSpec, type RedirectStatus,
} from '../proxy/transparent/netfilter.js';

/** Exclusions given on the command line; each replaces the config's list when present. */
export interface RedirectOverrides {
  excludeInboundPorts?: number[];
  excludeOutboundPorts?: number[];
  excludeCidrs?: string[];
  excludeUids?: number[];
}

/** What `knit redirect-traffic` was asked to do, and where. */
export interface RedirectOptions {
  action: 'install' | 'status' | 'cleanup';
  configFile: string;
  /** Whether the config file was named: a missing default config is no error for `status` (it then shows without comparing). */
  configGiven: boolean;
  netns?: string;
  backend?: BackendName;
  overrides?: RedirectOverrides;
  /** How commands run (default: processes, inside `ip netns exec` when `netns`). */
  run?: CommandRunner;
}

/** What was done, for the CLI to print. */
export type RedirectOutcome =
  | { action: 'install'; spec: RedirectSpec; result: InstallResult }
  | { action: 'status'; status: RedirectStatus; comparedWith?: string }
  | { action: 'cleanup'; result: CleanupResult };

/** The redirect spec of an agent config, its services' ports and the command line's exclusions. */
export function specFromConfig(cfg: AgentConfig, servicePorts: number[], overrides: RedirectOverrides = {}): RedirectSpec {
  const t = cfg.transparent;
  return redirectSpec({
    agentUid: t.uid,
    outboundPort: t.outboundPort,
    inboundPort: t.inboundPort,
    dnsPort: t.dnsPort,
    // hbone_port 0 (any free port) cannot be kept out of a rule; 15008 is the one peers dial.
    hbonePort: cfg.hbonePort || 15008,
    inboundPorts: servicePorts,
    meshDestinations: [],
    vipCidrs: [t.vipRange],
    outbound: t.outbound,
    excludeInboundPorts: overrides.excludeInboundPorts ?? t.excludeInboundPorts,
    excludeOutboundPorts: overrides.excludeOutboundPorts ?? t.excludeOutboundPorts,
    excludeCidrs: overrides.excludeCidrs ?? t.excludeCidrs,
    excludeUids: overrides.excludeUids ?? t.excludeUids,
    captureDns: t.captureDns,
  });
}

/** The ports of the host's services (those that have one), from the services directory. */
async function servicePorts(cfg: AgentConfig): Promise<number[]> {
  try {
    const { services } = await loadServicesStrict(cfg.servicesDir, { allowRemoteUpstreams: cfg.allowRemoteUpstreams });
    return services.flatMap((s) => (s.port ? [s.port] : []));
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    throw new ConfigError([{ file: cfg.servicesDir, message: `cannot read the service files: ${(e as Error).message}` }]);
  }
}

/** The config and the spec it gives, or undefined when `status` runs without a config. */
async function specFor(o: RedirectOptions): Promise<{ cfg: AgentConfig; spec: RedirectSpec } | undefined> {
  if (o.action === 'status' && !o.configGiven && !(await access(o.configFile).then(() => true, () => false))) return undefined;
  const cfg = await loadAgentConfig(o.configFile);
  return { cfg, spec: specFromConfig(cfg, await servicePorts(cfg), o.overrides) };
}

/**
 * Does what `o.action` says and returns what came of it. Rejects with a
 * ConfigError (agent.yaml, the service files, transparent mode off) or a
 * NetfilterError (tools, permissions, the namespace), each one line.
 */
export async function redirectTraffic(o: RedirectOptions): Promise<RedirectOutcome> {
  const redirector = createRedirector({ run: o.run ?? processRunner({ netns: o.netns }) });
  if (o.action === 'cleanup') return { action: 'cleanup', result: await redirector.cleanup() };
  const got = await specFor(o);
  if (o.action === 'status') {
    // With transparent mode off there is nothing the config wants installed to compare with.
    const compare = got?.cfg.transparent.enabled ? got : undefined;
    const status = await redirector.status(compare?.spec);
    if (got && !compare) status.notes.push(`transparent mode is off in ${o.configFile} (transparent.enabled): not compared`);
    return { action: 'status', status, ...(compare ? { comparedWith: o.configFile } : {}) };
  }
  if (!got) throw new ConfigError([{ file: o.configFile, message: 'cannot read it' }]);
  if (!got.cfg.transparent.enabled) {
    // Redirecting with no agent capturing would break mesh connections and, with DNS capture, every name lookup.
    throw new ConfigError([{ file: o.configFile, field: 'transparent.enabled', message: 'transparent mode is off: set transparent.enabled: true (and run the agent with it) before installing the redirect' }]);
  }
  return { action: 'install', spec: got.spec, result: await redirector.install(got.spec, { backend: o.backend ?? 'auto' }) };
}
