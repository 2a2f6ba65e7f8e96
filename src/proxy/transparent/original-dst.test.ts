/**
 * originalDestination() against real netfilter: a network namespace with
 * nft NAT REDIRECT rules sends connections for ports 9999 and 8443 to a
 * listener on 15001 (test/helpers/original-dst-probe.ts, run inside the
 * namespace), which must recover exactly the address and port each
 * connection was made to, for IPv4, IPv4 on a dual-stack socket, IPv6, and
 * traffic arriving from outside (prerouting). Connections made straight to
 * 15001, and sockets in a namespace with no NAT at all, must come back as
 * values with their reason. Needs root, iproute2 and nft (installed with
 * apt-get when missing); subnet 10.231.80.0/24 is this file's.
 */
import { after, before, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import { join } from 'node:path';
import { ROOT } from '../../../test/helpers/knit.js';
import { makeNet, netnsUnavailable, type TestNet } from '../../../test/helpers/netns.js';
import { Recorder } from '../../../test/helpers/wait.js';
import type { ProbeRecord } from '../../../test/helpers/original-dst-probe.js';
import { ADDON_FILE, loadAddon, notRedirected, originalDestination, packageRoot } from './original-dst.js';

const PROBE = join(ROOT, 'test', 'helpers', 'original-dst-probe.ts');
const SUBNET = 80;
const CAPTURE = 15001;
const V6 = { host: 'fd00:231:80::11', peer: 'fd00:231:80::200', gateway: 'fd00:231:80::1' };

/** The redirect rules, once per family: output for the namespace's own connections, prerouting for arriving ones. */
const RULES = ['ip', 'ip6']
  .map(
    (family) => `table ${family} knit_original_dst {
  chain output { type nat hook output priority -100; policy accept; tcp dport { 9999, 8443 } redirect to :${CAPTURE}; }
  chain prerouting { type nat hook prerouting priority -100; policy accept; tcp dport { 9999, 8443 } redirect to :${CAPTURE}; }
}`,
  )
  .join('\n');

let net_: TestNet | undefined;
/** Why the netfilter tests cannot run here, when they cannot. */
let unavailable: string | undefined;
/** Why the IPv6 test cannot run here, when only it cannot. */
let noIPv6: string | undefined;

/** Installs nftables when `nft` is missing; returns why it is still missing, or undefined. */
function ensureNft(): string | undefined {
  const have = (): boolean => {
    try {
      execFileSync('nft', ['--version'], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  };
  if (have()) return undefined;
  try {
    execFileSync('apt-get', ['update'], { stdio: 'ignore', timeout: 300_000 });
    execFileSync('apt-get', ['install', '-y', '--no-install-recommends', 'nftables'], { stdio: 'ignore', timeout: 300_000, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  } catch (e) {
    return `nft is missing and apt-get install nftables failed: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`;
  }
  return have() ? undefined : 'nft is missing and apt-get install nftables did not provide it';
}

before(() => {
  const addon = loadAddon();
  unavailable = netnsUnavailable() ?? ('error' in addon ? addon.error : undefined) ?? ensureNft();
  if (unavailable) return;
  const n = (net_ = makeNet(['cap', 'plain'], SUBNET));
  const cap = n.hosts.cap!;
  const inCap = (...args: string[]): string => execFileSync('ip', ['-n', cap.ns, ...args], { encoding: 'utf8' });
  // A default route, so that connections to addresses outside the subnet
  // are routed at all (and then redirected before they would leave).
  inCap('route', 'add', 'default', 'via', n.bridgeAddress);
  execFileSync('ip', ['netns', 'exec', cap.ns, 'nft', '-f', '-'], { input: RULES, encoding: 'utf8' });
  try {
    // nodad: usable at once, instead of after duplicate address detection.
    inCap('-6', 'addr', 'add', `${V6.host}/64`, 'dev', cap.device, 'nodad');
    inCap('-6', 'route', 'add', 'default', 'via', V6.gateway, 'dev', cap.device);
  } catch (e) {
    noIPv6 = `IPv6 is not usable in a network namespace here: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`;
  }
});

after(() => net_?.cleanup());

/** Skips `t` with the reason the netfilter tests cannot run, and says whether it did. */
function skipped(t: TestContext, also?: string): boolean {
  const why = unavailable ?? also;
  if (why) t.skip(why);
  return why !== undefined;
}

/** Runs the probe in `host`'s namespace, listening on `listen`, connecting to each target; returns what it saw of each. */
async function probe(host: string, listen: string, targets: string[]): Promise<Map<string, ProbeRecord>> {
  const r = await net_!.run(host, [process.execPath, '--import', 'tsx', PROBE, listen, String(CAPTURE), ...targets]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { target?: string; seen?: ProbeRecord; connectError?: string });
  const seen = new Map<string, ProbeRecord>();
  for (const l of lines) {
    if (l.target === undefined) continue;
    assert.ok(l.seen, `${l.target}: ${l.connectError}`);
    seen.set(l.target, l.seen);
  }
  assert.deepEqual([...seen.keys()], targets, r.stdout + r.stderr);
  return seen;
}

test('a socket without a descriptor is an error value, not a throw', () => {
  const r = originalDestination(new net.Socket());
  assert.ok('error' in r);
  assert.match(r.error, /no file descriptor/);
});

test('an addon that cannot be loaded comes back as how to build it', () => {
  const r = loadAddon('/nonexistent/knit');
  assert.ok('error' in r);
  assert.match(r.error, /original_dst\.node/);
  assert.match(r.error, /npm rebuild/);
  assert.match(r.error, /scripts\/install\.sh/);
  const server = net.createServer();
  // The error reaches originalDestination()'s caller as it is.
  return new Promise<void>((resolve, reject) => {
    server.listen(0, '127.0.0.1', () => {
      const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
      server.once('connection', (s) => {
        try {
          assert.deepEqual(originalDestination(s, () => r), r);
          resolve();
        } catch (e) {
          reject(e instanceof Error ? e : new Error(String(e)));
        } finally {
          s.destroy();
          client.destroy();
          server.close();
        }
      });
    });
  });
});

test('the package root is found from src/ and from dist/ alike', () => {
  assert.equal(packageRoot(join(ROOT, 'src', 'proxy', 'transparent')), ROOT);
  assert.equal(packageRoot(join(ROOT, 'dist', 'proxy', 'transparent')), ROOT);
  assert.equal(packageRoot('/'), undefined);
  assert.ok(ADDON_FILE.endsWith('original_dst.node'));
});

test('notRedirected compares with the socket\'s own address, however it is spelled', () => {
  const sock = (localAddress: string, localPort: number): net.Socket => ({ localAddress, localPort }) as net.Socket;
  assert.equal(notRedirected(sock('127.0.0.1', 15001), { address: '127.0.0.1', port: 15001 }), true);
  assert.equal(notRedirected(sock('::ffff:127.0.0.1', 15001), { address: '127.0.0.1', port: 15001 }), true);
  assert.equal(notRedirected(sock('fd00:0:0::1', 15001), { address: 'FD00::0001', port: 15001 }), true);
  assert.equal(notRedirected(sock('::1', 15001), { address: '0:0:0:0:0:0:0:1', port: 15001 }), true);
  assert.equal(notRedirected(sock('127.0.0.1', 15001), { address: '127.0.0.1', port: 9999 }), false);
  assert.equal(notRedirected(sock('127.0.0.1', 15001), { address: '10.0.0.1', port: 15001 }), false);
  assert.equal(notRedirected(sock('fd00::1', 15001), { address: 'fd00::1:0', port: 15001 }), false);
  assert.equal(notRedirected({} as net.Socket, { address: '127.0.0.1', port: 15001 }), false);
});

test('IPv4: a redirected connection recovers exactly the address and port it was made to', async (t) => {
  if (skipped(t)) return;
  const seen = await probe('cap', '0.0.0.0', ['10.231.80.200:9999', '203.0.113.9:8443', `127.0.0.1:${CAPTURE}`]);
  assert.deepEqual(seen.get('10.231.80.200:9999')!.dst, { address: '10.231.80.200', port: 9999, family: 4 });
  assert.deepEqual(seen.get('203.0.113.9:8443')!.dst, { address: '203.0.113.9', port: 8443, family: 4 });
  assert.equal(seen.get('203.0.113.9:8443')!.notRedirected, false);
  // Made straight to the capture port: conntrack answers with the port itself.
  const direct = seen.get(`127.0.0.1:${CAPTURE}`)!;
  assert.deepEqual(direct.dst, { address: '127.0.0.1', port: CAPTURE, family: 4 });
  assert.equal(direct.notRedirected, true);
});

test('IPv4 on a dual-stack listener (::ffff:a.b.c.d) asks the IPv4 option', async (t) => {
  if (skipped(t)) return;
  const seen = await probe('cap', '::', ['203.0.113.9:8443', `127.0.0.1:${CAPTURE}`]);
  const redirected = seen.get('203.0.113.9:8443')!;
  assert.equal(redirected.localFamily, 'IPv6');
  assert.equal(redirected.local, '::ffff:127.0.0.1');
  assert.deepEqual(redirected.dst, { address: '203.0.113.9', port: 8443, family: 4 });
  assert.equal(redirected.notRedirected, false);
  assert.equal(seen.get(`127.0.0.1:${CAPTURE}`)!.notRedirected, true);
});

test('IPv4 arriving from outside (prerouting) recovers the address it was sent to', async (t) => {
  if (skipped(t)) return;
  const cap = net_!.hosts.cap!;
  const p = net_!.spawn('cap', [process.execPath, '--import', 'tsx', PROBE, '::', String(CAPTURE)]);
  try {
    const records = new Recorder<{ listening?: number } & Partial<ProbeRecord>>();
    let buf = '';
    let err = '';
    p.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    p.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      for (let i = buf.indexOf('\n'); i !== -1; i = buf.indexOf('\n')) {
        records.push(JSON.parse(buf.slice(0, i)) as ProbeRecord);
        buf = buf.slice(i + 1);
      }
    });
    p.on('exit', (code) => records.push({ listening: -1, local: `probe exited ${code}: ${err}` }));
    const ready = await records.next('the probe to listen', (r) => r.listening !== undefined, 30_000);
    assert.equal(ready.listening, CAPTURE, ready.local);
    const client = net.connect(9999, cap.address);
    await once(client, 'connect');
    const mine = client.localPort;
    const r = await records.next('the probe to see our connection', (v) => v.remotePort === mine);
    client.destroy();
    assert.equal(r.remote, `::ffff:${net_!.bridgeAddress}`);
    assert.deepEqual(r.dst, { address: cap.address, port: 9999, family: 4 });
    assert.equal(r.notRedirected, false);
  } finally {
    p.kill('SIGTERM');
    if (p.exitCode === null) await once(p, 'exit');
  }
});

test('IPv6: a redirected connection recovers the IPv6 address and port it was made to', async (t) => {
  if (skipped(t, noIPv6)) return;
  const seen = await probe('cap', '::', [`[${V6.peer}]:9999`, '[2001:db8::9]:8443', `[::1]:${CAPTURE}`]);
  assert.deepEqual(seen.get(`[${V6.peer}]:9999`)!.dst, { address: V6.peer, port: 9999, family: 6 });
  const far = seen.get('[2001:db8::9]:8443')!;
  assert.equal(far.localFamily, 'IPv6');
  assert.deepEqual(far.dst, { address: '2001:db8::9', port: 8443, family: 6 });
  assert.equal(far.notRedirected, false);
  const direct = seen.get(`[::1]:${CAPTURE}`)!;
  assert.deepEqual(direct.dst, { address: '::1', port: CAPTURE, family: 6 });
  assert.equal(direct.notRedirected, true);
});

test('with no NAT in the namespace, an accepted socket is an error value naming the reason', async (t) => {
  if (skipped(t)) return;
  const seen = await probe('plain', '0.0.0.0', [`127.0.0.1:${CAPTURE}`, `${net_!.hosts.plain!.address}:${CAPTURE}`]);
  for (const [target, r] of seen) {
    assert.ok('error' in r.dst, `${target}: ${JSON.stringify(r.dst)}`);
    assert.match(r.dst.error, /^SO_ORIGINAL_DST: .* \(ENOENT\): the connection was not redirected$/, target);
    assert.equal(r.notRedirected, undefined);
  }
});
