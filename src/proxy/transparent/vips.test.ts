/**
 * Virtual IP assignment: range parsing and its errors, stickiness,
 * determinism, collisions, a full range, and independence from the order
 * names arrive in. Everything is pure, so the checks are exhaustive over
 * small ranges where that is cheap.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isKnitError } from '../../errors.js';
import { assignVips, DEFAULT_VIP_RANGE, formatIp, homeSlot, inRange, invertVips, parseIp, parseRange, type VipRange } from './vips.js';

const ipValue = (ip: string): bigint => {
  const p = parseIp(ip);
  assert.ok(p, `${ip} parses`);
  return p.value;
};

/** Names with distinct home slots in `range`, so that no probing happens among them. */
function noCollisions(range: VipRange, count: number): string[] {
  const seen = new Set<bigint>();
  const out: string[] = [];
  for (let i = 0; out.length < count; i++) {
    const n = `svc-${i}`;
    const slot = homeSlot(n, range);
    if (seen.has(slot)) continue;
    seen.add(slot);
    out.push(n);
  }
  return out;
}

/** Two names sharing a home slot in `range`. */
function collidingPair(range: VipRange): [string, string] {
  const bySlot = new Map<bigint, string>();
  for (let i = 0; ; i++) {
    const n = `svc-${i}`;
    const slot = homeSlot(n, range);
    const other = bySlot.get(slot);
    if (other !== undefined) return [other, n];
    bySlot.set(slot, n);
  }
}

test('parseRange: the default range and its bounds', () => {
  const r = parseRange(DEFAULT_VIP_RANGE);
  assert.equal(r.cidr, '240.240.0.0/16');
  assert.equal(r.family, 4);
  assert.equal(r.prefix, 16);
  assert.equal(r.size, 65536n);
  assert.equal(r.usable, 65534n);
  assert.equal(r.network, ipValue('240.240.0.0'));
  assert.ok(inRange(r, '240.240.0.0') && inRange(r, '240.240.255.255') && inRange(r, '240.240.3.4'));
  assert.ok(!inRange(r, '240.241.0.0') && !inRange(r, '240.239.255.255') && !inRange(r, '::1') && !inRange(r, 'nope'));
});

test('parseRange: IPv6 ranges, canonicalized', () => {
  const r = parseRange('FD00:6B6E:0:0::/96');
  assert.equal(r.cidr, 'fd00:6b6e::/96');
  assert.equal(r.family, 6);
  assert.equal(r.size, 1n << 32n);
  assert.equal(r.usable, (1n << 32n) - 2n);
  assert.ok(inRange(r, 'fd00:6b6e::1:2'));
  assert.ok(!inRange(r, 'fd00:6b6f::1'));
  assert.equal(parseRange('fd00::/8').cidr, 'fd00::/8');
  assert.equal(parseRange('::/0').usable, (1n << 128n) - 2n);
});

test('parseRange: every kind of bad input is refused with KNIT_ERR_CONFIG naming the problem', () => {
  const cases: Array<[string, RegExp]> = [
    ['240.240.0.0', /expected address\/prefix/],
    ['240.240.0.0/', /expected address\/prefix/],
    ['/16', /expected address\/prefix/],
    ['240.240.0.0/16/2', /expected address\/prefix/],
    ['240.240.0/16', /not an IPv4 or IPv6 address/],
    ['mesh.local/16', /not an IPv4 or IPv6 address/],
    ['fe80::1%eth0/64', /not an IPv4 or IPv6 address/],
    ['240.240.0.0/x', /not a number/],
    ['240.240.0.0/-1', /not a number/],
    ['240.240.0.0/33', /longer than 32 bits/],
    ['fd00::/129', /longer than 128 bits/],
    ['240.240.1.0/16', /host bits are set; the network of \/16 is 240\.240\.0\.0\/16/],
    ['fd00::1/64', /host bits are set; the network of \/64 is fd00::\/64/],
    ['10.0.0.0/31', /no usable address/],
    ['10.0.0.0/32', /no usable address/],
    ['fd00::/127', /no usable address/],
  ];
  for (const [cidr, message] of cases) {
    assert.throws(
      () => parseRange(cidr),
      (e: unknown) => isKnitError(e, 'KNIT_ERR_CONFIG') && message.test(e.message) && e.message.includes(JSON.stringify(cidr)),
      cidr,
    );
  }
  // A /30 is the smallest IPv4 block with anything left: two addresses.
  assert.equal(parseRange('10.0.0.4/30').usable, 2n);
});

