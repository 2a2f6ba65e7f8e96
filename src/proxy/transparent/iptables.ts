/**
 * The iptables backend, for hosts where nft is absent or cannot reach the
 * kernel. knit keeps to chains of its own in the nat tables of iptables
 * and ip6tables: KNIT_OUTPUT and KNIT_PREROUTING, each entered by one jump
 * rule at the top of OUTPUT / PREROUTING, and KNIT_MESH with one rule per
 * mesh destination (no ipset: one package fewer to depend on; the cost is
 * a linear walk over the destinations on a connection's first packet).
 *
 * Every change goes through `iptables-restore --noflush` naming knit's
 * chains only, so that each address family changes in one transaction and
 * nothing else (Docker's chains, a firewall's) is rewritten. The rules are
 * rendered as iptables-save prints them, so `read` compares text.
 *
 * One limit: on nf_tables-backed iptables, when the nat table did not exist
 * before knit added its chains, cleanup leaves it behind empty (base chains
 * with policy ACCEPT and no rule), because iptables has no command to
 * delete a table. It redirects nothing.
 */
import { lineDifferences, NetfilterError, type BackendProbe, type Cidr, type InstalledState, type NetfilterBackend, type RedirectPlan } from './netfilter-spec.js';
import { commandFailure, isUnsupported, NOT_FOUND, runChecked, type CommandRunner } from './netfilter-runner.js';

/** One address family's tools and constants. */
interface Family {
  family: 4 | 6;
  /** How nft and status name it: `ip` or `ip6`. */
  name: 'ip' | 'ip6';
  save: string;
  restore: string;
  loopback: string;
}

const FAMILIES: readonly Family[] = [
  { family: 4, name: 'ip', save: 'iptables-save', restore: 'iptables-restore', loopback: '127.0.0.0/8' },
  { family: 6, name: 'ip6', save: 'ip6tables-save', restore: 'ip6tables-restore', loopback: '::1/128' },
];

/** knit's chains, in the order they are declared and removed. */
export const IPTABLES_CHAINS = ['KNIT_OUTPUT', 'KNIT_PREROUTING', 'KNIT_MESH'] as const;
type KnitChain = (typeof IPTABLES_CHAINS)[number];

/** The built-in chains knit jumps from, and where to. */
const JUMPS: ReadonlyArray<readonly [builtin: string, chain: KnitChain]> = [
  ['OUTPUT', 'KNIT_OUTPUT'],
  ['PREROUTING', 'KNIT_PREROUTING'],
];
const jumpRule = (builtin: string, chain: string): string => `-A ${builtin} -j ${chain}`;

const cidr = (c: Cidr): string => `${c.address}/${c.prefix}`;

/** knit's rules for one family, chain by chain, as iptables-save prints them. */
export function renderIptablesRules(p: RedirectPlan, family: 4 | 6): Record<KnitChain, string[]> {
  const fam = FAMILIES.find((f) => f.family === family)!;
  const out = `-j REDIRECT --to-ports ${p.outboundPort}`;
  const dns = `-j REDIRECT --to-ports ${p.dnsPort}`;
  return {
    KNIT_OUTPUT: [
      ...p.skipUids.map((u) => `-m owner --uid-owner ${u} -j RETURN`),
      // DNS first: resolvers on loopback (127.0.0.53) are captured too.
      ...(p.captureDns ? [`-p udp -m udp --dport 53 ${dns}`, `-p tcp -m tcp --dport 53 ${dns}`] : []),
      '! -p tcp -j RETURN',
      `-d ${fam.loopback} -j RETURN`,
      ...p.excludeCidrs.filter((c) => c.family === family).map((c) => `-d ${cidr(c)} -j RETURN`),
      ...p.excludeOutboundPorts.map((port) => `-p tcp -m tcp --dport ${port} -j RETURN`),
      '-j KNIT_MESH',
      ...p.vipCidrs.filter((c) => c.family === family).map((c) => `-d ${cidr(c)} -p tcp ${out}`),
      ...(p.outbound === 'deny' ? [`-p tcp ${out}`] : []),
    ].map((r) => `-A KNIT_OUTPUT ${r}`),
    KNIT_PREROUTING: p.inboundPorts.map((port) => `-A KNIT_PREROUTING -p tcp -m tcp --dport ${port} -j REDIRECT --to-ports ${p.inboundPort}`),
    KNIT_MESH: meshRules(p, family),
  };
}

