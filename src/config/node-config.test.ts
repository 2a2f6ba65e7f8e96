import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadAgentConfig, loadServerConfig, parseAgentConfig, parseServerConfig, nodeConfigKind } from './node-config.js';
import { ConfigError } from '../errors.js';

async function withFile(text: string, fn: (file: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'knit-cfg-'));
  try {
    const file = join(dir, 'c.yaml');
    await writeFile(file, text);
    await fn(file);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('an agent config with defaults', async () => {
  await withFile('registry: zk://10.0.0.5:2181/knit\nserver: https://cp:7700/\nnode: vm-1\n', async (file) => {
    const c = await loadAgentConfig(file);
    assert.equal(c.server, 'https://cp:7700');
    assert.equal(c.servicesDir, '/etc/knit/services.d');
    assert.equal(c.adminHost, '127.0.0.1');
    assert.equal(c.adminPort, 7701);
    assert.equal(c.hbonePort, 15008);
    assert.equal(c.drainMs, 10_000);
    assert.equal(c.allowRemoteUpstreams, false);
    assert.equal(c.adminTokenFile, undefined);
  });
  await withFile('registry: zk://10.0.0.5:2181/knit\nserver: https://cp:7700/\nadmin: 10.0.0.1:7701\nadmin_allow_remote: true\nadmin_token_file: /etc/knit/admin.token\n', async (file) => {
    const c = await loadAgentConfig(file);
    assert.deepEqual([c.adminHost, c.adminTokenFile], ['10.0.0.1', '/etc/knit/admin.token']);
  });
});

const badAgent: Array<[string, string, number | undefined, RegExp]> = [
  ['missing server', 'registry: zk://h:2181/knit\n', undefined, /missing required field "server"/],
  ['http server', 'registry: zk://h:2181/knit\nserver: http://cp:7700\n', 2, /server: must be an https:\/\/ URL/],
  ['unknown field', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nregistery: x\n', 3, /registery: unknown field "registery"/],
  ['bad registry URL', 'registry: etcd://h:1\nserver: https://cp:7700\n', 1, /registry: registry URL "etcd:\/\/h:1": expected/],
  ['embedded registry on an agent', 'registry: "embedded:"\nserver: https://cp:7700\n', 1, /an agent needs a shared registry/],
  ['bad drain', 'registry: zk://h:2181/knit\nserver: https://cp:7700\ndrain: soon\n', 3, /drain: "soon" is not a duration/],
  ['bad node name', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nnode: "vm 1"\n', 3, /node: node name "vm 1" may only contain/],
  ['admin API on a public address', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nadmin: 0.0.0.0:7701\n', 3, /admin: 0\.0\.0\.0 is not a loopback address: the admin API .* would be open to the network/],
  ['remote admin without a token', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nadmin: 10.0.0.1:7701\nadmin_allow_remote: true\n', 4, /admin_allow_remote: needs admin_token_file/],
];
for (const [what, text, line, re] of badAgent) {
  test(`agent config: ${what} is refused with file, line and field`, async () => {
    await withFile(text, async (file) => {
      await assert.rejects(loadAgentConfig(file), (e: unknown) => {
        assert.ok(e instanceof ConfigError, String(e));
        assert.match(e.message, re);
        assert.ok(e.message.startsWith(file), e.message);
        if (line !== undefined) assert.ok(e.problems.some((p) => p.line === line), JSON.stringify(e.problems));
        return true;
      });
    });
  });
}

test('server config: defaults, and bad TTLs or trust domains are refused', async () => {
  await withFile('registry: "embedded:"\n', async (file) => {
    const c = await loadServerConfig(file);
    assert.equal(c.defaultIntention, 'deny');
    assert.equal(c.listenPort, 7700);
    assert.equal(c.leafTtlMs, 24 * 3600_000);
  });
  await withFile('registry: "embedded:"\nleaf_ttl: 5s\ntrust_domain: Bad.Domain\n', async (file) => {
    await assert.rejects(loadServerConfig(file), (e: unknown) => e instanceof ConfigError && /leaf_ttl: must be at least 10000 ms/.test(e.message) && /trust_domain: .*lowercase/.test(e.message));
  });
  await assert.rejects(loadServerConfig('/nonexistent/server.yaml'), /\/nonexistent\/server\.yaml: cannot read/);
});

test('regression: a type error hid the other problems of agent.yaml (every problem is reported at once)', () => {
  const r = parseAgentConfig('agent.yaml', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nhbone_port: "15008"\nadmin: 127.0.0.1:70000\ndrain: soon\n');
  assert.equal(r.config, undefined);
  assert.deepEqual(r.problems.map((p) => [p.line, p.field]), [
    [3, 'hbone_port'],
    [5, 'drain'],
    [4, 'admin'],
  ]);
  assert.match(r.problems[0]!.message, /must be integer, not the string "15008"/);
});

const refusedAtStart: Array<['agent' | 'server', string, string, number, RegExp]> = [
  ['agent', 'admin port out of range', 'admin: 127.0.0.1:65536\n', 3, /admin: port 65536 in "127\.0\.0\.1:65536" is out of range \(0 to 65535\)/],
  ['agent', 'admin without a port', 'admin: 127.0.0.1\n', 3, /admin: "127\.0\.0\.1" is not host:port/],
  ['agent', 'HBONE port out of range', 'hbone_port: 70000\n', 3, /hbone_port: must be a port number from 0 to 65535/],
  ['agent', 'a bind address that is not an IP', 'bind: eth0\n', 3, /bind: "eth0" is not an IP address to bind/],
  ['agent', 'an advertise address with a space', 'advertise: "10.0.0.1 10.0.0.2"\n', 3, /advertise: .* neither an IP address nor a host name/],
  ['server', 'listen port out of range', 'listen: 0.0.0.0:99999\n', 2, /listen: port 99999 in "0\.0\.0\.0:99999" is out of range/],
  ['server', 'listen on a name that is not an address', 'listen: cp.example.com:7700\n', 2, /listen: "cp\.example\.com" is not an IP address to bind/],
  ['server', 'an advertise name that cannot go into a certificate', 'advertise: [cp.example.com, "bad name"]\n', 2, /advertise\[1\]: "bad name" is neither an IP address nor a DNS name/],
  ['server', 'a ZooKeeper port out of range', '', 1, /registry: registry URL "zk:\/\/h:99999\/knit": port 99999 .* out of range/],
  ['server', 'the consul registry, which is not implemented yet', '', 1, /registry: the consul:\/\/ registry is not implemented yet/],
];
for (const [kind, what, extra, line, re] of refusedAtStart) {
  test(`${kind} config: ${what} is refused (it would fail at start), with line and field`, () => {
    const registry = what.includes('ZooKeeper port') ? 'zk://h:99999/knit' : what.includes('consul') ? 'consul://127.0.0.1:8500' : kind === 'agent' ? 'zk://h:2181/knit' : '"embedded:"';
    const text = kind === 'agent' ? `registry: ${registry}\nserver: https://cp:7700\n${extra}` : `registry: ${registry}\n${extra}`;
    const r = kind === 'agent' ? parseAgentConfig('c.yaml', text) : parseServerConfig('c.yaml', text);
    assert.equal(r.config, undefined);
    const p = r.problems.find((x) => re.test(`${x.field}: ${x.message}`));
    assert.ok(p, JSON.stringify(r.problems));
    assert.equal(p.line, line);
  });
}

test('agent config: a server URL with a port out of range is refused', () => {
  const r = parseAgentConfig('c.yaml', 'registry: zk://h:2181/knit\nserver: https://cp:70000\n');
  assert.match(r.problems[0]?.message ?? '', /port 70000 in "https:\/\/cp:70000" is out of range \(1 to 65535\)/);
});

test('agent and server configs: port 0 (any free port) and IPv6 addresses are accepted', () => {
  const a = parseAgentConfig('a.yaml', 'registry: zk://[::1]:2181/knit\nserver: https://[::1]:7700\nadmin: "[::1]:0"\nbind: "::"\n');
  assert.deepEqual(a.problems, []);
  assert.deepEqual([a.config?.adminHost, a.config?.adminPort], ['::1', 0]);
  const s = parseServerConfig('s.yaml', 'registry: "embedded:"\nlisten: 127.0.0.1:0\n');
  assert.deepEqual(s.problems, []);
  assert.equal(s.config?.listenPort, 0);
});

test('which node config a file is, by its keys', () => {
  assert.equal(nodeConfigKind({ registry: 'x', server: 'https://cp' }), 'agent');
  assert.equal(nodeConfigKind({ registry: 'x', admin: '127.0.0.1:1' }), 'agent');
  assert.equal(nodeConfigKind({ registry: 'x', listen: '0.0.0.0:7700' }), 'server');
  assert.equal(nodeConfigKind({ service: { name: 'a' } }), undefined);
  assert.equal(nodeConfigKind(null), undefined);
});

test('agent config: transparent mode is off by default, with knit\'s ports and exclusions', () => {
  const r = parseAgentConfig('a.yaml', 'registry: zk://h:2181/knit\nserver: https://cp:7700\n');
  assert.deepEqual(r.config?.transparent, {
    enabled: false, outboundPort: 15001, inboundPort: 15006, dnsPort: 15053, outbound: 'passthrough',
    excludeInboundPorts: [22], excludeOutboundPorts: [22], excludeCidrs: [], excludeUids: [],
    captureDns: true, vipRange: '240.240.0.0/16', uid: process.getuid?.() ?? 0,
  });
});

test('agent config: transparent: snake_case fields normalised into camelCase', () => {
  const r = parseAgentConfig('a.yaml', [
    'registry: zk://h:2181/knit', 'server: https://cp:7700', 'transparent:', '  enabled: true', '  outbound_port: 16001', '  inbound_port: 16006',
    '  dns_port: 16053', '  outbound: deny', '  exclude_inbound_ports: [22, 2222]', '  exclude_outbound_ports: []',
    '  exclude_cidrs: [10.0.0.0/8, "fd00::/8", 192.168.1.1]', '  exclude_uids: [999]', '  capture_dns: false', '  vip_range: "fd24::/48"', '  uid: 998', '',
  ].join('\n'));
  assert.deepEqual(r.problems, []);
  assert.deepEqual(r.config?.transparent, {
    enabled: true, outboundPort: 16001, inboundPort: 16006, dnsPort: 16053, outbound: 'deny',
    excludeInboundPorts: [22, 2222], excludeOutboundPorts: [], excludeCidrs: ['10.0.0.0/8', 'fd00::/8', '192.168.1.1'], excludeUids: [999],
    captureDns: false, vipRange: 'fd24::/48', uid: 998,
  });
  assert.equal(nodeConfigKind({ registry: 'x', transparent: {} }), 'agent');
});

const badTransparent: Array<[string, string, number, RegExp]> = [
  ['a CIDR that is not one', '  exclude_cidrs: [10.0.0.0/8, 10.0.0.0/40]\n', 4, /transparent\.exclude_cidrs\[1\]: "10\.0\.0\.0\/40" is not a CIDR/],
  ['a VIP range that is not a CIDR', '  vip_range: 240.240.0.0\\16\n', 4, /transparent\.vip_range: .* is not a CIDR/],
  ['a capture port out of range', '  outbound_port: 70000\n', 4, /transparent\.outbound_port: must be a port number from 1 to 65535/],
  ['capture port 0', '  inbound_port: 0\n', 4, /transparent\.inbound_port: must be a port number from 1 to 65535/],
  ['an excluded port out of range', '  exclude_outbound_ports: [22, 65536]\n', 4, /transparent\.exclude_outbound_ports\[1\]: must be a port number/],
  ['a capture port that is the HBONE port', '  enabled: true\n  inbound_port: 15008\n', 5, /transparent\.inbound_port: port 15008 is also hbone_port's/],
  ['a capture port that is the admin port', '  enabled: true\n  dns_port: 7701\n', 5, /transparent\.dns_port: port 7701 is also admin's/],
  ['two capture ports alike', '  enabled: true\n  dns_port: 15001\n', 5, /transparent\.dns_port: port 15001 is also transparent\.outbound_port's/],
  ['an unknown outbound mode', '  outbound: open\n', 4, /transparent\.outbound: must be "passthrough" or "deny"/],
  ['a negative uid', '  exclude_uids: [-1]\n', 4, /transparent\.exclude_uids\[0\]: must be >= 0/],
  ['an unknown field', '  exclude_ports: [22]\n', 4, /transparent\.exclude_ports: unknown field/],
];
for (const [what, extra, line, re] of badTransparent) {
  test(`agent config: transparent: ${what} is refused, with line and field`, () => {
    const r = parseAgentConfig('c.yaml', `registry: zk://h:2181/knit\nserver: https://cp:7700\ntransparent:\n${extra}`);
    assert.equal(r.config, undefined);
    const p = r.problems.find((x) => re.test(`${x.field}: ${x.message}`));
    assert.ok(p, JSON.stringify(r.problems));
    assert.equal(p.line, line);
  });
}

test('agent config: transparent ports may clash with others while transparent mode is off (nothing listens on them)', () => {
  const r = parseAgentConfig('c.yaml', 'registry: zk://h:2181/knit\nserver: https://cp:7700\nhbone_port: 15001\n');
  assert.deepEqual(r.problems, []);
});
