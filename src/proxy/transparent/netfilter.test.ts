/**
 * The transparent-mode redirect, rendered (unit) and installed for real:
 * nftables and iptables inside network namespaces of subnet 81, with real
 * sockets showing where each connection lands. Every nft/iptables command
 * runs inside a namespace this file made; the root namespace's rules are
 * never touched.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, type ChildProcess } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { mkdtemp, rm, writeFile, mkdir } from 'node:fs/promises';
import { once } from 'node:events';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { makeNet, netnsUnavailable, type TestNet } from '../../../test/helpers/netns.js';
import { knit, ROOT } from '../../../test/helpers/knit.js';
import { until } from '../../../test/helpers/wait.js';
import {
  createRedirector, planRedirect, processRunner, redirectSpec, renderIptablesRules, renderNftScript, renderNftTable,
  NetfilterError, type CommandRunner, type RedirectSpec, type RunResult,
} from './netfilter.js';

const PROBE = join(ROOT, 'test', 'helpers', 'netfilter-probe.mjs');
/** The uid clients run as: not the agent's (root here). */
const NOBODY = 65534;

/** A program on PATH (looked up, not run: nothing runs in the root namespace). */
function onPath(prog: string): boolean {
  return (process.env.PATH ?? '').split(delimiter).some((d) => {
    try {
      accessSync(join(d, prog), constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

const missing = ['nft', 'iptables', 'ip6tables', 'iptables-restore', 'ip6tables-restore', 'setpriv'].filter((p) => !onPath(p));
/** Why the real-netfilter tests cannot run here; CI (scripts/test.sh) installs nftables and iptables, so it never skips. */
const unavailable = netnsUnavailable() ?? (missing.length ? `${missing.join(', ')} not installed (apt-get install nftables iptables util-linux)` : undefined);
if (unavailable) process.stderr.write(`netfilter.test.ts: SKIPPING the real-netfilter tests: ${unavailable}\n`);

const spec: RedirectSpec = redirectSpec({
  agentUid: 0,
  inboundPorts: [9443, 8080, 22, 15008, 8080],
  meshDestinations: [
    { address: '10.0.0.7', port: 8080 },
    { address: 'FD00:0:0::7', port: 8443 },
    { address: '10.0.0.5', port: 8080 },
    { address: '10.0.0.5', port: 8080 },
  ],
  vipCidrs: ['240.240.0.0/16', 'fd24::/48'],
  excludeCidrs: ['192.168.1.77/16', '2001:db8::1'],
  excludeUids: [1001, 0],
  excludeOutboundPorts: [22, 2222],
});

test('the nft table for a spec: exclusions first, then mesh sets and VIPs; inbound ports without excluded or capture ports', () => {
  assert.equal(
    renderNftTable(planRedirect(spec)),
    `table inet knit {
	set mesh4 {
		type ipv4_addr . inet_service
	}

	set mesh6 {
		type ipv6_addr . inet_service
	}

	chain output {
		type nat hook output priority -110; policy accept;
		meta skuid 0 return
		meta skuid 1001 return
		udp dport 53 redirect to :15053
		tcp dport 53 redirect to :15053
		meta l4proto != tcp return
		ip daddr 127.0.0.0/8 return
		ip6 daddr ::1 return
		ip daddr 192.168.0.0/16 return
		ip6 daddr 2001:db8::1 return
		tcp dport 22 return
		tcp dport 2222 return
		ip daddr . tcp dport @mesh4 redirect to :15001
		ip6 daddr . tcp dport @mesh6 redirect to :15001
		meta l4proto tcp ip daddr 240.240.0.0/16 redirect to :15001
		meta l4proto tcp ip6 daddr fd24::/48 redirect to :15001
	}

	chain prerouting {
		type nat hook prerouting priority dstnat - 10; policy accept;
		tcp dport 8080 redirect to :15006
		tcp dport 9443 redirect to :15006
	}
}`,
  );
  const script = renderNftScript(planRedirect({ ...spec, outbound: 'deny', captureDns: false }));
  assert.match(script, /^table inet knit \{\}\ndelete table inet knit\ntable inet knit \{/);
  assert.match(script, /\n\t\tmeta l4proto tcp redirect to :15001\n\t\}/, 'deny: every other TCP connection goes to the proxy, last');
  assert.doesNotMatch(script, /dport 53/);
  assert.match(script, /\nadd element inet knit mesh4 \{ 10\.0\.0\.5 \. 8080, 10\.0\.0\.7 \. 8080 \}\nadd element inet knit mesh6 \{ fd00::7 \. 8443 \}\n$/);
});

test('the iptables rules for a spec, per family, as iptables-save prints them', () => {
  const v4 = renderIptablesRules(planRedirect(spec), 4);
  assert.deepEqual(v4.KNIT_OUTPUT, [
    '-A KNIT_OUTPUT -m owner --uid-owner 0 -j RETURN',
    '-A KNIT_OUTPUT -m owner --uid-owner 1001 -j RETURN',
    '-A KNIT_OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053',
    '-A KNIT_OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053',
    '-A KNIT_OUTPUT ! -p tcp -j RETURN',
    '-A KNIT_OUTPUT -d 127.0.0.0/8 -j RETURN',
    '-A KNIT_OUTPUT -d 192.168.0.0/16 -j RETURN',
    '-A KNIT_OUTPUT -p tcp -m tcp --dport 22 -j RETURN',
    '-A KNIT_OUTPUT -p tcp -m tcp --dport 2222 -j RETURN',
    '-A KNIT_OUTPUT -j KNIT_MESH',
    '-A KNIT_OUTPUT -d 240.240.0.0/16 -p tcp -j REDIRECT --to-ports 15001',
  ]);
  assert.deepEqual(v4.KNIT_MESH, [
    '-A KNIT_MESH -d 10.0.0.5/32 -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15001',
    '-A KNIT_MESH -d 10.0.0.7/32 -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15001',
  ]);
  assert.deepEqual(v4.KNIT_PREROUTING, [
    '-A KNIT_PREROUTING -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15006',
    '-A KNIT_PREROUTING -p tcp -m tcp --dport 9443 -j REDIRECT --to-ports 15006',
  ]);
  const v6 = renderIptablesRules(planRedirect({ ...spec, outbound: 'deny' }), 6);
  assert.ok(v6.KNIT_OUTPUT.includes('-A KNIT_OUTPUT -d ::1/128 -j RETURN'));
  assert.ok(v6.KNIT_OUTPUT.includes('-A KNIT_OUTPUT -d 2001:db8::1/128 -j RETURN'));
  assert.equal(v6.KNIT_OUTPUT.at(-1), '-A KNIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001');
  assert.deepEqual(v6.KNIT_MESH, ['-A KNIT_MESH -d fd00::7/128 -p tcp -m tcp --dport 8443 -j REDIRECT --to-ports 15001']);
});

test('a spec value that cannot be a rule is refused, naming the field (registry data never reaches nft unchecked)', () => {
  const cases: Array<[Partial<RedirectSpec>, RegExp]> = [
    [{ meshDestinations: [{ address: '10.0.0.1 . 1 } ; flush ruleset ; add element inet knit mesh4 { 10.0.0.2', port: 1 }] }, /meshDestinations\[0\]\.address .* is not an IP address/],
    [{ meshDestinations: [{ address: '10.0.0.1', port: 0 }] }, /meshDestinations\[0\]\.port 0 is not a port/],
    [{ excludeCidrs: ['0.0.0.0/0'] }, /excludeCidrs\[0\] "0\.0\.0\.0\/0" is not a CIDR/],
    [{ vipCidrs: ['240.240.0.0/33'] }, /vipCidrs\[0\]/],
    [{ excludeCidrs: ['fe80::1%eth0'] }, /excludeCidrs\[0\]/],
    [{ inboundPorts: [70000] }, /inboundPorts\[0\] 70000/],
    [{ excludeUids: [-1] }, /excludeUids\[0\] -1 is not a uid/],
    [{ outboundPort: 15008 }, /must differ/],
    [{ outbound: 'open' as 'deny' }, /outbound "open"/],
  ];
  for (const [change, re] of cases) {
    assert.throws(() => planRedirect({ ...spec, ...change }), (e: unknown) => e instanceof NetfilterError && e.reason === 'invalid-spec' && e.code === 'KNIT_ERR_BAD_REQUEST' && re.test(e.message), String(re));
  }
});

/** A runner that answers from a table (program -> result) and records every command. */
function scripted(answers: Record<string, Partial<RunResult>>): CommandRunner & { calls: string[] } {
  const calls: string[] = [];
  const run = async (argv: readonly string[]): Promise<RunResult> => {
    calls.push(argv.join(' '));
    const a = answers[argv.join(' ')] ?? answers[argv[0]!] ?? { code: 127 };
    return { code: a.code ?? 0, stdout: a.stdout ?? '', stderr: a.stderr ?? '' };
  };
  return Object.assign(run, { calls });
}

test('backend choice and failures, as one line that says what to do', async () => {
  const cases: Array<[Record<string, Partial<RunResult>>, 'auto' | 'nft' | 'iptables', RegExp, string]> = [
    [{}, 'auto', /^neither nft nor iptables is installed: apt-get install nftables$/, 'missing-tool'],
    [{}, 'nft', /^nft is not installed: apt-get install nftables$/, 'missing-tool'],
    [{ nft: { code: 0 } }, 'iptables', /^iptables is not installed: apt-get install iptables$/, 'missing-tool'],
    [{ nft: { code: 1, stderr: 'Error: Could not process rule: Operation not permitted\n' } }, 'auto', /^nft list tables: needs CAP_NET_ADMIN: run as root/, 'permission'],
    [
      { 'nft list tables': { code: 1, stderr: 'Error: Protocol not supported\n' }, 'iptables -V': { code: 0, stdout: 'iptables v1.8.9 (legacy)\n' }, 'iptables-save': { code: 4, stderr: "iptables-save v1.8.9 (legacy): Cannot initialize: Permission denied (you must be root)\n" } },
      'auto', /^iptables-save: needs CAP_NET_ADMIN: run as root/, 'permission',
    ],
    [
      { 'nft list tables': { code: 0 }, 'nft list table inet knit': { code: 1, stderr: 'Error: No such file or directory\n' }, 'nft -f -': { code: 1, stderr: '/dev/stdin:12:3-9: Error: Could not process rule: No such file or directory\n  meta skuid 0 return\n  ^^^^^^\n' } },
      'auto', /^nft -f - failed: Error: Could not process rule: No such file or directory$/, 'rejected',
    ],
  ];
  for (const [answers, backend, re, reason] of cases) {
    const r = createRedirector({ run: scripted(answers) });
    await assert.rejects(r.install(spec, { backend }), (e: unknown) => {
      assert.ok(e instanceof NetfilterError, String(e));
      assert.match(e.message, re);
      assert.equal(e.reason, reason);
      assert.doesNotMatch(e.message, /\n/);
      return true;
    });
  }
  // nft lists tables but refuses knit's (no inet nat before Linux 5.2): iptables takes over, and says why.
  const old = scripted({
    'nft list tables': { code: 0 }, 'nft list table inet knit': { code: 1, stderr: 'Error: No such file or directory\n' },
    'nft -f -': { code: 1, stderr: '/dev/stdin:14:3-30: Error: Could not process rule: Operation not supported\n' },
    'iptables -V': { code: 0, stdout: 'iptables v1.8.4 (legacy)\n' }, 'iptables-restore --noflush --wait=10': { code: 0 }, 'ip6tables-restore --noflush --wait=10': { code: 0 },
    'iptables-save': { code: 0, stdout: '*nat\n:KNIT_OUTPUT - [0:0]\n:KNIT_PREROUTING - [0:0]\n:KNIT_MESH - [0:0]\n-A OUTPUT -j KNIT_OUTPUT\n-A PREROUTING -j KNIT_PREROUTING\nCOMMIT\n' },
    'ip6tables-save': { code: 2, stderr: "ip6tables-save v1.8.4 (legacy): Cannot initialize: Address family not supported by protocol\n" },
  });
  const fell = await createRedirector({ run: old }).install(spec);
  assert.equal(fell.backend, 'iptables');
  assert.equal(fell.variant, 'legacy');
  assert.match(fell.notes.join('\n'), /nft could not install table inet knit \(nft -f - failed: Error: Could not process rule: Operation not supported\); used iptables instead/);
  assert.match(fell.notes.join('\n'), /IPv6: ip6tables-save cannot reach the kernel .*IPv6 connections are not redirected/);
  assert.ok(!old.calls.includes('ip6tables-restore --noflush --wait=10'), 'no IPv6 nat: nothing written for it');
  await assert.rejects(createRedirector({ run: old }).install(spec, { backend: 'nft' }), /Operation not supported/, 'a forced backend does not fall back');

  // nft unusable (no nf_tables in the kernel): iptables takes over.
  const run = scripted({ 'nft list tables': { code: 1, stderr: 'Error: Protocol not supported\n' }, 'iptables -V': { code: 0, stdout: 'iptables v1.8.9 (nf_tables)\n' }, 'iptables-save': { code: 0, stdout: '' }, 'ip6tables-save': { code: 0, stdout: '' }, 'iptables-restore': { code: 0 }, 'ip6tables-restore': { code: 0 } });
  await assert.rejects(createRedirector({ run }).install(spec), /chains are not there/);
  assert.ok(run.calls.includes('iptables-restore --noflush'), run.calls.join('\n'));
  assert.ok(!run.calls.some((c) => c.startsWith('nft -f')), 'nothing written with nft');
});

describe('real netfilter in network namespaces', { skip: unavailable }, () => {
  let tn: TestNet;
  const A4 = '10.231.81.11';
  const B4 = '10.231.81.12';
  /** A second address of host b, the "excluded network". */
  const B4X = '10.231.81.200';
  const A6 = 'fd00:231:81::11';
  const B6 = 'fd00:231:81::12';
  const servers: ChildProcess[] = [];
  const ns = (h: string): string => tn.hosts[h]!.ns;
  const runner = (h: string): CommandRunner => processRunner({ netns: ns(h) });

  before(() => {
    tn = makeNet(['a', 'b', 'c', 'd'], 81);
    const ip = (...args: string[]): string => execFileSync('ip', args, { encoding: 'utf8' });
    for (const [h, v6] of [['a', A6], ['b', B6]] as const) ip('-n', ns(h), '-6', 'addr', 'add', `${v6}/64`, 'dev', tn.hosts[h]!.device, 'nodad');
    ip('-n', ns('b'), 'addr', 'add', `${B4X}/24`, 'dev', tn.hosts.b!.device);
    // A route for the VIP range, so that connect() gets as far as the nat hook (nothing answers there).
    ip('-n', ns('a'), 'route', 'add', '240.240.0.0/16', 'dev', tn.hosts.a!.device);
  });
  after(async () => {
    for (const s of servers) if (s.exitCode === null && s.signalCode === null) s.kill('SIGKILL');
    tn?.cleanup();
  });

  /** Starts labelled listeners in a host and waits until they all listen. */
  async function serve(h: string, listeners: string[]): Promise<ChildProcess> {
    const child = tn.spawn(h, [process.execPath, PROBE, 'serve', ...listeners]);
    servers.push(child);
    let out = '';
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    await until(`listeners ${listeners.join(' ')} in ${h}`, () => {
      if (child.exitCode !== null) throw new Error(`serve exited: ${out}`);
      return out.includes('ready');
    }, 10_000);
    return child;
  }
  async function kill(child: ChildProcess): Promise<void> {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGKILL');
    await once(child, 'exit');
  }

  /** Where a connection (or datagram) from host `h` as `uid` lands: the answering server's label, or `error CODE`. */
  async function probe(h: string, proto: 'tcp' | 'udp', host: string, port: number, uid?: number): Promise<string> {
    const as = uid === undefined ? [] : ['setpriv', `--reuid=${uid}`, `--regid=${uid}`, '--clear-groups'];
    const r = await tn.run(h, [...as, process.execPath, PROBE, proto, host, String(port)]);
    const last = r.stdout.trim().split('\n').at(-1) ?? '';
    assert.equal(r.code, 0, `probe ${proto} ${host}:${port}: ${r.stdout}${r.stderr}`);
    const v = JSON.parse(last) as { reply?: string; error?: string };
    return v.reply ?? `error ${v.error}`;
  }

  /** nft list ruleset, iptables-save and ip6tables-save of a host, without iptables-save's timestamp comments. */
  async function snapshot(h: string): Promise<Record<'nft' | 'ip4' | 'ip6', string>> {
    const run = runner(h);
    const text = async (argv: string[]): Promise<string> => {
      const r = await run(argv);
      assert.equal(r.code, 0, `${argv.join(' ')}: ${r.stderr}`);
      return r.stdout.split('\n').filter((l) => !/^# (Generated by|Completed on) /.test(l)).join('\n');
    };
    return { nft: await text(['nft', 'list', 'ruleset']), ip4: await text(['iptables-save']), ip6: await text(['ip6tables-save']) };
  }

  async function must(h: string, argv: string[], input?: string): Promise<string> {
    const r = await runner(h)(argv, input);
    assert.equal(r.code, 0, `${argv.join(' ')}: ${r.stderr}`);
    return r.stdout;
  }

  for (const backend of ['nft', 'iptables'] as const) {
    test(`${backend}: install is idempotent, status compares with the spec, the rendered text is what the kernel lists`, async (t) => {
      const r = createRedirector({ run: runner('c') });
      assert.deepEqual(await r.status(spec), { installed: false, backends: [], matches: false, notes: [] });
      t.after(() => r.cleanup());
      const first = await r.install(spec, { backend });
      assert.equal(first.backend, backend);
      assert.equal(first.replaced, false);
      assert.equal(first.matches, true, JSON.stringify(first.differences));
      assert.equal(first.destinations, 3);
      const listing = async (): Promise<string> =>
        backend === 'nft' ? must('c', ['nft', 'list', 'table', 'inet', 'knit']) : (await snapshot('c')).ip4 + (await snapshot('c')).ip6;
      const once1 = await listing();
      if (backend === 'nft') assert.equal(once1.replace(/\n\t\telements = \{[^}]*\}/g, '').trim(), renderNftTable(planRedirect(spec)));
      const second = await r.install(spec, { backend });
      assert.equal(second.replaced, true);
      assert.equal(await listing(), once1, 'installing twice changes nothing');

      const s = await r.status(spec);
      assert.equal(s.installed, true);
      assert.equal(s.matches, true);
      assert.equal(s.backends[0]!.backend, backend);
      assert.equal(s.backends[0]!.rules, second.rules);
      assert.ok(s.backends[0]!.rules > 10);
      const other = await r.status({ ...spec, excludeOutboundPorts: [22], outbound: 'deny' });
      assert.equal(other.matches, false);
      const diff = other.backends[0]!.differences!.join('\n');
      assert.match(diff, backend === 'nft' ? /^\+ tcp dport 2222 return$/m : /^\+ ip: -A KNIT_OUTPUT -p tcp -m tcp --dport 2222 -j RETURN$/m);
      assert.match(diff, backend === 'nft' ? /^- meta l4proto tcp redirect to :15001$/m : /^- ip6: -A KNIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001$/m);
      // Destinations are the agent's to keep: another set of them still matches, and is counted.
      assert.equal((await r.status({ ...spec, meshDestinations: [] })).matches, true);
      await r.setDestinations({ ...spec, meshDestinations: [{ address: '10.0.0.9', port: 1 }] });
      assert.equal((await r.status(spec)).backends[0]!.destinations, 1);

      // A hand-edited rule shows up.
      if (backend === 'nft') await must('c', ['nft', 'add', 'rule', 'inet', 'knit', 'output', 'tcp', 'dport', '4444', 'return']);
      else await must('c', ['iptables', '-t', 'nat', '-A', 'KNIT_OUTPUT', '-p', 'tcp', '--dport', '4444', '-j', 'RETURN']);
      assert.equal((await r.status(spec)).matches, false);

      const removed = await r.cleanup();
      assert.ok(removed.removed.length > 0);
      assert.deepEqual(await r.cleanup(), { removed: [] }, 'cleanup twice: nothing left to remove');
      assert.equal((await r.status()).installed, false);
      await assert.rejects(r.setDestinations(spec), (e: unknown) => e instanceof NetfilterError && e.reason === 'not-installed');
    });
  }

  test('cleanup leaves other tables and chains (Docker\'s, a firewall\'s) exactly as they were, with either backend', async () => {
    await must('c', ['nft', '-f', '-'], 'table inet other {\n\tchain out {\n\t\ttype filter hook output priority 0; policy accept;\n\t\ttcp dport 9999 accept\n\t}\n}\n');
    const nat4 = '*nat\n:DOCKER - [0:0]\n-A OUTPUT -d 10.99.0.0/16 -j DOCKER\n-A PREROUTING -j DOCKER\n-A DOCKER -p tcp --dport 8000 -j DNAT --to-destination 10.99.0.2:80\nCOMMIT\n*filter\n:FW - [0:0]\n-A INPUT -j FW\n-A FW -p tcp --dport 9 -j DROP\nCOMMIT\n';
    const nat6 = '*nat\n:DOCKER - [0:0]\n-A OUTPUT -d fd99::/64 -j DOCKER\n-A DOCKER -p tcp --dport 8000 -j DNAT --to-destination [fd99::2]:80\nCOMMIT\n*filter\n:FW - [0:0]\n-A INPUT -j FW\nCOMMIT\n';
    await must('c', ['iptables-restore', '--noflush'], nat4);
    await must('c', ['ip6tables-restore', '--noflush'], nat6);
    const before = await snapshot('c');
    assert.match(before.ip4, /-A OUTPUT -d 10\.99\.0\.0\/16 -j DOCKER/);
    const r = createRedirector({ run: runner('c') });

    await r.install(spec, { backend: 'nft' });
    const withNft = await snapshot('c');
    assert.match(withNft.nft, /table inet other \{[^]*tcp dport 9999 accept/);
    assert.equal(withNft.ip4, before.ip4, 'the nft backend does not touch iptables');
    // Switching backends keeps one set of rules: the nft table goes.
    const switched = await r.install(spec, { backend: 'iptables' });
    assert.deepEqual(switched.removedOther, ['table inet knit']);
    const withIpt = await snapshot('c');
    assert.doesNotMatch(withIpt.nft, /table inet knit/);
    const nat = withIpt.ip4.slice(withIpt.ip4.indexOf('*nat'));
    assert.ok(nat.indexOf('-A OUTPUT -j KNIT_OUTPUT') < nat.indexOf('-A OUTPUT -d 10.99.0.0/16 -j DOCKER'), 'knit\'s jump comes first');
    assert.match(withIpt.ip4, /-A DOCKER -p tcp -m tcp --dport 8000 -j DNAT --to-destination 10\.99\.0\.2:80/);
    assert.match(withIpt.ip6, /-A KNIT_MESH -d fd00::7\/128/);
    assert.deepEqual((await r.status()).backends.map((b) => b.backend), ['iptables']);

    const { removed } = await r.cleanup();
    assert.ok(removed.includes('ip nat KNIT_OUTPUT') && removed.includes('ip6 nat KNIT_MESH'), removed.join(', '));
    assert.deepEqual(await snapshot('c'), before, 'everything else byte for byte as before');
    await r.install(spec, { backend: 'nft' });
    await r.cleanup();
    assert.deepEqual(await snapshot('c'), before);
    assert.deepEqual(await r.cleanup(), { removed: [] });
  });

  for (const backend of ['nft', 'iptables'] as const) {
    test(`${backend}: where real connections land, and what still works when the agent is SIGKILLed`, async () => {
      const real = [
        await serve('b', ['mesh-b=tcp:8080', 'plain-b=tcp:9090', 'ssh-b=tcp:22', 'dns-b=udp:53', 'dns-b-tcp=tcp:53']),
        await serve('a', ['app-a=tcp:8080', 'ssh-a=tcp:22', 'hbone-a=tcp:15008']),
      ];
      const r = createRedirector({ run: runner('a') });
      const s = redirectSpec({
        agentUid: 0,
        inboundPorts: [8080, 22],
        meshDestinations: [
          { address: B4, port: 8080 },
          { address: B4X, port: 8080 },
          { address: B4, port: 22 },
          { address: B6, port: 8080 },
        ],
        excludeCidrs: [`${B4X}/32`],
        vipCidrs: ['240.240.0.0/16'],
      });
      await r.install(s, { backend });
      try {
        // The agent's capture and resolver, stand-ins that say they answered.
        let capture = await serve('a', ['capture-out=tcp:15001', 'capture-in=tcp:15006', 'dns-capture=udp:15053', 'dns-capture-tcp=tcp:15053']);
        const outcomes = async (cases: Array<[string, 'tcp' | 'udp', string, number, number | undefined, string]>): Promise<void> => {
          for (const [what, proto, host, port, uid, want] of cases) assert.equal(await probe(uid === undefined ? 'b' : 'a', proto, host, port, uid), want, what);
        };
        await outcomes([
          ['mesh destination, another uid: captured', 'tcp', B4, 8080, NOBODY, 'capture-out'],
          ['mesh destination over IPv6: captured', 'tcp', B6, 8080, NOBODY, 'capture-out'],
          ['a VIP: captured', 'tcp', '240.240.0.1', 80, NOBODY, 'capture-out'],
          ['non-mesh destination: direct (passthrough)', 'tcp', B4, 9090, NOBODY, 'plain-b'],
          ['port 22 (excluded), even to a mesh destination: direct', 'tcp', B4, 22, NOBODY, 'ssh-b'],
          ['an excluded CIDR: direct', 'tcp', B4X, 8080, NOBODY, 'mesh-b'],
          ['the agent\'s uid (root): direct', 'tcp', B4, 8080, 0, 'mesh-b'],
          ['DNS over UDP from another uid: the agent\'s resolver', 'udp', B4, 53, NOBODY, 'dns-capture'],
          ['DNS over TCP from another uid: the agent\'s resolver', 'tcp', B4, 53, NOBODY, 'dns-capture-tcp'],
          ['DNS from the agent\'s uid: the real resolver', 'udp', B4, 53, 0, 'dns-b'],
          // uid undefined: from host b, into a.
          ['inbound to a mesh service port: inbound capture', 'tcp', A4, 8080, undefined, 'capture-in'],
          ['inbound over IPv6: inbound capture', 'tcp', A6, 8080, undefined, 'capture-in'],
          ['inbound to the HBONE port: untouched', 'tcp', A4, 15008, undefined, 'hbone-a'],
          ['inbound to port 22 (excluded): untouched', 'tcp', A4, 22, undefined, 'ssh-a'],
        ]);

        // The agent dies: the rules stay, nothing listens on the capture ports.
        await kill(capture);
        await outcomes([
          ['mesh destination: refused, never sent in clear', 'tcp', B4, 8080, NOBODY, 'error ECONNREFUSED'],
          ['non-mesh destination: still works', 'tcp', B4, 9090, NOBODY, 'plain-b'],
          ['port 22: still works', 'tcp', B4, 22, NOBODY, 'ssh-b'],
          ['inbound to port 22: still works', 'tcp', A4, 22, undefined, 'ssh-a'],
        ]);

        // deny: everything but the exclusions goes to the proxy; with the agent dead, only the exclusions work.
        await r.install({ ...s, outbound: 'deny' }, { backend });
        capture = await serve('a', ['capture-out=tcp:15001', 'capture-in=tcp:15006']);
        await outcomes([
          ['deny: non-mesh destination goes to the proxy', 'tcp', B4, 9090, NOBODY, 'capture-out'],
          ['deny: port 22 stays direct', 'tcp', B4, 22, NOBODY, 'ssh-b'],
        ]);
        await kill(capture);
        await outcomes([
          ['deny, agent dead: non-mesh destination refused', 'tcp', B4, 9090, NOBODY, 'error ECONNREFUSED'],
          ['deny, agent dead: port 22 still works', 'tcp', B4, 22, NOBODY, 'ssh-b'],
        ]);
        await r.cleanup();
        assert.equal(await probe('a', 'tcp', B4, 8080, NOBODY), 'mesh-b', 'after cleanup: direct again');
        assert.equal(await probe('b', 'tcp', A4, 8080), 'app-a');
      } finally {
        await r.cleanup();
        for (const c of real) await kill(c);
      }
    });
  }

  test('a program missing inside a namespace is "not installed", like outside', async () => {
    assert.deepEqual(await runner('c')(['knit-81-no-such-program']), { code: 127, stdout: '', stderr: 'knit-81-no-such-program: command not found' });
    await assert.rejects(processRunner({ netns: 'knit-81-no-such-ns' })(['true']), (e: unknown) => e instanceof NetfilterError && e.reason === 'netns');
  });

  test('knit redirect-traffic --netns: install, --status, --cleanup, and one-line failures', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'knit-redirect-'));
    try {
      await mkdir(join(dir, 'services'));
      await writeFile(join(dir, 'services', 'web.json'), JSON.stringify({ service: { name: 'web', port: 8080 } }));
      await writeFile(join(dir, 'services', 'api.yaml'), 'service:\n  name: api\n  port: 9443\n');
      const config = join(dir, 'agent.yaml');
      const base = `registry: zk://127.0.0.1:2181/knit\nserver: https://127.0.0.1:7700\nservices_dir: ${join(dir, 'services')}\n`;
      await writeFile(config, `${base}transparent:\n  enabled: true\n  exclude_cidrs: [10.99.0.0/16]\n  uid: 0\n`);
      const cli = (...args: string[]): ReturnType<typeof knit> => knit(['redirect-traffic', '--config', config, '--netns', ns('d'), ...args]);

      let out = await cli();
      assert.equal(out.code, 0, out.stderr);
      assert.match(out.stdout, /^knit redirect-traffic: installed in network namespace \S+ with nft: table inet knit \(\d+ rules\)$/m);
      assert.match(out.stdout, /inbound ports 8080, 9443/);
      const table = await must('d', ['nft', 'list', 'table', 'inet', 'knit']);
      assert.match(table, /tcp dport 9443 redirect to :15006/);
      assert.match(table, /ip daddr 10\.99\.0\.0\/16 return/);

      out = await cli('--status');
      assert.equal(out.code, 0, out.stdout + out.stderr);
      assert.match(out.stdout, /matches/);
      out = await cli('--status', '--json');
      const st = JSON.parse(out.stdout) as { installed: boolean; matches: boolean; backends: Array<{ backend: string }> };
      assert.deepEqual([st.installed, st.matches, st.backends[0]?.backend], [true, true, 'nft']);
      // Flags override the config's exclusions: that spec differs from what is installed.
      out = await cli('--status', '--exclude-cidr', '10.98.0.0/16,10.97.0.0/16', '--exclude-outbound-port', '22', '--exclude-outbound-port', '2222');
      assert.equal(out.code, 1);
      assert.match(out.stdout, /does not match/);
      assert.match(out.stdout, /10\.97\.0\.0\/16/);

      out = await cli('--backend', 'iptables', '--exclude-uid', '1234');
      assert.equal(out.code, 0, out.stderr);
      assert.match(out.stdout, /installed in network namespace \S+ with iptables \((nf_tables|legacy)\): ip nat KNIT_MESH/);
      assert.match(await must('d', ['iptables-save']), /-A KNIT_OUTPUT -m owner --uid-owner 1234 -j RETURN/);
      assert.doesNotMatch(await must('d', ['nft', 'list', 'ruleset']), /table inet knit/);

      out = await cli('--cleanup');
      assert.equal(out.code, 0, out.stderr);
      assert.match(out.stdout, /removed .*KNIT_OUTPUT/);
      out = await cli('--cleanup');
      assert.equal(out.code, 0, out.stderr);
      assert.match(out.stdout, /nothing to remove/);
      out = await cli('--status');
      assert.equal(out.code, 1);
      assert.match(out.stdout, /not installed/);

      const fails: Array<[string[], RegExp]> = [
        [['redirect-traffic', '--config', config, '--netns', 'knit-81-no-such-ns'], /^knit: network namespace "knit-81-no-such-ns" does not exist/],
        [['redirect-traffic', '--config', config, '--netns', ns('d'), '--exclude-cidr', '10.0.0.0/99'], /^knit: --exclude-cidr 10\.0\.0\.0\/99: not a CIDR/],
        [['redirect-traffic', '--config', config, '--netns', ns('d'), '--backend', 'pf'], /pf/],
        [['redirect-traffic', '--config', join(dir, 'none.yaml'), '--netns', ns('d')], /none\.yaml: cannot read/],
      ];
      for (const [args, re] of fails) {
        const f = await knit(args);
        assert.notEqual(f.code, 0, args.join(' '));
        assert.match(f.stderr, re);
      }
      await writeFile(config, base);
      const off = await cli();
      assert.equal(off.code, 1);
      assert.match(off.stderr, /^knit: .*agent\.yaml: transparent\.enabled: transparent mode is off: set transparent\.enabled: true/);
      assert.equal(off.stderr.trim().split('\n').length, 1, off.stderr);
      assert.doesNotMatch(await must('d', ['nft', 'list', 'ruleset']), /knit/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
