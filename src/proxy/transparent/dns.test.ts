/**
 * The mesh DNS server against real sockets: clients made with dns-packet
 * over UDP and TCP, Node's own resolver, and dig when it is installed; a
 * fake upstream DNS server on 127.0.0.1 that the server forwards to. Every
 * server listens on port 0; nothing waits a fixed time (absence of a reply
 * is shown by a later reply on the same socket arriving first).
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import dgram from 'node:dgram';
import net from 'node:net';
import dns from 'node:dns';
import { once } from 'node:events';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import dnsPacket from 'dns-packet';
import type { Answer, DecodedPacket, Packet, RecordType } from 'dns-packet';
import {
  MeshDns,
  classifyName,
  parseResolvConf,
  readResolvConf,
  upstreamsFromResolvConf,
  MESH_TTL_SECONDS,
  nodeDialer,
  type DnsUpstream,
  type UpstreamDialer,
  type MeshDnsOptions,
  type QueryEvent,
} from './dns.js';
import { parseRange } from './vips.js';
import { isKnitError } from '../../errors.js';

type Reply = DecodedPacket & { rcode: string };

const VIPS = new Map([
  ['api', '240.240.0.7'],
  ['web', '240.240.0.8'],
  ['v6only', 'fd00:6b6e::9'],
]);
const REVERSE = new Map([...VIPS].map(([k, v]) => [v, k]));
/** A documentation address (RFC 5737): what the fake upstream answers for outside names. */
const OUTSIDE_IP = '192.0.2.1';
const CLIENT_TIMEOUT_MS = 5000;
/** The reverse name of fd00:6b6e::9: 32 nibbles, lowest first. */
const V6_PTR = '9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.e.6.b.6.0.0.d.f.ip6.arpa';

// --- clients ------------------------------------------------------------------

const q = (name: string, type: RecordType = 'A', id = 0x4b4e, extra: Partial<Packet> = {}): Packet => ({
  type: 'query',
  id,
  flags: dnsPacket.RECURSION_DESIRED,
  questions: [{ name, type, class: 'IN' }],
  ...extra,
});

