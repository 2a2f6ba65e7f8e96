/**
 * The netfilter half of transparent mode: the kernel rules that send
 * applications' connections to the agent's capture ports, installed,
 * inspected and removed. `knit redirect-traffic` and the agent use this
 * module; it picks a backend (nftables first, iptables when nft is absent
 * or cannot reach the kernel) and keeps to what knit owns.
 *
 * What is redirected (see RedirectSpec):
 * - outbound (nat OUTPUT), TCP from every uid but the agent's and the
 *   excluded ones, not to loopback, excluded networks or excluded ports:
 *   in `passthrough`, only connections to mesh destinations and VIPs go to
 *   the outbound capture port. Everything else never meets the proxy, so
 *   when the agent dies, non-mesh traffic keeps working while mesh
 *   destinations fail closed (connection refused, no plaintext leaves). In
 *   `deny`, all of it goes to the proxy, which refuses what is not mesh:
 *   a dead agent then blocks all outbound TCP but the exclusions.
 * - DNS (UDP and TCP port 53, any destination, loopback resolvers
 *   included) from the same uids goes to the agent's resolver when
 *   `captureDns`. A dead agent means failed name lookups for those uids,
 *   in either mode: keep that in mind before SIGKILLing it.
 * - inbound (nat PREROUTING), TCP to the host's mesh service ports goes to
 *   the inbound capture port; the HBONE port and every other port arrive
 *   untouched.
 */
import { IptablesBackend } from './iptables.js';
import { NftBackend } from './nft.js';
import { NetfilterError, planRedirect, type BackendName, type InstalledState, type NetfilterBackend, type RedirectSpec } from './netfilter-spec.js';
import type { CommandRunner } from './netfilter-runner.js';

export { NetfilterError, planRedirect, redirectSpec, parseCidr, canonicalAddress } from './netfilter-spec.js';
export type { BackendName, InstalledState, NetfilterFailure, RedirectPlan, RedirectSpec, NetfilterBackend } from './netfilter-spec.js';
export { processRunner, type CommandRunner, type RunResult, type ProcessRunnerOptions } from './netfilter-runner.js';
export { renderNftScript, renderNftTable, NFT_TABLE } from './nft.js';
export { renderIptablesRules, IPTABLES_CHAINS } from './iptables.js';

/** Which backend to use: `auto` tries nft first, then iptables. */
export type BackendChoice = BackendName | 'auto';

/** What `install` did. */
export interface InstallResult extends InstalledState {
  /** knit's rules were there before (from an earlier install) and are now replaced. */
  replaced: boolean;
  /** knit's objects removed from the other backend, so that only one set of rules is in force. */
  removedOther: string[];
}

/** What `status` found. */
export interface RedirectStatus {
  installed: boolean;
  /** What each backend holds of knit's (normally one). */
  backends: InstalledState[];
  /** Whether what is installed equals what the spec renders (only when a spec was given). */
  matches?: boolean;
  notes: string[];
}

/** What `cleanup` removed; empty when nothing of knit's was installed. */
export interface CleanupResult {
  removed: string[];
}

/** Installs, reads and removes knit's redirect on one host or namespace. */
export interface Redirector {
  /**
   * Replaces knit's rules with those of `spec`, atomically, with the chosen
   * backend, then removes any rules knit left with the other one.
   * Idempotent. Rejects with a NetfilterError.
   */
  install(spec: RedirectSpec, opts?: { backend?: BackendChoice }): Promise<InstallResult>;
  /** What is installed, and whether it matches `spec` (mesh destinations are counted, not compared: the agent keeps them). Changes nothing. */
  status(spec?: RedirectSpec): Promise<RedirectStatus>;
  /** Removes exactly what knit added, with every backend; a no-op when nothing is installed. */
  cleanup(): Promise<CleanupResult>;
  /** Replaces the mesh destinations only, in one transaction; rejects with `not-installed` when knit's rules are absent. */
  setDestinations(spec: RedirectSpec, opts?: { backend?: BackendName }): Promise<void>;
}

/** What the redirector needs: how to run commands (on the host, in a namespace, or recorded in a test). */
export interface RedirectorDeps {
  run: CommandRunner;
}

