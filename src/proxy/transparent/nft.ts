/**
 * The nftables backend: all of knit's rules live in one table, `inet knit`
 * (the inet family covers IPv4 and IPv6 at once), which knit owns whole and
 * replaces in one `nft -f` transaction. Mesh destinations are two named
 * sets (`mesh4`, `mesh6`, address . port), so the agent updates them in
 * one transaction too, without touching a rule.
 *
 * The table is rendered exactly as `nft list table inet knit` prints it
 * (nft 1.0), so that `read` can compare the installed text with the spec's
 * line by line: a rule someone edited by hand shows up as a difference.
 */
import { lineDifferences, NetfilterError, type BackendProbe, type Cidr, type Destination, type InstalledState, type NetfilterBackend, type RedirectPlan } from './netfilter-spec.js';
import { commandFailure, firstErrorLine, isPermissionError, NOT_FOUND, runChecked, type CommandRunner } from './netfilter-runner.js';

/** The one table knit owns. */
export const NFT_TABLE = 'inet knit';

/**
 * Priority of knit's nat chains: 10 before iptables' nat chains and
 * Docker's DNAT (-100), so a mesh destination is captured even where
 * another NAT rule would also want it; the first chain that NATs a
 * connection decides where it goes.
 */
const OUTPUT_PRIORITY = '-110';
// nft prints the prerouting priority by its name; the output hook has no named nat priority.
const PREROUTING_PRIORITY = 'dstnat - 10';

const cidr = (c: Cidr): string => (c.prefix === (c.family === 4 ? 32 : 128) ? c.address : `${c.address}/${c.prefix}`);
const ipOf = (family: 4 | 6): string => (family === 4 ? 'ip' : 'ip6');

/** The rules of the `output` chain (nat OUTPUT: connections made on this host), in order. */
function outputRules(p: RedirectPlan): string[] {
  const to = `redirect to :${p.outboundPort}`;
  return [
    ...p.skipUids.map((u) => `meta skuid ${u} return`),
    // DNS first: resolvers on loopback (127.0.0.53) are captured too.
    ...(p.captureDns ? [`udp dport 53 redirect to :${p.dnsPort}`, `tcp dport 53 redirect to :${p.dnsPort}`] : []),
    'meta l4proto != tcp return',
    'ip daddr 127.0.0.0/8 return',
    'ip6 daddr ::1 return',
    ...p.excludeCidrs.map((c) => `${ipOf(c.family)} daddr ${cidr(c)} return`),
    ...p.excludeOutboundPorts.map((port) => `tcp dport ${port} return`),
    `ip daddr . tcp dport @mesh4 ${to}`,
    `ip6 daddr . tcp dport @mesh6 ${to}`,
    ...p.vipCidrs.map((c) => `meta l4proto tcp ${ipOf(c.family)} daddr ${cidr(c)} ${to}`),
    ...(p.outbound === 'deny' ? [`meta l4proto tcp ${to}`] : []),
  ];
}

/** The rules of the `prerouting` chain (nat PREROUTING: connections arriving from the network). */
function preroutingRules(p: RedirectPlan): string[] {
  return p.inboundPorts.map((port) => `tcp dport ${port} redirect to :${p.inboundPort}`);
}

/** `inet knit` as `nft list table inet knit` prints it, without set elements. */
export function renderNftTable(p: RedirectPlan): string {
  const chain = (name: string, hook: string, priority: string, rules: string[]): string =>
    [`\tchain ${name} {`, `\t\ttype nat hook ${hook} priority ${priority}; policy accept;`, ...rules.map((r) => `\t\t${r}`), '\t}'].join('\n');
  return [
    `table ${NFT_TABLE} {`,
    '\tset mesh4 {\n\t\ttype ipv4_addr . inet_service\n\t}\n',
    '\tset mesh6 {\n\t\ttype ipv6_addr . inet_service\n\t}\n',
    `${chain('output', 'output', OUTPUT_PRIORITY, outputRules(p))}\n`,
    chain('prerouting', 'prerouting', PREROUTING_PRIORITY, preroutingRules(p)),
    '}',
  ].join('\n');
}

/** `add element` commands for the plan's destinations (none when there are none: nft refuses an empty list). */
function elementCommands(destinations: Destination[]): string[] {
  const out: string[] = [];
  for (const family of [4, 6] as const) {
    const items = destinations.filter((d) => d.family === family).map((d) => `${d.address} . ${d.port}`);
    if (items.length) out.push(`add element ${NFT_TABLE} mesh${family} { ${items.join(', ')} }`);
  }
  return out;
}