/** A UDP client socket that collects every reply; `next(id)` waits for the reply with that id. */
async function udpClient(t: TestContext): Promise<{ send: (b: Buffer, port: number) => void; next: (id: number) => Promise<Reply>; received: Buffer[] }> {
  const sock = dgram.createSocket('udp4');
  sock.bind(0, '127.0.0.1');
  await once(sock, 'listening');
  t.after(() => sock.close());
  const received: Buffer[] = [];
  const waiters: Array<{ id: number; resolve: (r: Reply) => void }> = [];
  sock.on('message', (m) => {
    received.push(m);
    const id = m.length >= 2 ? m.readUInt16BE(0) : -1;
    const i = waiters.findIndex((w) => w.id === id);
    if (i >= 0) waiters.splice(i, 1)[0]?.resolve(dnsPacket.decode(m) as Reply);
  });
  return {
    received,
    send: (b, port) => sock.send(b, port, '127.0.0.1'),
    next: (id) =>
      new Promise<Reply>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no UDP reply with id ${id} within ${CLIENT_TIMEOUT_MS} ms`)), CLIENT_TIMEOUT_MS);
        waiters.push({ id, resolve: (r) => (clearTimeout(timer), resolve(r)) });
      }),
  };
}

async function udpQuery(t: TestContext, port: number, packet: Packet): Promise<Reply> {
  const c = await udpClient(t);
  c.send(dnsPacket.encode(packet), port);
  return c.next(packet.id ?? 0);
}

/** Reads length-prefixed messages off a TCP socket. */
function tcpReader(sock: net.Socket): { next: () => Promise<Buffer> } {
  let pending = Buffer.alloc(0);
  const frames: Buffer[] = [];
  const waiters: Array<(b: Buffer) => void> = [];
  sock.on('data', (chunk: Buffer) => {
    pending = Buffer.concat([pending, chunk]);
    while (pending.length >= 2 && pending.length >= 2 + pending.readUInt16BE(0)) {
      const len = pending.readUInt16BE(0);
      const frame = pending.subarray(2, 2 + len);
      pending = pending.subarray(2 + len);
      const w = waiters.shift();
      if (w) w(frame);
      else frames.push(frame);
    }
  });
  return {
    next: () =>
      new Promise<Buffer>((resolve, reject) => {
        const f = frames.shift();
        if (f) return resolve(f);
        const timer = setTimeout(() => reject(new Error(`no TCP reply within ${CLIENT_TIMEOUT_MS} ms`)), CLIENT_TIMEOUT_MS);
        waiters.push((b) => (clearTimeout(timer), resolve(b)));
      }),
  };
}

async function tcpConnect(t: TestContext, port: number): Promise<{ sock: net.Socket; next: () => Promise<Reply> }> {
  const sock = net.connect(port, '127.0.0.1');
  await once(sock, 'connect');
  t.after(() => sock.destroy());
  const reader = tcpReader(sock);
  return { sock, next: async () => dnsPacket.decode(await reader.next()) as Reply };
}

async function tcpQuery(t: TestContext, port: number, packet: Packet): Promise<Reply> {
  const c = await tcpConnect(t, port);
  c.sock.write(dnsPacket.streamEncode(packet));
  return c.next();
}

/** A record's data, whatever its type (dns-packet's OPT record has none). */
const rdata = (a: Answer | undefined): unknown => (a && 'data' in a ? a.data : undefined);
const addresses = (r: Reply): string[] => (r.answers ?? []).filter((a) => a.type === 'A' || a.type === 'AAAA').map((a) => String(rdata(a)));

// --- fake upstream --------------------------------------------------------------

interface FakeUpstream extends DnsUpstream {
  seen: Array<{ transport: 'udp' | 'tcp'; id: number; name: string }>;
}

/**
 * A DNS server on 127.0.0.1, UDP and TCP on one port. `answer` says what to
 * reply (id and question are filled in) or undefined to stay silent.
 */
async function fakeUpstream(t: TestContext, answer: (query: DecodedPacket, transport: 'udp' | 'tcp') => Packet | undefined): Promise<FakeUpstream> {
  const seen: FakeUpstream['seen'] = [];
  const reply = (query: DecodedPacket, transport: 'udp' | 'tcp'): Buffer | undefined => {
    seen.push({ transport, id: query.id ?? 0, name: query.questions?.[0]?.name ?? '' });
    const a = answer(query, transport);
    if (!a) return undefined;
    return dnsPacket.encode({ type: 'response', id: query.id, questions: query.questions, ...a });
  };
  for (;;) {
    const udp = dgram.createSocket('udp4');
    udp.bind(0, '127.0.0.1');
    await once(udp, 'listening');
    const port = udp.address().port;
    const conns = new Set<net.Socket>();
    const tcp = net.createServer((s) => {
      conns.add(s);
      s.on('close', () => conns.delete(s));
      const r = tcpReader(s);
      s.on('error', () => undefined);
      void (async () => {
        for (;;) {
          const frame = await r.next().catch(() => undefined);
          if (!frame) return;
          const out = reply(dnsPacket.decode(frame), 'tcp');
          if (out) s.write(dnsPacket.streamEncode(dnsPacket.decode(out)));
        }
      })();
    });
    tcp.listen(port, '127.0.0.1');
    try {
      await once(tcp, 'listening');
    } catch {
      udp.close(); // the port UDP got is taken for TCP: pick another
      continue;
    }
    udp.on('message', (m, rinfo) => {
      const out = reply(dnsPacket.decode(m), 'udp');
      if (out) udp.send(out, rinfo.port, rinfo.address);
    });
    t.after(async () => {
      udp.close();
      for (const s of conns) s.destroy();
      await new Promise((resolve) => tcp.close(resolve));
    });
    return { address: '127.0.0.1', port, seen };
  }
}

/** Answers every A query with OUTSIDE_IP. */
const answersOutside = (query: DecodedPacket): Packet => ({
  flags: dnsPacket.RECURSION_AVAILABLE,
  answers: [{ name: query.questions?.[0]?.name ?? '', type: 'A', ttl: 60, data: OUTSIDE_IP }],
});

/** A UDP socket that takes queries and never answers: a dead but reachable resolver. */
async function blackHole(t: TestContext): Promise<DnsUpstream> {
  const sock = dgram.createSocket('udp4');
  sock.bind(0, '127.0.0.1');
  await once(sock, 'listening');
  t.after(() => sock.close());
  return { address: '127.0.0.1', port: sock.address().port };
}

/** A port nothing listens on: UDP gets ICMP port unreachable. */
async function closedPort(): Promise<DnsUpstream> {
  const sock = dgram.createSocket('udp4');
  sock.bind(0, '127.0.0.1');
  await once(sock, 'listening');
  const port = sock.address().port;
  await new Promise<void>((resolve) => sock.close(() => resolve()));
  return { address: '127.0.0.1', port };
}

// --- the server -------------------------------------------------------------------

async function startDns(t: TestContext, o: Partial<MeshDnsOptions> = {}): Promise<{ server: MeshDns; port: number; events: QueryEvent[] }> {
  const events: QueryEvent[] = [];
  const server = new MeshDns({
    lookup: (s) => VIPS.get(s),
    reverse: (ip) => REVERSE.get(ip),
    vipRange: parseRange('240.240.0.0/16'),
    upstreams: [],
    port: 0,
    timeoutMs: 1000,
    attempts: 1,
    onQuery: (e) => events.push(e),
    ...o,
  });
  const port = await server.start();
  t.after(() => server.close());
  return { server, port, events };
}

// --- names and resolv.conf (pure) ---------------------------------------------------

test('classifyName: mesh, Consul, reverse and outside names', () => {
  const zones = { mesh: 'knit', consul: 'consul' };
  const cases: Array<[string, unknown]> = [
    ['api.knit', { kind: 'service', zone: 'knit', service: 'api' }],
    ['API.Knit.', { kind: 'service', zone: 'knit', service: 'api' }],
    ['knit', { kind: 'apex', zone: 'knit' }],
    ['a.b.knit', { kind: 'unknown', zone: 'knit' }],
    ['api.service.consul', { kind: 'service', zone: 'consul', service: 'api' }],
    ['v1.api.service.consul', { kind: 'service', zone: 'consul', service: 'api', tag: 'v1' }],
    ['api.service.dc1.consul', { kind: 'service', zone: 'consul', service: 'api', datacenter: 'dc1' }],
    ['v1.api.service.dc1.consul', { kind: 'service', zone: 'consul', service: 'api', tag: 'v1', datacenter: 'dc1' }],
    ['service.consul', { kind: 'unknown', zone: 'consul' }],
    ['x.y.api.service.consul', { kind: 'unknown', zone: 'consul' }],
    ['node1.node.consul', { kind: 'unknown', zone: 'consul' }],
    ['consul', { kind: 'apex', zone: 'consul' }],
    ['7.0.240.240.in-addr.arpa', { kind: 'reverse', ip: '240.240.0.7' }],
    ['300.0.240.240.in-addr.arpa', { kind: 'outside' }],
    ['240.240.in-addr.arpa', { kind: 'outside' }],
    [V6_PTR, { kind: 'reverse', ip: 'fd00:6b6e::9' }],
    ['example.com', { kind: 'outside' }],
    ['knit.example.com', { kind: 'outside' }],
    ['notknit', { kind: 'outside' }],
    ['.', { kind: 'outside' }],
  ];
  for (const [name, want] of cases) assert.deepEqual(classifyName(name, zones), want, name);
  // Consul names can be left to the upstreams.
  assert.deepEqual(classifyName('api.service.consul', { mesh: 'knit', consul: undefined }), { kind: 'outside' });
  // Another mesh domain, several labels long.
  assert.deepEqual(classifyName('api.mesh.internal', { mesh: 'mesh.internal', consul: undefined }), { kind: 'service', zone: 'mesh.internal', service: 'api' });
});

test('parseResolvConf: nameservers, search, options, comments', () => {
  const conf = parseResolvConf(
    [
      '# generated by NetworkManager',
      'domain corp.example',
      'search a.example b.example ; trailing comment',
      'nameserver 10.0.0.2',
      'nameserver fe80::1%eth0',
      'nameserver not-an-ip',
      'nameserver 10.0.0.3 # comment',
      'nameserver 10.0.0.4',
      'options ndots:5 timeout:3 attempts:4 rotate edns0 unknown:7',
      'sortlist 130.155.160.0/255.255.240.0',
      '',
    ].join('\n'),
  );
  assert.deepEqual(conf, {
    nameservers: ['10.0.0.2', 'fe80::1%eth0', '10.0.0.3'], // three at most, as glibc
    search: ['a.example', 'b.example'],
    timeoutMs: 3000,
    attempts: 4,
    rotate: true,
    ndots: 5,
  });
  assert.deepEqual(upstreamsFromResolvConf(conf), [
    { address: '10.0.0.2', port: 53 },
    { address: 'fe80::1%eth0', port: 53 },
    { address: '10.0.0.3', port: 53 },
  ]);
  // Defaults, caps, and the last of search/domain winning.
  assert.deepEqual(parseResolvConf('search x.example\ndomain y.example\noptions timeout:99 attempts:0'), {
    nameservers: [],
    search: ['y.example'],
    timeoutMs: 30000,
    attempts: 1,
    rotate: false,
    ndots: 1,
  });
  assert.deepEqual(parseResolvConf('nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .').nameservers, ['127.0.0.53']);
});

test('readResolvConf: injectable path and reader; a missing file is no upstreams', async () => {
  const conf = await readResolvConf('/etc/fake-resolv.conf', async (p) => {
    assert.equal(p, '/etc/fake-resolv.conf');
    return 'nameserver 192.0.2.53\n';
  });
  assert.deepEqual(conf.nameservers, ['192.0.2.53']);
  const missing = await readResolvConf('/nonexistent/resolv.conf');
  assert.deepEqual(missing.nameservers, []);
  await assert.rejects(
    readResolvConf('/x', async () => {
      throw Object.assign(new Error('permission denied'), { code: 'EACCES' });
    }),
    (e: unknown) => isKnitError(e, 'KNIT_ERR_CONFIG') && /\/x: permission denied/.test(e.message),
  );
});

// --- mesh answers ---------------------------------------------------------------

test('mesh names resolve to the VIP over UDP and TCP, for .knit and Consul names', async (t) => {
  const { port, server } = await startDns(t);
  for (const name of ['api.knit', 'API.KNIT', 'api.service.consul', 'v1.api.service.consul', 'api.service.dc1.consul', 'v1.api.service.dc1.consul']) {
    for (const [transport, ask] of [['udp', udpQuery], ['tcp', tcpQuery]] as const) {
      const r = await ask(t, port, q(name, 'A', 0x1234));
      assert.equal(r.id, 0x1234, `${name} over ${transport}: the client's id`);
      assert.equal(r.rcode, 'NOERROR', `${name} over ${transport}`);
      assert.ok(r.flag_aa, 'authoritative');
      assert.ok(r.flag_rd && r.flag_ra);
      assert.deepEqual(addresses(r), ['240.240.0.7'], `${name} over ${transport}`);
      assert.equal(r.answers?.[0]?.name, name, 'the name as asked (0x20 case randomization relies on it)');
      assert.equal((r.answers?.[0] as { ttl?: number }).ttl, MESH_TTL_SECONDS);
    }
  }
  assert.equal(server.stats.mesh, 12);
  assert.equal(server.stats.forwarded, 0);
});

