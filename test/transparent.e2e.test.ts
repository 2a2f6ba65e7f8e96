/**
 * Transparent mode end to end, with real netfilter in network namespaces:
 * three hosts on a bridge. A runs `web` (client only) with
 * `transparent.outbound: deny` and host C's address excluded; B runs
 * `api` (strict) and `legacy` (permissive) in the default passthrough
 * mode; C has no agent (a client outside the mesh, and a server outside
 * it). Every client is an unmodified program run as an ordinary uid
 * (nobody): it resolves names with the system resolver and dials plain
 * sockets.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KNIT, ROOT, knit, start, freePort, type Proc } from './helpers/knit.js';
import { makeNet, netnsUnavailable, type TestNet } from './helpers/netns.js';
import { ensureZooKeeper, startZooKeeper, type ZkCluster } from './helpers/zookeeper.js';
import { FleetAgents } from './helpers/fleet.js';
import { until } from './helpers/wait.js';

const has = (cmd: string): boolean => {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
};
const missing = netnsUnavailable() ?? ensureZooKeeper() ?? (['nft', 'setpriv', 'tcpdump'].find((c) => !has(c)) && `${['nft', 'setpriv', 'tcpdump'].find((c) => !has(c))} is not installed (npm test installs nftables, util-linux and tcpdump)`);

const CLIENT = join(ROOT, 'test/helpers/tp-client.mjs');
const WHOAMI = join(ROOT, 'test/helpers/whoami.mjs');
const NOBODY = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'];

let net: TestNet;
let zk: ZkCluster;
let dir: string;
let server: Proc;
let cliEnv: NodeJS.ProcessEnv;
let fleet: FleetAgents;
const apps: ChildProcess[] = [];
const addr = (h: string): string => net.hosts[h]!.address;
/** Each host's IPv6 address on the bridge's link (fd00:231:82::<last octet of its IPv4 address>). */
const v6 = (h: string): string => `fd00:231:82::${net.hosts[h]!.address.split('.')[3]}`;

interface ClientResult {
  ok?: boolean;
  status?: number;
  body?: string;
  err?: string;
  address?: string;
  ms: number;
}

/** Runs the unmodified client on `host` (as nobody unless `asRoot`); its one JSON line. */
async function client(host: string, mode: string, arg: string, asRoot = false): Promise<ClientResult> {
  const r = await net.run(host, [...(asRoot ? [] : NOBODY), process.execPath, CLIENT, mode, arg]);
  const line = r.stdout.trim().split('\n').pop() ?? '';
  try {
    return JSON.parse(line) as ClientResult;
  } catch {
    throw new Error(`client on ${host} printed ${JSON.stringify(r.stdout)} ${r.stderr}`);
  }
}

/** Starts a test application inside a host and waits until it listens. */
async function app(host: string, name: string, port: number): Promise<void> {
  const p = net.spawn(host, [process.execPath, WHOAMI], { NAME: name, PORT: String(port) });
  apps.push(p);
  await new Promise((r) => p.stdout!.once('data', r));
}