function meshRules(p: RedirectPlan, family: 4 | 6): string[] {
  const host = family === 4 ? 32 : 128;
  return p.destinations
    .filter((d) => d.family === family)
    .map((d) => `-A KNIT_MESH -d ${d.address}/${host} -p tcp -m tcp --dport ${d.port} -j REDIRECT --to-ports ${p.outboundPort}`);
}

/** What knit has in one family's nat table. */
interface FamilyState {
  /** knit's chains that exist. */
  chains: KnitChain[];
  /** Their rules, as iptables-save prints them. */
  rules: Record<KnitChain, string[]>;
  /** Jump rules into knit's chains from the built-in chains, one entry per rule. */
  jumps: string[];
}

/** Reads knit's part of an iptables-save output (every table; knit's chains live in nat). */
export function parseIptablesSave(text: string): FamilyState {
  const state: FamilyState = { chains: [], rules: { KNIT_OUTPUT: [], KNIT_PREROUTING: [], KNIT_MESH: [] }, jumps: [] };
  let inNat = false;
  for (const line of text.split('\n')) {
    if (line.startsWith('*')) inNat = line === '*nat';
    if (!inNat) continue;
    const decl = /^:(KNIT_[A-Z]+) /.exec(line);
    if (decl && (IPTABLES_CHAINS as readonly string[]).includes(decl[1]!)) state.chains.push(decl[1] as KnitChain);
    const rule = /^-A (\S+) /.exec(line);
    if (rule && (IPTABLES_CHAINS as readonly string[]).includes(rule[1]!)) state.rules[rule[1] as KnitChain].push(line);
    if (JUMPS.some(([b, c]) => line === jumpRule(b, c))) state.jumps.push(line);
  }
  return state;
}

const isEmpty = (s: FamilyState): boolean => s.chains.length === 0 && s.jumps.length === 0;

/** iptables-restore input that removes everything of knit's in `s` (jumps first: a chain in use cannot be deleted). */
function removalScript(s: FamilyState): string {
  return [
    '*nat',
    ...s.jumps.map((j) => j.replace(/^-A /, '-D ')),
    ...s.chains.map((c) => `-F ${c}`),
    ...s.chains.map((c) => `-X ${c}`),
    'COMMIT',
    '',
  ].join('\n');
}

/** The iptables backend, running iptables-save/-restore and ip6tables-save/-restore through `run`. */
export class IptablesBackend implements NetfilterBackend {
  readonly name = 'iptables' as const;
  private variant?: string;
  constructor(private readonly run: CommandRunner) {}

  async probe(): Promise<BackendProbe> {
    const r = await this.run(['iptables', '-V']);
    if (r.code === NOT_FOUND) return { usable: false, missing: true, reason: 'iptables is not installed' };
    if (r.code !== 0) return { usable: false, missing: false, reason: `iptables -V failed: ${r.stderr.trim()}` };
    // "iptables v1.8.9 (nf_tables)"; before 1.8 there was only legacy, and no parenthesis.
    this.variant = /\((nf_tables|legacy)\)/.exec(r.stdout)?.[1] ?? 'legacy';
    return { usable: true, variant: this.variant };
  }

  /** The restore command: legacy iptables serialises writers with a lock, which knit waits for (bounded). */
  private restore(fam: Family): string[] {
    return this.variant === 'legacy' ? [fam.restore, '--noflush', '--wait=10'] : [fam.restore, '--noflush'];
  }

  /** knit's state in one family, or `skip` with the reason when the kernel has no nat table for it. */
  private async family(fam: Family): Promise<FamilyState | { skip: string }> {
    const r = await this.run([fam.save]);
    if (r.code === 0) return parseIptablesSave(r.stdout);
    if (fam.family === 6 && r.code !== NOT_FOUND && isUnsupported(r.stderr)) {
      return { skip: `IPv6: ${fam.save} cannot reach the kernel (${r.stderr.trim().split('\n')[0]}); IPv6 connections are not redirected` };
    }
    throw commandFailure([fam.save], r);
  }

  async apply(plan: RedirectPlan): Promise<InstalledState> {
    if (this.variant === undefined) await this.probe();
    const notes: string[] = [];
    const done: Array<{ fam: Family; before: FamilyState }> = [];
    for (const fam of FAMILIES) {
      const before = await this.family(fam);
      if ('skip' in before) {
        notes.push(before.skip);
        continue;
      }
      const rules = renderIptablesRules(plan, fam.family);
      const script = [
        '*nat',
        // Declaring a chain that exists flushes it (with --noflush too): the old rules go in the same transaction.
        ...IPTABLES_CHAINS.map((c) => `:${c} - [0:0]`),
        ...IPTABLES_CHAINS.flatMap((c) => rules[c]),
        ...JUMPS.filter(([b, c]) => !before.jumps.includes(jumpRule(b, c))).map(([b, c]) => `-I ${b} 1 -j ${c}`),
        'COMMIT',
        '',
      ].join('\n');
      try {
        await runChecked(this.run, this.restore(fam), script);
      } catch (e) {
        await this.rollback(done);
        throw e;
      }
      done.push({ fam, before });
    }
    const state = await this.read(plan);
    if (!state) throw new NetfilterError('rejected', 'iptables-restore succeeded, but knit\'s chains are not there', { command: 'iptables-restore' });
    state.notes.push(...notes.filter((n) => !state.notes.includes(n)));
    return state;
  }