test('AAAA for a v4-only VIP is NOERROR with no records (and the SOA for negative caching); a v6 VIP answers AAAA only', async (t) => {
  const { port } = await startDns(t);
  const r = await udpQuery(t, port, q('api.knit', 'AAAA'));
  assert.equal(r.rcode, 'NOERROR');
  assert.deepEqual(r.answers, []);
  assert.equal(r.authorities?.[0]?.type, 'SOA');
  assert.equal((rdata(r.authorities?.[0]) as { minimum: number }).minimum, MESH_TTL_SECONDS);

  const v6 = await udpQuery(t, port, q('v6only.knit', 'AAAA'));
  assert.deepEqual(addresses(v6), ['fd00:6b6e::9']);
  const v6a = await udpQuery(t, port, q('v6only.knit', 'A'));
  assert.equal(v6a.rcode, 'NOERROR');
  assert.deepEqual(v6a.answers, []);

  // Other types on a service name: NODATA, not NXDOMAIN (the name exists).
  const mx = await udpQuery(t, port, q('api.knit', 'MX'));
  assert.equal(mx.rcode, 'NOERROR');
  assert.deepEqual(mx.answers, []);
  // The zone apex exists and has an SOA.
  const soa = await tcpQuery(t, port, q('knit', 'SOA'));
  assert.equal(soa.rcode, 'NOERROR');
  assert.equal(soa.answers?.[0]?.type, 'SOA');
});