const INSTALL_HINT: Record<BackendName, string> = { nft: 'apt-get install nftables', iptables: 'apt-get install iptables' };

/** Builds a Redirector that runs its commands through `deps.run`. */
export function createRedirector(deps: RedirectorDeps): Redirector {
  const backends: Record<BackendName, NetfilterBackend> = { nft: new NftBackend(deps.run), iptables: new IptablesBackend(deps.run) };

  /** The backend to install with, or a NetfilterError saying what to install. */
  async function choose(choice: BackendChoice): Promise<NetfilterBackend> {
    const order: BackendName[] = choice === 'auto' ? ['nft', 'iptables'] : [choice];
    const why: string[] = [];
    let anyPresent = false;
    for (const name of order) {
      const p = await backends[name].probe();
      if (p.usable) return backends[name];
      anyPresent ||= !p.missing;
      why.push(p.reason);
    }
    if (choice !== 'auto') {
      const p = why[0] ?? '';
      throw new NetfilterError(anyPresent ? 'unsupported' : 'missing-tool', anyPresent ? `${p}: the kernel may lack ${choice === 'nft' ? 'nf_tables' : 'the nat table'}` : `${p}: ${INSTALL_HINT[choice]}`);
    }
    if (!anyPresent) throw new NetfilterError('missing-tool', 'neither nft nor iptables is installed: apt-get install nftables');
    throw new NetfilterError('unsupported', `no usable netfilter tool: ${why.join('; ')}`);
  }

  /** The backends whose tool is usable here (a missing tool holds nothing of knit's). */
  async function usable(): Promise<NetfilterBackend[]> {
    const out: NetfilterBackend[] = [];
    for (const b of Object.values(backends)) if ((await b.probe()).usable) out.push(b);
    return out;
  }

  return {
    async install(spec, opts = {}) {
      const plan = planRedirect(spec);
      let chosen = await choose(opts.backend ?? 'auto');
      let before = await chosen.read();
      let state: InstalledState;
      try {
        state = await chosen.apply(plan);
      } catch (e) {
        // nft that lists tables but cannot build this one (a kernel before 5.2 has no nat in the inet family): iptables may still do.
        const fallback = backends.iptables;
        if ((opts.backend ?? 'auto') !== 'auto' || chosen === fallback || !(e instanceof NetfilterError) || !['unsupported', 'rejected'].includes(e.reason) || !(await fallback.probe()).usable) throw e;
        chosen = fallback;
        before = await chosen.read();
        state = await chosen.apply(plan);
        state.notes.push(`nft could not install table inet knit (${e.message}); used iptables instead`);
      }
      const removedOther: string[] = [];
      for (const other of Object.values(backends)) {
        if (other === chosen || !(await other.probe()).usable) continue;
        try {
          removedOther.push(...(await other.remove()));
        } catch (e) {
          // The new rules are in force (and come first): a stale copy elsewhere is worth a note, not a failed install.
          state.notes.push(`could not remove knit's old ${other.name} rules: ${(e as Error).message}`);
        }
      }
      return { ...state, replaced: before !== undefined, removedOther };
    },

    async status(spec) {
      const plan = spec && planRedirect(spec);
      const found: InstalledState[] = [];
      const notes: string[] = [];
      for (const b of await usable()) {
        const s = await b.read(plan);
        if (s) found.push(s);
      }
      if (found.length > 1) notes.push('knit\'s rules are installed with both nft and iptables: run knit redirect-traffic again (it keeps one), or --cleanup');
      return {
        installed: found.length > 0,
        backends: found,
        ...(plan ? { matches: found.length === 1 && found[0]!.matches === true } : {}),
        notes: [...notes, ...found.flatMap((s) => s.notes)],
      };
    },

    async cleanup() {
      const removed: string[] = [];
      for (const b of await usable()) removed.push(...(await b.remove()));
      return { removed };
    },

    async setDestinations(spec, opts = {}) {
      const plan = planRedirect(spec);
      if (opts.backend) return backends[opts.backend].setDestinations(plan);
      for (const b of await usable()) {
        if (await b.read()) return b.setDestinations(plan);
      }
      throw new NetfilterError('not-installed', 'knit\'s redirect is not installed: run knit redirect-traffic first');
    },
  };
}