  /** Puts families already changed by a failed apply back as they were (best effort: the apply's error is what the caller sees). */
  private async rollback(done: Array<{ fam: Family; before: FamilyState }>): Promise<void> {
    for (const { fam, before } of done) {
      const now = await this.family(fam).catch(() => undefined);
      if (!now || 'skip' in now) continue;
      const script = [
        '*nat',
        ...before.chains.map((c) => `:${c} - [0:0]`),
        ...before.chains.flatMap((c) => before.rules[c]),
        // Chains and jumps the failed apply added.
        ...now.jumps.filter((j) => !before.jumps.includes(j)).map((j) => j.replace(/^-A /, '-D ')),
        ...now.chains.filter((c) => !before.chains.includes(c)).map((c) => `-F ${c}`),
        ...now.chains.filter((c) => !before.chains.includes(c)).map((c) => `-X ${c}`),
        'COMMIT',
        '',
      ].join('\n');
      await this.run(this.restore(fam), script);
    }
  }

  async read(plan?: RedirectPlan): Promise<InstalledState | undefined> {
    if (this.variant === undefined) await this.probe();
    const state: InstalledState = { backend: 'iptables', variant: this.variant, objects: [], rules: 0, destinations: 0, notes: [] };
    const want: string[] = [];
    const got: string[] = [];
    let found = false;
    for (const fam of FAMILIES) {
      const s = await this.family(fam);
      if ('skip' in s) {
        state.notes.push(s.skip);
        continue;
      }
      if (!isEmpty(s)) found = true;
      state.objects.push(...s.chains.map((c) => `${fam.name} nat ${c}`));
      state.rules += s.rules.KNIT_OUTPUT.length + s.rules.KNIT_PREROUTING.length;
      state.destinations += s.rules.KNIT_MESH.length;
      if (plan) {
        const rules = renderIptablesRules(plan, fam.family);
        const tag = (l: string): string => `${fam.name}: ${l}`;
        // Chains and jumps in any order (iptables-save sorts them its own way); rules in their order, which decides.
        const unordered = (chains: readonly string[], jumps: readonly string[]): string[] => [...chains.map((c) => `chain ${c}`), ...jumps].sort();
        want.push(...[...unordered(IPTABLES_CHAINS, JUMPS.map(([b, c]) => jumpRule(b, c))), ...rules.KNIT_OUTPUT, ...rules.KNIT_PREROUTING].map(tag));
        got.push(...[...unordered(s.chains, s.jumps), ...s.rules.KNIT_OUTPUT, ...s.rules.KNIT_PREROUTING].map(tag));
      }
    }
    if (!found) return undefined;
    if (plan) {
      const differences = lineDifferences(want, got);
      state.matches = differences.length === 0;
      if (!state.matches) state.differences = differences;
    }
    return state;
  }

  async setDestinations(plan: RedirectPlan): Promise<void> {
    if (this.variant === undefined) await this.probe();
    for (const fam of FAMILIES) {
      const s = await this.family(fam);
      if ('skip' in s) continue;
      if (!s.chains.includes('KNIT_MESH')) throw new NetfilterError('not-installed', `${fam.name} nat chain KNIT_MESH is not installed: run knit redirect-traffic first`, { command: fam.save });
      await runChecked(this.run, this.restore(fam), ['*nat', ':KNIT_MESH - [0:0]', ...meshRules(plan, fam.family), 'COMMIT', ''].join('\n'));
    }
  }

  async remove(): Promise<string[]> {
    if (this.variant === undefined) await this.probe();
    const removed: string[] = [];
    for (const fam of FAMILIES) {
      const s = await this.family(fam);
      if ('skip' in s || isEmpty(s)) continue;
      await runChecked(this.run, this.restore(fam), removalScript(s));
      removed.push(...s.jumps.map((j) => `${fam.name} nat rule "${j}"`), ...s.chains.map((c) => `${fam.name} nat ${c}`));
    }
    return removed;
  }
}