test('parseIp and formatIp round-trip, with RFC 5952 compression', () => {
  const cases: Array<[string, string]> = [
    ['1.2.3.4', '1.2.3.4'],
    ['0.0.0.0', '0.0.0.0'],
    ['255.255.255.255', '255.255.255.255'],
    ['::', '::'],
    ['::1', '::1'],
    ['1::', '1::'],
    ['2001:DB8:0:0:1:0:0:1', '2001:db8::1:0:0:1'],
    ['2001:db8:0:1:1:1:1:1', '2001:db8:0:1:1:1:1:1'],
    ['0:0:1:0:0:0:1:0', '0:0:1::1:0'],
    ['::ffff:1.2.3.4', '::ffff:102:304'],
    ['fd00:0000:0000:0000:0000:0000:0000:0001', 'fd00::1'],
  ];
  for (const [input, canonical] of cases) {
    const p = parseIp(input);
    assert.ok(p, input);
    assert.equal(formatIp(p.family, p.value), canonical, input);
  }
  for (const bad of ['', '1.2.3', '1.2.3.256', '::g', 'fe80::1%lo', 'localhost']) assert.equal(parseIp(bad), undefined, bad);
});

test('assignVips: a fresh name lands on its hash slot, never on the network or broadcast address', () => {
  const r = parseRange(DEFAULT_VIP_RANGE);
  const table = assignVips(new Map(), ['api', 'web', 'db'], r);
  for (const [name, ip] of table) {
    assert.equal(ipValue(ip), r.network + 1n + homeSlot(name, r), name);
    assert.ok(inRange(r, ip));
    assert.notEqual(ip, '240.240.0.0');
    assert.notEqual(ip, '240.240.255.255');
  }
  assert.equal(table.size, 3);
});

test('assignVips: deterministic, across calls and across meshes', () => {
  const r = parseRange(DEFAULT_VIP_RANGE);
  const names = ['api', 'web', 'db', 'cache', 'queue'];
  const a = assignVips(new Map(), names, r);
  const b = assignVips(new Map(), names, parseRange('240.240.0.0/16'));
  assert.deepEqual([...a], [...b]);
  // Pinned: the hash is part of the contract (the same service gets the same address in another mesh,
  // and across knit versions). sha256('api') mod 65534 = 17401, so slot 17401 is 240.240.0.0 + 17402.
  assert.equal(a.get('api'), '240.240.67.250');
  assert.equal(a.get('web'), '240.240.47.127');
  assert.equal(assignVips(new Map(), ['api'], parseRange('fd00:6b6e::/96')).get('api'), 'fd00:6b6e::655c:d99e');
});

test('assignVips: sticky: existing entries keep their address, whatever the hash says, and are never dropped', () => {
  const r = parseRange(DEFAULT_VIP_RANGE);
  const current = new Map([
    ['api', '240.240.9.9'], // not its hash slot
    ['retired', '240.240.1.1'], // no longer among the names: kept, the control plane retires entries itself
    ['moved-range', '10.1.2.3'], // from an earlier range: kept as is
  ]);
  const next = assignVips(current, ['api', 'web'], r);
  assert.equal(next.get('api'), '240.240.9.9');
  assert.equal(next.get('retired'), '240.240.1.1');
  assert.equal(next.get('moved-range'), '10.1.2.3');
  assert.ok(next.has('web'));
  assert.equal(next.size, 4);
  // The input is not changed.
  assert.equal(current.size, 3);
  // Feeding the result back changes nothing.
  assert.deepEqual([...assignVips(next, ['api', 'web', 'retired'], r)], [...next]);
});

test('assignVips: a name whose hash slot is taken probes to the next free slot, wrapping around', () => {
  const r = parseRange('10.0.0.0/24'); // 254 slots
  const [first, second] = collidingPair(r);
  const slot = homeSlot(first, r);
  const table = assignVips(new Map(), [first, second], r);
  // Sorted order decides who keeps the home slot.
  const [winner, loser] = [first, second].sort() as [string, string];
  assert.equal(ipValue(table.get(winner) ?? ''), r.network + 1n + slot);
  assert.equal(ipValue(table.get(loser) ?? ''), r.network + 1n + ((slot + 1n) % r.usable));

  // A slot taken by an existing entry is skipped too, and several in a row.
  const target = 'api';
  const home = homeSlot(target, r);
  const current = new Map<string, string>();
  for (let i = 0n; i < 3n; i++) current.set(`old-${i}`, formatIp(4, r.network + 1n + ((home + i) % r.usable)));
  const t2 = assignVips(current, [target], r);
  assert.equal(ipValue(t2.get(target) ?? ''), r.network + 1n + ((home + 3n) % r.usable));

  // Wrap-around: the last slot taken sends the next name to slot 0, the first usable address.
  const tiny = parseRange('10.0.0.0/29'); // 6 slots: .1 to .6
  const atEnd = noCollisions(tiny, 6).find((n) => homeSlot(n, tiny) === tiny.usable - 1n);
  assert.ok(atEnd);
  const occupied = new Map([['x', '10.0.0.6']]);
  assert.equal(assignVips(occupied, [atEnd], tiny).get(atEnd), '10.0.0.1');
});