test('a mesh name that is no service is NXDOMAIN, authoritative, and never forwarded', async (t) => {
  const upstream = await fakeUpstream(t, answersOutside);
  const { port, server, events } = await startDns(t, { upstreams: [upstream] });
  for (const name of ['nope.knit', 'a.b.knit', 'nope.service.consul', 'node1.node.consul']) {
    const r = await udpQuery(t, port, q(name));
    assert.equal(r.rcode, 'NXDOMAIN', name);
    assert.ok(r.flag_aa, name);
    assert.deepEqual(r.answers, []);
    assert.equal(r.authorities?.[0]?.type, 'SOA', `${name}: SOA for negative caching`);
  }
  assert.equal(server.stats.nxdomain, 4);
  assert.equal(upstream.seen.length, 0);
  assert.deepEqual(
    events.map((e) => [e.kind, e.name]),
    [['nxdomain', 'nope.knit'], ['nxdomain', 'a.b.knit'], ['nxdomain', 'nope.service.consul'], ['nxdomain', 'node1.node.consul']],
  );
});

test('reverse PTR: a VIP names its service; an unused VIP is NXDOMAIN; other addresses are forwarded', async (t) => {
  const upstream = await fakeUpstream(t, (query) => ({
    answers: [{ name: query.questions?.[0]?.name ?? '', type: 'PTR', ttl: 60, data: 'host.example' }],
  }));
  const { port } = await startDns(t, { upstreams: [upstream] });
  const r = await udpQuery(t, port, q('7.0.240.240.in-addr.arpa', 'PTR'));
  assert.equal(r.rcode, 'NOERROR');
  assert.deepEqual(r.answers?.map((a) => [a.type, rdata(a)]), [['PTR', 'api.knit']]);

  const v6 = await udpQuery(t, port, q(V6_PTR, 'PTR'));
  assert.deepEqual(v6.answers?.map(rdata), ['v6only.knit']);

  const unused = await udpQuery(t, port, q('99.0.240.240.in-addr.arpa', 'PTR'));
  assert.equal(unused.rcode, 'NXDOMAIN');
  assert.ok(unused.flag_aa);

  const outside = await udpQuery(t, port, q('1.2.0.192.in-addr.arpa', 'PTR'));
  assert.deepEqual(outside.answers?.map(rdata), ['host.example']);
  assert.deepEqual(upstream.seen.map((s) => s.name), ['1.2.0.192.in-addr.arpa']);
});

// --- forwarding ------------------------------------------------------------------

