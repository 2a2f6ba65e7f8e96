/**
 * Stable virtual IPs for mesh services. Transparent mode gives every service
 * one address from a private range; `<service>.knit` resolves to it and the
 * capture rules send connections for it into the outbound proxy.
 *
 * The table is owned by the control plane, which persists it: once a service
 * has an address it keeps it for as long as the table holds the entry, so a
 * client that cached a DNS answer never reaches a different service through
 * it. A new service's first choice is derived from a hash of its name only,
 * so the same service tends to get the same address in every mesh that uses
 * the same range (handy when reading logs and packet captures across meshes);
 * collisions probe linearly to the next free slot.
 *
 * Everything here is pure: no clock, no I/O, no randomness.
 */
import { createHash } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import { KnitError } from '../../errors.js';

/**
 * The default range: 240.0.0.0/4 is "reserved for future use" (RFC 1112), so
 * it is never routed on the internet nor handed out by DHCP or cloud VPCs,
 * which makes it safe to capture locally. A /16 holds 65,534 services.
 */
export const DEFAULT_VIP_RANGE = '240.240.0.0/16';

/** A parsed CIDR block that virtual IPs are assigned from. */
export interface VipRange {
  /** Canonical text, e.g. `240.240.0.0/16` or `fd00:6b6e::/96`. */
  readonly cidr: string;
  readonly family: 4 | 6;
  readonly prefix: number;
  /** The network address as an integer. */
  readonly network: bigint;
  /** Addresses in the block, network and broadcast included. */
  readonly size: bigint;
  /** Addresses that may be assigned: `size - 2` (network and broadcast are never used). */
  readonly usable: bigint;
}

/** An IP address as a family and an integer, the form ranges are computed in. */
export interface ParsedIp {
  readonly family: 4 | 6;
  readonly value: bigint;
}

const BITS = { 4: 32, 6: 128 } as const;

/** Parses an IPv4 or IPv6 address (no zone id) to an integer; undefined when it is not one. */
export function parseIp(text: string): ParsedIp | undefined {
  if (isIPv4(text)) return { family: 4, value: v4ToBigint(text) };
  if (!isIPv6(text) || text.includes('%')) return undefined;
  let s = text;
  // An embedded IPv4 tail (::ffff:1.2.3.4) becomes its two hex groups.
  const lastColon = s.lastIndexOf(':');
  const tail = s.slice(lastColon + 1);
  if (tail.includes('.')) {
    const v = v4ToBigint(tail);
    s = `${s.slice(0, lastColon + 1)}${(v >> 16n).toString(16)}:${(v & 0xffffn).toString(16)}`;
  }
  const halves = s.split('::');
  const head = halves[0] ? halves[0].split(':') : [];
  const rest = halves.length > 1 && halves[1] ? halves[1].split(':') : [];
  const zeros = halves.length > 1 ? 8 - head.length - rest.length : 0;
  const groups = [...head, ...Array<string>(zeros).fill('0'), ...rest];
  if (groups.length !== 8) return undefined;
  let value = 0n;
  for (const g of groups) value = (value << 16n) | BigInt(parseInt(g, 16));
  return { family: 6, value };
}

function v4ToBigint(text: string): bigint {
  return text.split('.').reduce((acc, octet) => (acc << 8n) | BigInt(Number(octet)), 0n);
}

/** Formats an integer address: dotted quad, or RFC 5952 compressed IPv6 (lower case, longest zero run as `::`). */
export function formatIp(family: 4 | 6, value: bigint): string {
  if (family === 4) {
    return [24n, 16n, 8n, 0n].map((shift) => String((value >> shift) & 0xffn)).join('.');
  }
  const groups: number[] = [];
  for (let shift = 112n; shift >= 0n; shift -= 16n) groups.push(Number((value >> shift) & 0xffffn));
  // Longest run of at least two zero groups; the first wins a tie (RFC 5952 4.2.3).
  let bestStart = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (bestStart < 0) return hex.join(':');
  return `${hex.slice(0, bestStart).join(':')}::${hex.slice(bestStart + bestLen).join(':')}`;
}

/**
 * Parses a CIDR block for virtual IPs. Throws KNIT_ERR_CONFIG, naming the
 * problem, when the text is not `address/prefix`, the address is not IPv4 or
 * IPv6, the prefix is out of bounds, host bits are set (`240.240.1.0/16`:
 * probably a typo, so it is refused rather than silently widened), or the
 * block has no usable address once network and broadcast are left out (IPv4
 * /31 and /32, IPv6 /127 and /128).
 */