test('assignVips: order independence, for a fresh table with and without collisions', () => {
  const r = parseRange('10.0.0.0/26'); // 62 slots: a dozen names collide often enough
  const names = Array.from({ length: 40 }, (_, i) => `svc-${i}`);
  const reference = assignVips(new Map(), names, r);
  const sortedEntries = (m: Map<string, string>): string[] => [...m].map(([k, v]) => `${k}=${v}`).sort();
  let rng = 12345;
  const shuffle = <T>(xs: T[]): T[] => {
    const out = [...xs];
    for (let i = out.length - 1; i > 0; i--) {
      rng = (rng * 1103515245 + 12345) % 2 ** 31;
      const j = rng % (i + 1);
      [out[i], out[j]] = [out[j] as T, out[i] as T];
    }
    return out;
  };
  for (let k = 0; k < 20; k++) assert.deepEqual(sortedEntries(assignVips(new Map(), shuffle(names), r)), sortedEntries(reference));
  // Without collisions every name simply sits on its hash slot.
  const free = noCollisions(parseRange(DEFAULT_VIP_RANGE), 50);
  const big = parseRange(DEFAULT_VIP_RANGE);
  for (const [n, ip] of assignVips(new Map(), shuffle(free), big)) assert.equal(ipValue(ip), big.network + 1n + homeSlot(n, big));
  // Duplicates in the input are one name.
  assert.equal(assignVips(new Map(), ['a', 'a', 'b'], r).size, 2);
});

test('assignVips: all addresses distinct, exhaustively over a small range filled name by name', () => {
  const r = parseRange('10.0.0.0/28'); // 14 slots
  let table = new Map<string, string>();
  for (let i = 0; i < 14; i++) {
    table = assignVips(table, [`s${i}`], r);
    const addresses = [...table.values()];
    assert.equal(new Set(addresses).size, addresses.length);
    for (const ip of addresses) {
      assert.ok(inRange(r, ip));
      assert.notEqual(ip, '10.0.0.0');
      assert.notEqual(ip, '10.0.0.15');
    }
  }
  assert.equal(table.size, 14);
});

test('assignVips: a full range is refused with a clear error, and nothing is assigned', () => {
  const r = parseRange('10.0.0.0/29'); // 6 slots
  const six = Array.from({ length: 6 }, (_, i) => `s${i}`);
  const full = assignVips(new Map(), six, r);
  assert.equal(full.size, 6);
  assert.throws(
    () => assignVips(full, ['one-more'], r),
    (e: unknown) => isKnitError(e, 'KNIT_ERR_CONFIG') && /10\.0\.0\.0\/29 is full: 0 free of 6 usable addresses for 1 new services/.test(e.message),
  );
  assert.throws(() => assignVips(new Map(), [...six, 'seventh'], r), /is full: 6 free of 6 usable addresses for 7 new services/);
  // Already-assigned names need no room.
  assert.equal(assignVips(full, six, r).size, 6);
  // Entries outside the range (or on the network/broadcast address, from a hand-edited table) take no slot.
  const outside = new Map([['a', '192.168.0.1'], ['b', '10.0.0.0'], ['c', '10.0.0.7']]);
  assert.equal(assignVips(outside, six, r).size, 9);
});

test('assignVips: a corrupt table is refused rather than routing one address to two services', () => {
  const r = parseRange(DEFAULT_VIP_RANGE);
  assert.throws(
    () => assignVips(new Map([['a', '240.240.0.5'], ['b', '240.240.0.5']]), ['c'], r),
    (e: unknown) => isKnitError(e, 'KNIT_ERR_CONFIG') && /a and b both have 240\.240\.0\.5/.test(e.message),
  );
  // The same address spelled two ways is the same address.
  assert.throws(() => assignVips(new Map([['a', 'fd00::5'], ['b', 'FD00:0::5']]), [], parseRange('fd00::/64')), /both have/);
  assert.throws(() => assignVips(new Map([['a', 'not-an-ip']]), [], r), /a has "not-an-ip", which is not an IP address/);
  assert.throws(() => assignVips(new Map(), [''], r), /empty/);
});

test('assignVips: IPv6 ranges', () => {
  const r = parseRange('fd00:6b6e::/96');
  const table = assignVips(new Map(), ['api', 'web'], r);
  for (const [n, ip] of table) {
    assert.ok(inRange(r, ip), ip);
    assert.equal(ipValue(ip), r.network + 1n + homeSlot(n, r));
    assert.equal(formatIp(6, ipValue(ip)), ip, 'canonical text');
  }
});

test('invertVips: address to service, canonical addresses', () => {
  const inv = invertVips(new Map([['api', '240.240.0.7'], ['v6', 'FD00::0:7'], ['bad', 'x']]));
  assert.equal(inv.get('240.240.0.7'), 'api');
  assert.equal(inv.get('fd00::7'), 'v6');
  assert.equal(inv.size, 2);
});