test('other names are forwarded over UDP and TCP; the reply keeps the client id', async (t) => {
  const upstream = await fakeUpstream(t, answersOutside);
  const { port, server, events } = await startDns(t, { upstreams: [upstream] });
  const r = await udpQuery(t, port, q('www.example.com', 'A', 0xbeef));
  assert.equal(r.id, 0xbeef);
  assert.equal(r.rcode, 'NOERROR');
  assert.deepEqual(addresses(r), [OUTSIDE_IP]);
  assert.ok(!r.flag_aa, 'not authoritative for what it relays');
  const rt = await tcpQuery(t, port, q('www.example.com', 'A', 0xcafe));
  assert.equal(rt.id, 0xcafe);
  assert.deepEqual(addresses(rt), [OUTSIDE_IP]);
  // A TCP client's query goes upstream over UDP first, like a UDP client's.
  assert.deepEqual(upstream.seen.map((s) => s.transport), ['udp', 'udp']);
  assert.equal(server.stats.forwarded, 2);
  const forwarded = events.filter((e) => e.kind === 'forwarded');
  assert.deepEqual(forwarded.map((e) => [e.transport, e.upstream?.port]), [['udp', upstream.port], ['tcp', upstream.port]]);
  // Consul names go upstream when the Consul zone is not served here.
  const { port: p2 } = await startDns(t, { upstreams: [upstream], consulDomain: false });
  assert.deepEqual(addresses(await udpQuery(t, p2, q('api.service.consul'))), [OUTSIDE_IP]);
});

test('an upstream answer truncated over UDP is fetched again over TCP, through the injected dialer', async (t) => {
  const upstream = await fakeUpstream(t, (query, transport) =>
    transport === 'udp'
      ? { flags: dnsPacket.TRUNCATED_RESPONSE, answers: [] }
      : { answers: [{ name: query.questions?.[0]?.name ?? '', type: 'A', ttl: 60, data: '192.0.2.99' }] },
  );
  const dialed: string[] = [];
  const dialer: UpstreamDialer = {
    udp: (type) => (dialed.push(type), nodeDialer.udp(type)),
    tcp: (address, p) => (dialed.push(`tcp ${address}:${p}`), nodeDialer.tcp(address, p)),
  };
  const { port } = await startDns(t, { upstreams: [upstream], dialer });
  const r = await udpQuery(t, port, q('big.example.com'));
  assert.equal(r.rcode, 'NOERROR');
  assert.ok(!r.flag_tc);
  assert.deepEqual(addresses(r), ['192.0.2.99']);
  assert.deepEqual(upstream.seen.map((s) => s.transport), ['udp', 'tcp']);
  assert.deepEqual(dialed, ['udp4', `tcp 127.0.0.1:${upstream.port}`]);
});

test('an answer too big for a UDP client comes back truncated, and whole over TCP', async (t) => {
  const many = (name: string): Answer[] => Array.from({ length: 60 }, (_, i) => ({ name, type: 'A', ttl: 60, data: `192.0.2.${i + 1}` }));
  const upstream = await fakeUpstream(t, (query, transport) =>
    transport === 'udp' ? { flags: dnsPacket.TRUNCATED_RESPONSE } : { answers: many(query.questions?.[0]?.name ?? '') },
  );
  const { port } = await startDns(t, { upstreams: [upstream] });
  const r = await udpQuery(t, port, q('many.example.com', 'A', 7));
  assert.ok(r.flag_tc, 'TC tells the client to ask again over TCP');
  assert.equal(r.id, 7);
  assert.deepEqual(r.answers, []);
  assert.equal(r.questions?.[0]?.name, 'many.example.com');
  const rt = await tcpQuery(t, port, q('many.example.com', 'A', 8));
  assert.ok(!rt.flag_tc);
  assert.equal(addresses(rt).length, 60);
  // With a large enough EDNS buffer the whole answer fits UDP.
  const edns = await udpQuery(t, port, q('many.example.com', 'A', 9, { additionals: [{ type: 'OPT', name: '.', udpPayloadSize: 4096 } as Answer] }));
  assert.ok(!edns.flag_tc);
  assert.equal(addresses(edns).length, 60);
});

test('a dead upstream (port closed) gives SERVFAIL at once; a silent one within the timeout', async (t) => {
  const closed = await closedPort();
  const { port, server, events } = await startDns(t, { upstreams: [closed], timeoutMs: 300 });
  const r = await udpQuery(t, port, q('www.example.com'));
  assert.equal(r.rcode, 'SERVFAIL');
  assert.equal(events.at(-1)?.reason, `127.0.0.1:${closed.port} over udp: econnrefused`);

  const silent = await blackHole(t);
  const timeoutMs = 300;
  const { port: p2, events: ev2 } = await startDns(t, { upstreams: [silent], timeoutMs, attempts: 2 });
  const started = Date.now();
  const r2 = await tcpQuery(t, p2, q('www.example.com'));
  const elapsed = Date.now() - started;
  assert.equal(r2.rcode, 'SERVFAIL');
  assert.ok(elapsed >= timeoutMs * 2 - 50, `waited for both attempts (${elapsed} ms)`);
  assert.ok(elapsed < timeoutMs * 2 + 1500, `and not much longer (${elapsed} ms)`);
  assert.match(ev2.at(-1)?.reason ?? '', /over udp: timeout$/);
  assert.equal(server.stats.servfail, 1);

  // An upstream that cannot even be dialed (a bad port from a hand-written list) is a failure like the others.
  const { port: p3, events: ev3 } = await startDns(t, { upstreams: [{ address: '127.0.0.1', port: 70000 }] });
  assert.equal((await udpQuery(t, p3, q('www.example.com'))).rcode, 'SERVFAIL');
  assert.match(ev3.at(-1)?.reason ?? '', /port/);
});