export function parseRange(cidr: string): VipRange {
  const fail = (why: string): never => {
    throw new KnitError('KNIT_ERR_CONFIG', `VIP range ${JSON.stringify(cidr)}: ${why}`);
  };
  const parts = cidr.trim().split('/');
  if (parts.length !== 2 || !parts[0] || !parts[1]) return fail('expected address/prefix, e.g. 240.240.0.0/16');
  const ip = parseIp(parts[0]);
  if (!ip) return fail(`${parts[0]} is not an IPv4 or IPv6 address`);
  const bits = BITS[ip.family];
  if (!/^\d{1,3}$/.test(parts[1])) return fail(`prefix ${parts[1]} is not a number`);
  const prefix = Number(parts[1]);
  if (prefix > bits) return fail(`prefix /${prefix} is longer than ${bits} bits`);
  const size = 1n << BigInt(bits - prefix);
  const network = ip.value & ~(size - 1n) & ((1n << BigInt(bits)) - 1n);
  if (network !== ip.value) {
    return fail(`host bits are set; the network of /${prefix} is ${formatIp(ip.family, network)}/${prefix}`);
  }
  if (size < 4n) return fail(`/${prefix} has no usable address once the network and broadcast addresses are left out`);
  return { cidr: `${formatIp(ip.family, network)}/${prefix}`, family: ip.family, prefix, network, size, usable: size - 2n };
}

/** True when `ip` is an address of `range` (network and broadcast included). */
export function inRange(range: VipRange, ip: string): boolean {
  const p = parseIp(ip);
  return p !== undefined && p.family === range.family && p.value >= range.network && p.value < range.network + range.size;
}

/** The first-choice slot of a service: sha256 of its name, modulo the usable addresses. */
export function homeSlot(name: string, range: VipRange): bigint {
  const digest = createHash('sha256').update(name, 'utf8').digest('hex');
  return BigInt(`0x${digest}`) % range.usable;
}

/** The address of usable slot `slot` (0-based; slot 0 is the address after the network address). */
function slotAddress(range: VipRange, slot: bigint): string {
  return formatIp(range.family, range.network + 1n + slot);
}

/**
 * Assigns virtual IPs: returns a new table holding every entry of `current`
 * unchanged plus one address for each name in `names` that `current` lacks.
 *
 * - Sticky: an entry of `current` is never moved, even when its address lies
 *   outside `range` (the range was changed later); it keeps its address.
 *   Entries are only dropped by the control plane deleting them from the
 *   table it passes in, which is how it retires a service's address.
 * - A new name gets usable slot `sha256(name) mod usable` (see homeSlot),
 *   or the next free one after it, wrapping around; the network and
 *   broadcast addresses are never used.
 * - New names are assigned in sorted order, so the result does not depend
 *   on the order of `names` even when two new names collide.
 *
 * Throws KNIT_ERR_CONFIG, and assigns nothing, when the range has too few
 * free addresses for the new names, when `current` holds something that is
 * not an IP address, or when two entries of `current` share an address (a
 * corrupt table: the address would route to two services).
 */
export function assignVips(current: ReadonlyMap<string, string>, names: Iterable<string>, range: VipRange): Map<string, string> {
  const taken = new Set<bigint>();
  const owner = new Map<string, string>();
  for (const [name, address] of current) {
    const ip = parseIp(address);
    if (!ip) throw new KnitError('KNIT_ERR_CONFIG', `VIP table: ${name} has ${JSON.stringify(address)}, which is not an IP address`);
    const key = `${ip.family}/${ip.value}`;
    const other = owner.get(key);
    if (other !== undefined) {
      throw new KnitError('KNIT_ERR_CONFIG', `VIP table: ${other} and ${name} both have ${address}; one of them must be removed from the table`);
    }
    owner.set(key, name);
    if (inRange(range, address)) taken.add(ip.value - range.network - 1n);
  }
  const fresh = [...new Set(names)].filter((n) => !current.has(n)).sort();
  for (const n of fresh) {
    if (n === '') throw new KnitError('KNIT_ERR_CONFIG', 'VIP table: a service name is empty');
  }
  // The network and broadcast addresses can only be taken by a hand-edited table; they are not slots.
  const takenSlots = [...taken].filter((s) => s >= 0n && s < range.usable).length;
  const free = range.usable - BigInt(takenSlots);
  if (BigInt(fresh.length) > free) {
    throw new KnitError(
      'KNIT_ERR_CONFIG',
      `VIP range ${range.cidr} is full: ${free} free of ${range.usable} usable addresses for ${fresh.length} new services; widen the range or remove retired services from the table`,
    );
  }
  const out = new Map(current);
  for (const n of fresh) {
    let slot = homeSlot(n, range);
    // Terminates: at least one slot is free (checked above).
    while (taken.has(slot)) slot = (slot + 1n) % range.usable;
    taken.add(slot);
    out.set(n, slotAddress(range, slot));
  }
  return out;
}

/** Inverts a VIP table to address -> service, for reverse (PTR) lookups; addresses are canonicalized. */
export function invertVips(table: ReadonlyMap<string, string>): Map<string, string> {
  const out = new Map<string, string>();
  for (const [name, address] of table) {
    const ip = parseIp(address);
    if (ip) out.set(formatIp(ip.family, ip.value), name);
  }
  return out;
}