/**
 * The whole `nft -f` script: declare the table (a no-op when it exists),
 * delete it, define it anew, fill the sets. One transaction, so it works
 * whether or not the table exists and nothing sees a half-built table.
 */
export function renderNftScript(p: RedirectPlan): string {
  return [`table ${NFT_TABLE} {}`, `delete table ${NFT_TABLE}`, renderNftTable(p), ...elementCommands(p.destinations), ''].join('\n');
}

/** A listing's lines, trimmed, blank lines and set elements dropped: what `read` compares. */
function ruleLines(listing: string): string[] {
  return listing
    .replace(/elements = \{[^}]*\}/g, '')
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean);
}

/** Counts the rules (chain lines that are not the chain's header) and set elements of a listing. */
function countListing(listing: string): { rules: number; destinations: number } {
  let destinations = 0;
  for (const m of listing.matchAll(/elements = \{([^}]*)\}/g)) destinations += m[1]!.split(',').filter((x) => x.trim()).length;
  let rules = 0;
  let inChain = false;
  for (const line of listing.split('\n').map((l) => l.trim())) {
    if (/^chain \S+ \{$/.test(line)) inChain = true;
    else if (line === '}') inChain = false;
    else if (inChain && line && !line.startsWith('type ')) rules++;
  }
  return { rules, destinations };
}

/** The nftables backend, running `nft` through `run`. */
export class NftBackend implements NetfilterBackend {
  readonly name = 'nft' as const;
  constructor(private readonly run: CommandRunner) {}

  async probe(): Promise<BackendProbe> {
    const r = await this.run(['nft', 'list', 'tables']);
    if (r.code === 0) return { usable: true };
    if (r.code === NOT_FOUND) return { usable: false, missing: true, reason: 'nft is not installed' };
    if (isPermissionError(r.stderr)) throw new NetfilterError('permission', 'nft list tables: needs CAP_NET_ADMIN: run as root (or grant the capability)', { command: 'nft list tables' });
    return { usable: false, missing: false, reason: `nft list tables failed: ${firstErrorLine(r.stderr)}` };
  }

  /** The listing of knit's table, or undefined when there is none. */
  private async listing(): Promise<string | undefined> {
    const argv = ['nft', 'list', 'table', ...NFT_TABLE.split(' ')];
    const r = await this.run(argv);
    if (r.code === 0) return r.stdout;
    if (/No such file or directory/.test(r.stderr)) return undefined;
    throw commandFailure(argv, r);
  }

  async apply(plan: RedirectPlan): Promise<InstalledState> {
    await runChecked(this.run, ['nft', '-f', '-'], renderNftScript(plan));
    const state = await this.read(plan);
    if (!state) throw new NetfilterError('rejected', `nft -f -: succeeded, but table ${NFT_TABLE} is not there`, { command: 'nft -f -' });
    return state;
  }

  async read(plan?: RedirectPlan): Promise<InstalledState | undefined> {
    const listing = await this.listing();
    if (listing === undefined) return undefined;
    const state: InstalledState = { backend: 'nft', objects: [`table ${NFT_TABLE}`], ...countListing(listing), notes: [] };
    if (plan) {
      const differences = lineDifferences(ruleLines(renderNftTable(plan)), ruleLines(listing));
      state.matches = differences.length === 0;
      if (!state.matches) state.differences = differences;
    }
    return state;
  }

  async setDestinations(plan: RedirectPlan): Promise<void> {
    const script = [`flush set ${NFT_TABLE} mesh4`, `flush set ${NFT_TABLE} mesh6`, ...elementCommands(plan.destinations), ''].join('\n');
    const r = await this.run(['nft', '-f', '-'], script);
    if (r.code === 0) return;
    if (/No such file or directory/.test(r.stderr)) throw new NetfilterError('not-installed', `table ${NFT_TABLE} is not installed: run knit redirect-traffic first`, { command: 'nft -f -' });
    throw commandFailure(['nft', '-f', '-'], r);
  }

  async remove(): Promise<string[]> {
    if ((await this.listing()) === undefined) return [];
    // Declare-then-delete: one transaction that succeeds even if the table went away meanwhile.
    await runChecked(this.run, ['nft', '-f', '-'], `table ${NFT_TABLE} {}\ndelete table ${NFT_TABLE}\n`);
    return [`table ${NFT_TABLE}`];
  }
}