test('a burst of mixed queries on one socket is answered in full', async (t) => {
  const upstream = await fakeUpstream(t, answersOutside);
  const { port, server } = await startDns(t, { upstreams: [upstream] });
  const c = await udpClient(t);
  const names = ['api.knit', 'nope.knit', 'www.example.com', 'web.service.consul'];
  const replies: Array<Promise<Reply>> = [];
  for (let id = 1; id <= 200; id++) {
    const name = names[id % names.length] ?? '';
    replies.push(c.next(id));
    c.send(dnsPacket.encode(q(name, 'A', id)), port);
  }
  const got = await Promise.all(replies);
  assert.equal(got.filter((r) => r.rcode === 'NXDOMAIN').length, 50);
  assert.equal(got.filter((r) => addresses(r)[0] === OUTSIDE_IP).length, 50);
  assert.deepEqual(server.stats, { mesh: 100, nxdomain: 50, forwarded: 50, servfail: 0, formerr: 0, notimp: 0, dropped: 0 });
});

test('a dead or failing first upstream falls back to the next', async (t) => {
  const silent = await blackHole(t);
  const failing = await fakeUpstream(t, () => ({ flags: 2 /* SERVFAIL */ }));
  const good = await fakeUpstream(t, answersOutside);
  const { port } = await startDns(t, { upstreams: [silent, failing, good], timeoutMs: 200 });
  const r = await udpQuery(t, port, q('www.example.com'));
  assert.deepEqual(addresses(r), [OUTSIDE_IP]);
  assert.equal(failing.seen.length, 1);
  assert.equal(good.seen.length, 1);
  // When every upstream fails, the last real answer is relayed rather than an invented one.
  const { port: p2, server } = await startDns(t, { upstreams: [failing], timeoutMs: 200 });
  const r2 = await udpQuery(t, p2, q('www.example.com'));
  assert.equal(r2.rcode, 'SERVFAIL');
  assert.equal(server.stats.forwarded, 1);
});

test('never forwards to its own address (a loop), nor to an avoided one', async (t) => {
  const self: { server?: MeshDns } = {};
  const upstream = await fakeUpstream(t, answersOutside);
  const { server, port, events } = await startDns(t, {
    // Every listening address of the server, as a resolv.conf pointing at the agent would say.
    upstreams: () => [...(self.server?.addresses ?? [])],
  });
  self.server = server;
  const r = await udpQuery(t, port, q('www.example.com'));
  assert.equal(r.rcode, 'SERVFAIL');
  assert.equal(events.at(-1)?.reason, 'no-upstream');
  const { port: p2 } = await startDns(t, { upstreams: [upstream], avoid: [{ address: '127.0.0.1', port: upstream.port }] });
  assert.equal((await udpQuery(t, p2, q('www.example.com'))).rcode, 'SERVFAIL');
  assert.equal(upstream.seen.length, 0);
  // No upstreams at all (an empty resolv.conf): SERVFAIL, not a hang.
  const { port: p3 } = await startDns(t, { upstreams: upstreamsFromResolvConf(parseResolvConf('')) });
  assert.equal((await tcpQuery(t, p3, q('www.example.com'))).rcode, 'SERVFAIL');
});

test('past maxInflight forwarded queries get SERVFAIL instead of more upstream sockets', async (t) => {
  const silent = await blackHole(t);
  const { port, events } = await startDns(t, { upstreams: [silent], maxInflight: 1, timeoutMs: 2000 });
  const c = await udpClient(t);
  c.send(dnsPacket.encode(q('slow.example.com', 'A', 1)), port);
  c.send(dnsPacket.encode(q('second.example.com', 'A', 2)), port);
  const second = await c.next(2);
  assert.equal(second.rcode, 'SERVFAIL');
  assert.ok(events.some((e) => e.reason === 'overloaded'));
});

// --- robustness ------------------------------------------------------------------