const metric = (text: string, name: string, labels: Record<string, string>): number => {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`))) sum += Number(line.split(' ').pop());
  }
  return sum;
};

const transparentYaml = (extra: string[]): string[] => ['drain: 1s', 'transparent:', '  enabled: true', ...extra.map((l) => `  ${l}`)];

describe('transparent mode: unmodified applications through the mesh, with real netfilter', { skip: missing && `cannot run: ${missing}`, timeout: 300_000 }, () => {
  before(async () => {
    net = makeNet(['a', 'b', 'c'], 82);
    dir = await mkdtemp(join(tmpdir(), 'knit-transparent-'));
    // `ip netns exec` puts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf: every host's resolver is
    // the bridge, where nothing answers DNS, so names resolve only through the agent's capture.
    for (const h of Object.values(net.hosts)) {
      // A host's default route (as every VM has): without any route to the virtual IPs, connect() fails before netfilter sees it.
      execFileSync('ip', ['-n', h.ns, 'route', 'add', 'default', 'via', net.bridgeAddress]);
      execFileSync('ip', ['-n', h.ns, '-6', 'addr', 'add', `${v6(h.name)}/64`, 'dev', h.device, 'nodad']);
      await mkdir(`/etc/netns/${h.ns}`, { recursive: true });
      await writeFile(`/etc/netns/${h.ns}/resolv.conf`, `nameserver ${net.bridgeAddress}\n`);
    }
    zk = await startZooKeeper({ size: 1, host: net.bridgeAddress });
    const zkUrl = `zk://${zk.connect}/knit`;
    const port = await freePort();
    const serverUrl = `https://${net.bridgeAddress}:${port}`;
    await mkdir(join(dir, 'server'), { recursive: true });
    await writeFile(join(dir, 'server', 'server.yaml'), `name: cp1\ndata_dir: ${join(dir, 'server', 'data')}\nregistry: ${zkUrl}\nlisten: ${net.bridgeAddress}:${port}\nadvertise: [${net.bridgeAddress}]\n`);
    server = start([KNIT, 'server', '--config', join(dir, 'server', 'server.yaml')]);
    await server.waitFor(/knit server ready/, 60_000);
    cliEnv = { KNIT_SERVER: serverUrl, KNIT_TOKEN_FILE: join(dir, 'server', 'data', 'operator.token'), KNIT_CA_FILE: join(dir, 'server', 'data', 'ca', 'root.pem') };
    fleet = new FleetAgents(net, dir);
    await fleet.configure('a', { node: 'host-a', registry: zkUrl, server: serverUrl, advertise: addr('a'), extra: transparentYaml(['outbound: deny', `exclude_cidrs: [${addr('c')}/32]`]) });
    await fleet.configure('b', { node: 'host-b', registry: zkUrl, server: serverUrl, advertise: addr('b'), extra: transparentYaml([]) });
    for (const [h, services] of [['a', 'web'], ['b', 'api,legacy']] as const) {
      const tok = await knit(['token', 'create', '--node', `host-${h}`, '--services', services, '--ttl', '10m'], cliEnv);
      assert.equal(tok.code, 0, tok.stderr);
      await writeFile(join(fleet.home(h), 'join.token'), tok.stdout);
    }
    await writeFile(join(fleet.home('a'), 'services', 'web.json'), JSON.stringify({ service: { name: 'web' } }));
    await writeFile(join(fleet.home('b'), 'services', 'api.json'), JSON.stringify({ service: { name: 'api', port: 9001, check: { tcp: '127.0.0.1:9001', interval: '1s' } } }));
    await writeFile(join(fleet.home('b'), 'services', 'legacy.json'), JSON.stringify({ service: { name: 'legacy', port: 9002, connect: { inbound: 'permissive' } } }));
    await app('b', 'api', 9001);
    await app('b', 'legacy', 9002);
    await app('b', 'ssh-b', 22);
    await app('b', 'other-b', 8080);
    await app('c', 'c', 80);
    await writeFile(join(dir, 'allow.yaml'), 'default: deny\nintentions:\n  - { source: web, destination: api, action: allow }\n');
    assert.equal((await knit(['intention', 'apply', '-f', join(dir, 'allow.yaml')], cliEnv)).code, 0);
    await fleet.start('b');
    await fleet.start('a');
    // Ready: A's agent knows api's instance and its virtual IP.
    await until('api.knit resolves on A', async () => (await client('a', 'lookup', 'api.knit')).address?.startsWith('240.240.') ?? false, 30_000, 250);
  });

  after(async () => {
    if (process.env.KNIT_TEST_KEEP_LOGS) for (const h of ['a', 'b']) await writeFile(join(process.env.KNIT_TEST_KEEP_LOGS, `agent-${h}.log`), fleet?.output(h) ?? '');
    for (const p of apps) p.kill('SIGKILL');
    fleet?.killAll();
    await server?.kill();
    await zk?.stop();
    for (const h of Object.values(net?.hosts ?? {})) await rm(`/etc/netns/${h.ns}`, { recursive: true, force: true });
    net?.cleanup();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test('an unmodified client on A reaches api.knit and api\'s own address through both agents, as TLS on the wire', async () => {
    const vip = (await client('a', 'lookup', 'api.knit')).address!;
    assert.match(vip, /^240\.240\.\d+\.\d+$/);
    assert.equal((await client('a', 'lookup', 'api.service.consul')).address, vip, 'Consul\'s name gives the same address');
    await until('api.knit:9001 through the mesh', async () => (await client('a', 'get', 'http://api.knit:9001/')).ok === true, 20_000, 250);
    const byName = await client('a', 'get', 'http://api.knit:9001/');
    assert.equal(byName.body, 'api saw 127.0.0.1', 'the application on B sees its local agent, not A');
    const byAddress = await client('a', 'get', `http://${addr('b')}:9001/`);
    assert.equal(byAddress.body, 'api saw 127.0.0.1', 'api\'s real address is carried by the mesh too');

    // On A's wire: TLS to B's HBONE port, never the request's plaintext.
    const pcap = join(dir, 'a.pcap');
    const dump = net.spawn('a', ['tcpdump', '-i', net.hosts.a!.device, '-U', '-w', pcap, 'tcp']);
    // Capturing once it says so (on stderr), not after a guess: a loaded machine may take more than a second.
    let said = '';
    dump.stderr!.on('data', (d: Buffer) => (said += d.toString()));
    await until('tcpdump listening', async () => /listening on/.test(said), 15_000, 50);
    const marker = `secret-${Date.now()}`;
    assert.equal((await client('a', 'get', `http://api.knit:9001/${marker}`)).ok, true);
    // tcpdump writes what the kernel queued for it only as it reads it: an interrupt right after the request could drop it.
    await until('tcpdump wrote the exchange', async () => ((await stat(pcap).catch(() => undefined))?.size ?? 0) > 200, 10_000, 50).catch(() => undefined);
    dump.kill('SIGINT');
    await new Promise((r) => dump.once('exit', r));
    const captured = await readFile(pcap);
    assert.ok(captured.length > 200, 'tcpdump saw the connection');
    assert.ok(!captured.includes(Buffer.from(marker)), 'the request is not on the wire in plaintext');
    assert.ok(!captured.includes(Buffer.from('api saw')), 'nor the reply');

    const ma = await fleet.metrics('a');
    assert.ok(metric(ma, 'knit_captured_connections_total', { direction: 'outbound', result: 'mesh' }) >= 3, 'A counted the captured connections');
    const mb = await fleet.metrics('b');
    assert.ok(metric(mb, 'knit_inbound_connections_total', { decision: 'allow', source: 'web', service: 'api' }) >= 3, 'B authorized each one as web');
  });

  test('a denied pair fails fast, and B names the rule', async () => {
    const r = await client('a', 'get', 'http://legacy.knit:9002/');
    assert.equal(r.ok, false);
    assert.ok(r.ms < 3000, `failed in ${r.ms} ms`);
    await until('B logged the denial with its rule', () => /denied web -> legacy: default \(deny\)/.test(fleet.output('b')), 10_000, 100);
  });

  test('the SSH port, an excluded CIDR and the agent\'s own uid bypass the proxy; with outbound: deny the rest is refused', async () => {
    assert.equal((await client('a', 'get', `http://${addr('b')}:22/`)).body, `ssh-b saw ${addr('a')}`, 'port 22 goes straight to B');
    assert.equal((await client('a', 'get', `http://${addr('c')}:80/`)).body, `c saw ${addr('a')}`, 'the excluded CIDR goes straight to C');
    const refused = await client('a', 'get', `http://${addr('b')}:8080/`);
    assert.equal(refused.ok, false, 'a destination outside the mesh is refused (outbound: deny)');
    assert.equal((await client('a', 'get', `http://${addr('b')}:8080/`, true)).body, `other-b saw ${addr('a')}`, 'the agent\'s uid is never captured');
    assert.match(fleet.output('a'), /not a mesh destination \(rule transparent\.outbound: deny\)/);
  });

  test('a permissive service accepts a client outside the mesh and knit check names it; a strict one refuses it', async () => {
    assert.equal((await client('c', 'get', `http://${addr('b')}:9002/`)).body, 'legacy saw 127.0.0.1', 'permissive: carried by B\'s agent');
    const strict = await client('c', 'get', `http://${addr('b')}:9001/`);
    assert.equal(strict.ok, false, 'strict: refused');
    const check = await net.run('b', [process.execPath, KNIT, 'check']);
    assert.match(check.stdout, new RegExp(`legacy is permissive \\(connect\\.inbound\\): plaintext callers in the last hour: ${addr('c').replace(/\./g, '\\.')} \\(1,`));
    const mb = await fleet.metrics('b');
    assert.equal(metric(mb, 'knit_inbound_unauthenticated_total', { service: 'legacy' }), 1);
    assert.ok(metric(mb, 'knit_inbound_connections_total', { decision: 'deny', service: 'api', source: 'unauthenticated' }) >= 1);
  });

  test('an intention change closes captured connections that are no longer allowed', async () => {
    const p = net.spawn('a', [...NOBODY, process.execPath, CLIENT, 'hold', 'http://api.knit:9001/']);
    let out = '';
    p.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    await until('connection open', () => out.includes('"open":true'), 15_000, 50);
    await writeFile(join(dir, 'deny.yaml'), 'default: deny\nintentions:\n  - { source: web, destination: api, action: deny }\n');
    assert.equal((await knit(['intention', 'apply', '-f', join(dir, 'deny.yaml')], cliEnv)).code, 0);
    await until('closed by the new intention', () => out.includes('"closed":true'), 15_000, 50);
    assert.equal((await client('a', 'get', 'http://api.knit:9001/')).ok, false, 'new connections are denied');
    assert.equal((await knit(['intention', 'apply', '-f', join(dir, 'allow.yaml')], cliEnv)).code, 0);
    await until('allowed again', async () => (await client('a', 'get', 'http://api.knit:9001/')).ok === true, 15_000, 250);
  });

  test('IPv6: the inbound capture carries a permissive service and refuses a strict one; outbound: deny refuses IPv6 outside the mesh', async () => {
    await until('B reachable over IPv6', async () => (await client('c', 'get', `http://[${v6('b')}]:22/`)).body === `ssh-b saw ${v6('c')}`, 10_000, 200);
    assert.equal((await client('c', 'get', `http://[${v6('b')}]:9002/`)).body, 'legacy saw 127.0.0.1', 'permissive over IPv6: carried by B\'s agent');
    assert.equal((await client('c', 'get', `http://[${v6('b')}]:9001/`)).ok, false, 'strict over IPv6: refused');
    assert.equal((await client('a', 'get', `http://[${v6('b')}]:8080/`)).ok, false, 'A refuses IPv6 outside the mesh (outbound: deny)');
    assert.equal((await client('a', 'get', `http://[${v6('b')}]:8080/`, true)).body, `other-b saw ${v6('a')}`, 'the agent\'s uid is not captured over IPv6 either');
  });

  test('SIGKILL of B\'s agent leaves SSH and non-mesh traffic working and mesh ports closed; a restart restores; a clean stop removes the rules', async () => {
    await fleet.stop('b', 'SIGKILL');
    assert.equal((await client('c', 'get', `http://${addr('b')}:22/`)).body, `ssh-b saw ${addr('c')}`, 'SSH reaches B');
    assert.equal((await client('b', 'get', `http://${addr('c')}:80/`)).body, `c saw ${addr('b')}`, 'B\'s applications reach non-mesh destinations');
    assert.equal((await client('c', 'get', `http://${addr('b')}:9001/`)).ok, false, 'a mesh service\'s port fails closed, not open in plaintext');
    assert.equal((await net.run('b', ['nft', 'list', 'table', 'inet', 'knit'])).code, 0, 'the rules are still there');

    await fleet.start('b');
    await until('permissive service carried again', async () => (await client('c', 'get', `http://${addr('b')}:9002/`)).body === 'legacy saw 127.0.0.1', 20_000, 250);

    await fleet.stop('b', 'SIGTERM');
    assert.notEqual((await net.run('b', ['nft', 'list', 'table', 'inet', 'knit'])).code, 0, 'a clean stop removed knit\'s table');
    assert.equal((await client('c', 'get', `http://${addr('b')}:9001/`)).body, `api saw ${addr('c')}`, 'with the rules gone the port is the application\'s own again');
  });
});