test('garbage datagrams never crash the server: FORMERR when there is a header, silence otherwise', async (t) => {
  const { port, server } = await startDns(t);
  const c = await udpClient(t);
  const header = (id: number, flags: number, qd: number): Buffer => {
    const b = Buffer.alloc(12);
    b.writeUInt16BE(id, 0);
    b.writeUInt16BE(flags, 2);
    b.writeUInt16BE(qd, 4);
    return b;
  };
  // Deterministic "random" bytes so a failure can be replayed.
  let seed = 7;
  const junk = (n: number): Buffer => Buffer.from(Array.from({ length: n }, () => ((seed = (seed * 48271) % 0x7fffffff) & 0xff)));
  const garbage = [
    Buffer.alloc(0),
    Buffer.from([1]),
    Buffer.from('hello'),
    header(0x0101, 0, 1), // promises a question, has none
    Buffer.concat([header(0x0102, 0, 1), Buffer.from([0xc0, 0x0c, 0, 1, 0, 1])]), // a name pointing at itself
    Buffer.concat([header(0x0103, 0, 1), Buffer.from([63]), Buffer.alloc(10)]), // a label longer than the message
    header(0x0104, 0, 0), // no question
    dnsPacket.encode({ type: 'query', id: 0x0105, questions: [{ name: 'a.knit', type: 'A' }, { name: 'b.knit', type: 'A' }] }),
    dnsPacket.encode({ type: 'response', id: 0x0106, questions: [{ name: 'api.knit', type: 'A' }] }), // a response: dropped
    dnsPacket.encode({ type: 'query', id: 0x0107, flags: 2 << 11, questions: [{ name: 'api.knit', type: 'A' }] }), // opcode STATUS
    ...Array.from({ length: 50 }, (_, i) => junk(12 + i * 7)),
  ];
  for (const g of garbage) c.send(g, port);
  const good = await udpQuery(t, port, q('api.knit', 'A', 0x7777));
  assert.deepEqual(addresses(good), ['240.240.0.7']);
  // On the garbage socket too, a query sent last is answered.
  c.send(dnsPacket.encode(q('api.knit', 'A', 0x7778)), port);
  await c.next(0x7778);
  const replies = new Map(c.received.map((m) => [m.readUInt16BE(0), dnsPacket.decode(m) as Reply]));
  for (const id of [0x0101, 0x0102, 0x0103, 0x0104, 0x0105]) assert.equal(replies.get(id)?.rcode, 'FORMERR', `id ${id}`);
  assert.equal(replies.has(0x0106), false, 'a response is not answered (no ping-pong between servers)');
  assert.equal(replies.get(0x0107)?.rcode, 'NOTIMP');
  const s = server.stats;
  assert.ok(s.formerr >= 5);
  assert.ok(s.dropped >= 4, `short messages and the response were dropped: ${JSON.stringify(s)}`);
  const total = Object.values(s).reduce((a, b) => a + b, 0);
  assert.equal(total, garbage.length + 2, 'every datagram was counted once');
});

test('a throwing lookup gets SERVFAIL and the server goes on', async (t) => {
  const { port, events } = await startDns(t, {
    lookup: (s) => {
      if (s === 'boom') throw new Error('table not loaded');
      return VIPS.get(s);
    },
  });
  assert.equal((await udpQuery(t, port, q('boom.knit'))).rcode, 'SERVFAIL');
  assert.match(events.at(-1)?.reason ?? '', /table not loaded/);
  assert.deepEqual(addresses(await udpQuery(t, port, q('api.knit'))), ['240.240.0.7']);
});

test('TCP: several queries on one connection, pipelined in one write, and garbage frames between', async (t) => {
  const upstream = await fakeUpstream(t, answersOutside);
  const { port } = await startDns(t, { upstreams: [upstream] });
  const c = await tcpConnect(t, port);
  c.sock.write(
    Buffer.concat([
      dnsPacket.streamEncode(q('api.knit', 'A', 1)),
      Buffer.from([0, 3, 1, 2, 3]), // a 3-byte "message": no header, dropped
      dnsPacket.streamEncode(q('www.example.com', 'A', 2)),
      dnsPacket.streamEncode(q('web.service.consul', 'A', 3)),
    ]),
  );
  const got = new Map<number, Reply>();
  for (let i = 0; i < 3; i++) {
    const r = await c.next();
    got.set(r.id ?? -1, r);
  }
  assert.deepEqual(addresses(got.get(1) as Reply), ['240.240.0.7']);
  assert.deepEqual(addresses(got.get(2) as Reply), [OUTSIDE_IP]);
  assert.deepEqual(addresses(got.get(3) as Reply), ['240.240.0.8']);
  // A message split across writes.
  const m = dnsPacket.streamEncode(q('api.knit', 'A', 4));
  c.sock.write(m.subarray(0, 5));
  c.sock.write(m.subarray(5));
  assert.equal((await c.next()).id, 4);
});

test('TCP: a half-closed connection still gets its answers; an idle one is closed', async (t) => {
  const { port } = await startDns(t, { tcpIdleMs: 200 });
  const c = await tcpConnect(t, port);
  c.sock.end(dnsPacket.streamEncode(q('api.knit', 'A', 5)));
  assert.equal((await c.next()).id, 5);
  await once(c.sock, 'end');

  const idle = await tcpConnect(t, port);
  const closed = once(idle.sock, 'close');
  const started = Date.now();
  await closed;
  assert.ok(Date.now() - started < 3000, 'closed by the idle timeout');
});

// --- other clients ---------------------------------------------------------------

test("Node's own resolver resolves mesh names and forwarded names through it", async (t) => {
  const upstream = await fakeUpstream(t, answersOutside);
  const { port } = await startDns(t, { upstreams: [upstream] });
  const resolver = new dns.promises.Resolver({ timeout: 3000, tries: 1 });
  resolver.setServers([`127.0.0.1:${port}`]);
  assert.deepEqual(await resolver.resolve4('api.knit'), ['240.240.0.7']);
  assert.deepEqual(await resolver.resolve4('api.service.consul'), ['240.240.0.7']);
  assert.deepEqual(await resolver.resolve4('www.example.com'), [OUTSIDE_IP]);
  await assert.rejects(resolver.resolve4('nope.knit'), (e: NodeJS.ErrnoException) => e.code === 'ENOTFOUND');
  assert.deepEqual(await resolver.reverse('240.240.0.7'), ['api.knit']);
});

const dig = await promisify(execFile)('dig', ['-v']).then(
  () => true,
  () => false,
);

test('dig resolves mesh names over UDP and TCP', { skip: dig ? false : 'dig is not installed (apt-get install dnsutils); the same queries run through dns-packet above' }, async (t) => {
  const { port } = await startDns(t);
  const run = async (...args: string[]): Promise<string> =>
    (await promisify(execFile)('dig', ['@127.0.0.1', '-p', String(port), '+tries=1', '+time=3', ...args], { encoding: 'utf8' })).stdout;
  assert.equal((await run('+short', 'api.knit')).trim(), '240.240.0.7');
  assert.equal((await run('+short', '+tcp', 'api.service.consul')).trim(), '240.240.0.7');
  assert.equal((await run('+short', '-x', '240.240.0.7')).trim(), 'api.knit.');
  const full = await run('nope.knit');
  assert.match(full, /status: NXDOMAIN/);
  assert.match(full, /flags: qr aa rd ra/);
  assert.doesNotMatch(full, /WARNING|malformed/i);
});

// --- lifecycle ---------------------------------------------------------------------

test('close() frees the port (UDP and TCP), abandons forwarded queries and is idempotent', async (t) => {
  const silent = await blackHole(t);
  const events: QueryEvent[] = [];
  const server = new MeshDns({ lookup: (s) => VIPS.get(s), upstreams: [silent], port: 0, timeoutMs: 60_000, onQuery: (e) => events.push(e) });
  const port = await server.start();
  assert.equal(server.port, port);
  assert.deepEqual(server.addresses, [{ address: '127.0.0.1', port }]);
  const c = await udpClient(t);
  c.send(dnsPacket.encode(q('hang.example.com', 'A', 1)), port);
  const held = await tcpConnect(t, port);
  const heldClosed = once(held.sock, 'close');
  // Wait until the query is in flight upstream: the events list stays empty until it ends.
  await udpQuery(t, port, q('api.knit', 'A', 2));
  const started = Date.now();
  await server.close();
  await server.close();
  await heldClosed;
  assert.ok(Date.now() - started < 2000, 'close did not wait for the 60 s upstream timeout');
  assert.equal(events.find((e) => e.name === 'hang.example.com')?.reason, 'closed');
  // The same port binds again, for both transports.
  const udp = dgram.createSocket('udp4');
  udp.bind(port, '127.0.0.1');
  await once(udp, 'listening');
  udp.close();
  const tcp = net.createServer().listen(port, '127.0.0.1');
  await once(tcp, 'listening');
  await new Promise((resolve) => tcp.close(resolve));
  await assert.rejects(server.start(), (e: unknown) => isKnitError(e, 'KNIT_ERR_CLOSED'));
});

test('start() on a taken port rejects with KNIT_ERR_LISTEN naming the address', async (t) => {
  const { port } = await startDns(t);
  const other = new MeshDns({ lookup: () => undefined, upstreams: [], port });
  await assert.rejects(other.start(), (e: unknown) => isKnitError(e, 'KNIT_ERR_LISTEN') && e.message.includes(`127.0.0.1 port ${port}`));
  await other.close();
});

test('listens on ::1 too when asked (skipped where the host has no IPv6 loopback)', async (t) => {
  const probe = dgram.createSocket('udp6');
  const has6 = await new Promise<boolean>((resolve) => {
    probe.once('error', () => resolve(false));
    probe.bind(0, '::1', () => resolve(true));
  });
  probe.close();
  if (!has6) {
    t.skip('no IPv6 loopback on this host');
    return;
  }
  const { port } = await startDns(t, { hosts: ['127.0.0.1', '::1'] });
  const resolver = new dns.promises.Resolver({ timeout: 3000, tries: 1 });
  resolver.setServers([`[::1]:${port}`]);
  assert.deepEqual(await resolver.resolve4('api.knit'), ['240.240.0.7']);
});
