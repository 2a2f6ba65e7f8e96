/**
 * The trust model end to end, tried as an attacker and as an operator
 * would: real `knit server` and `knit agent` processes on hosts made of
 * network namespaces, a real ZooKeeper. The control plane decides who may
 * be whom; an agent, a registry writer or a man in the middle proves, and
 * never asserts.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import https from 'node:https';
import { once } from 'node:events';
import { X509Certificate } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import zookeeper from 'node-zookeeper-client';
import { KNIT, ROOT, knit, start, freePort, type Proc } from './helpers/knit.js';
import { makeNet, netnsUnavailable, type TestNet } from './helpers/netns.js';
import { ensureZooKeeper, startZooKeeper, type ZkCluster } from './helpers/zookeeper.js';
import { FleetAgents } from './helpers/fleet.js';
import { until } from './helpers/wait.js';
import { crashProbe } from './helpers/probes.js';
import { CertificateAuthority, createCsr } from '../src/identity/ca.js';
import { serverId } from '../src/identity/spiffe.js';
import { keyFingerprint } from '../src/identity/signed-doc.js';

const missing = netnsUnavailable() ?? ensureZooKeeper();
/** Agent certificates live this long, so a test can watch one expire. */
const AGENT_TTL_S = 12;

let net: TestNet;
let zk: ZkCluster;
let dir: string;
let server: Proc;
let serverUrl: string;
let zkUrl: string;
let cliEnv: NodeJS.ProcessEnv;
let fleet: FleetAgents;
const apps: ChildProcess[] = [];

const cli = async (...args: string[]) => {
  const r = await knit(args, cliEnv);
  assert.equal(r.code, 0, `knit ${args.join(' ')}: ${r.stderr}`);
  return r.stdout.trim();
};
const token = (node: string, services: string) => cli('token', 'create', '--node', node, '--services', services, '--ttl', '10m');
const nodes = async () => JSON.parse(await cli('node', 'list', '--json')) as Array<{ node: string; services: string[]; keyFingerprint?: string; revokedAt?: string }>;

/** GET / through web's upstream on host A, from inside A. */
async function callApi(): Promise<string> {
  const r = await net.run('a', [process.execPath, '-e', "fetch('http://127.0.0.1:9191/',{signal:AbortSignal.timeout(3000)}).then(r=>r.text()).then(t=>process.stdout.write(t),()=>process.stdout.write('failed'))"]);
  return r.stdout;
}

async function configure(host: string, node: string, services: string, extra: string[] = []): Promise<void> {
  await fleet.configure(host, { node, registry: `${zkUrl}?session_timeout=2s`, server: serverUrl, advertise: net.hosts[host]!.address, extra: ['drain: 0s', ...extra] });
  await writeFile(join(fleet.home(host), 'join.token'), await token(node, services));
}

describe('trust: the control plane decides identity; agents, registry writers and men in the middle prove', { skip: missing && `cannot run: ${missing}` }, () => {
  before(async () => {
    net = makeNet(['a', 'b', 'c'], 78);
    dir = await mkdtemp(join(tmpdir(), 'knit-trust-'));
    zk = await startZooKeeper({ size: 1, host: net.bridgeAddress });
    zkUrl = `zk://${zk.connect}/knit`;
    const port = await freePort();
    serverUrl = `https://${net.bridgeAddress}:${port}`;
    const sdir = join(dir, 'server');
    await mkdir(sdir, { recursive: true });
    await writeFile(join(sdir, 'server.yaml'), `name: cp1\ndata_dir: ${join(sdir, 'data')}\nregistry: ${zkUrl}\nlisten: ${net.bridgeAddress}:${port}\nadvertise: [${net.bridgeAddress}]\nagent_ttl: ${AGENT_TTL_S}s\nleaf_ttl: 1m\n`);
    server = start([KNIT, 'server', '--config', join(sdir, 'server.yaml')]);
    await server.waitFor(/knit server ready/, 60_000);
    cliEnv = { KNIT_SERVER: serverUrl, KNIT_TOKEN_FILE: join(sdir, 'data', 'operator.token'), KNIT_CA_FILE: join(sdir, 'data', 'ca', 'root.pem') };
    fleet = new FleetAgents(net, dir);

    await configure('a', 'host-a', 'web');
    await configure('b', 'host-b', 'api');
    await writeFile(join(fleet.home('a'), 'services', 'web.json'), JSON.stringify({ service: { name: 'web', connect: { sidecar_service: { proxy: { upstreams: [{ destination_name: 'api', local_bind_port: 9191 }] } } } } }));
    await writeFile(join(fleet.home('b'), 'services', 'api.json'), JSON.stringify({ service: { name: 'api', port: 9001 } }));
    const api = net.spawn('b', [process.execPath, join(ROOT, 'examples/hello/api.mjs')]);
    apps.push(api);
    await new Promise((r) => api.stdout!.once('data', r));
    await fleet.start('b');
    await fleet.start('a');
    await cli('intention', 'allow', 'web', 'api');
    await until('web reaches api', async () => (await callApi()).includes('hello from api'), 20_000, 100);
  });

  after(async () => {
    fleet?.killAll();
    for (const a of apps) a.kill('SIGKILL');
    await server?.kill();
    await zk?.stop();
    net?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  test('a service the node is not allowed to run waits and says why; granting it starts it without a restart', async () => {
    await writeFile(join(fleet.home('b'), 'services', 'db.json'), JSON.stringify({ service: { name: 'db', port: 9003 } }));
    fleet.agents.b!.proc!.kill('SIGHUP');
    await until('db waiting', async () => /service db is not allowed on node host-b/.test((await fleet.state('b')).services.find((s) => s.name === 'db')?.waiting ?? ''), 10_000, 100);
    const check = await net.run('b', [process.execPath, KNIT, 'check']);
    assert.equal(check.code, 1);
    assert.match(check.stdout, /error db is not running: service db is not allowed on node host-b: knit node set host-b --services api,db/);
    assert.match(fleet.output('b'), /db waits for its certificate: .*service db is not allowed on node host-b/);
    assert.equal((await callApi()).includes('hello from api'), true, 'the other services keep running');
    const pid = fleet.agents.b!.proc!.pid;

    await cli('node', 'set', 'host-b', '--services', 'api,db');
    await until('db registered', async () => /db\s+1\/1 routable/.test(await cli('services')), 20_000, 200);
    assert.equal(fleet.agents.b!.proc!.pid, pid, 'no restart');
    assert.equal((await fleet.state('b')).services.find((s) => s.name === 'db')?.waiting, undefined);
  });

  test('a token holder cannot become an existing node, and a used token cannot be replayed', async () => {
    // A token for host-x, used by an agent that wants to be host-a.
    await fleet.configure('c', { node: 'host-a', registry: zkUrl, server: serverUrl, advertise: net.hosts.c!.address, extra: ['admin: 127.0.0.1:7711'] });
    await writeFile(join(fleet.home('c'), 'join.token'), await token('host-x', 'web'));
    const r = await fleet.startFailing('c');
    assert.notEqual(r.code, 0);
    assert.match(r.out, /this join token is for node host-x, but the agent asked to be host-a: set "node: host-x" in agent\.yaml/);
    // The same token again (it was not used: the server refused before using it), now honestly: it enrols host-x once...
    await fleet.configure('c', { node: 'host-x', registry: zkUrl, server: serverUrl, advertise: net.hosts.c!.address, extra: ['admin: 127.0.0.1:7711'] });
    await fleet.start('c');
    await fleet.stop('c');
    // ...and never again, even for a fresh host with an empty data dir.
    await rm(join(fleet.home('c'), 'data'), { recursive: true, force: true });
    const again = await fleet.startFailing('c');
    assert.match(again.out, /join token [0-9a-f]+: unknown or already used/);
    // host-a's record still holds host A's own key (A renews every few seconds here, rotating it, so compare live).
    const aCert = join(fleet.home('a'), 'data', 'agent', 'cert.pem');
    await until('host-a record names the key of host A', async () => {
      const fp = keyFingerprint(new X509Certificate(await readFile(aCert, 'utf8')).publicKey.export({ type: 'spki', format: 'pem' }).toString());
      return (await nodes()).find((n) => n.node === 'host-a')?.keyFingerprint === fp;
    }, 10_000, 100);
    await rm(join(fleet.home('c'), 'data'), { recursive: true, force: true });
  });

  test('an anonymous ZooKeeper client can read knit\'s tree but change nothing in it, at any depth', async () => {
    const client = zookeeper.createClient(zk.connect, { sessionTimeout: 2000 });
    client.connect();
    await once(client, 'connected');
    const call = <T>(fn: (cb: (e: unknown, v?: T) => void) => void) => new Promise<{ err?: number; v?: T }>((r) => fn((e, v) => r({ err: e ? (e as { getCode(): number }).getCode() : undefined, v })));
    const NO_AUTH = zookeeper.Exception.NO_AUTH;
    const apiInstances = (await call<string[]>((cb) => client.getChildren('/knit/services/api', cb))).v ?? [];
    assert.ok(apiInstances.length > 0, 'an instance to try');
    const paths = ['/knit', '/knit/kv', '/knit/kv/intentions', '/knit/kv/nodes', '/knit/services', '/knit/services/api', `/knit/services/api/${apiInstances[0]}`];
    for (const p of paths) {
      assert.equal((await call((cb) => client.create(`${p}/evil`, Buffer.from('x'), cb))).err, NO_AUTH, `create under ${p}`);
      assert.equal((await call((cb) => client.setData(p, Buffer.from('{"default":"allow","intentions":[]}'), -1, cb))).err, NO_AUTH, `set ${p}`);
      if (p !== '/knit') assert.equal((await call((cb) => client.remove(p, -1, cb))).err, NO_AUTH, `delete ${p}`);
      assert.equal((await call((cb) => client.setACL(p, [new zookeeper.ACL(zookeeper.Permission.ALL, new zookeeper.Id('world', 'anyone'))], -1, cb))).err, NO_AUTH, `setACL ${p}`);
    }
    assert.equal((await call<Buffer>((cb) => client.getData('/knit/kv/intentions', cb))).err, undefined, 'reads work');
    client.close();
    assert.ok((await callApi()).includes('hello from api'));
  });

  test('an intentions document written with the server\'s own registry credential but not signed is refused by agents', async () => {
    const auth = (await readFile(join(dir, 'server', 'data', 'registry-server.auth'), 'utf8')).trim();
    const client = zookeeper.createClient(zk.connect, { sessionTimeout: 2000 });
    client.addAuthInfo('digest', Buffer.from(auth));
    client.connect();
    await once(client, 'connected');
    const mark = fleet.output('b').length;
    // With the credential the write goes through: only the signature stands in the way.
    await new Promise<void>((resolve, reject) => client.setData('/knit/kv/intentions', Buffer.from('{"default":"deny","intentions":[]}'), -1, (e) => (e ? reject(new Error(String(e))) : resolve())));
    client.close();
    await until('B refused it', () => /refused intentions from the registry, keeping the last good one: intentions: not a signed document/.test(fleet.output('b', mark)), 10_000, 50);
    assert.match(await fleet.metrics('b'), /knit_registry_documents_refused_total\{kind="intentions"\} [1-9]/);
    assert.ok((await callApi()).includes('hello from api'), 'web -> api still allowed by the last good set');
    // The operator puts it right with a full apply, which writes over what it cannot verify.
    const file = join(dir, 'intentions.yaml');
    await writeFile(file, 'default: deny\nintentions:\n  - { source: web, destination: api, action: allow }\n');
    await cli('intention', 'apply', '-f', file);
    await until('B applied the signed set', () => /"event":"intentions.changed".*"signer":"spiffe:\/\/[^"]+\/server\/cp1"/.test(fleet.output('b', mark)), 10_000, 50);
  });

  test('enrolment through a man in the middle who returns [real root, own root] gives away no token and trusts nothing new', async () => {
    const realRoot = await readFile(join(dir, 'server', 'data', 'ca', 'root.pem'), 'utf8');
    const td = new X509Certificate(realRoot).subjectAltName!.replace(/^URI:spiffe:\/\//, '');
    const evil = await CertificateAuthority.create(td);
    const id = serverId(td, 'cp1');
    const { keyPem, csrPem } = await createCsr(id);
    const leaf = await evil.signCsr(csrPem, id, { extraNames: [net.bridgeAddress] });
    const seen: string[] = [];
    const mitm = https.createServer({ cert: leaf.certPem, key: keyPem }, (req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString()));
      req.on('end', () => {
        seen.push(`${req.method} ${req.url} ${body}`);
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify(req.url === '/v1/ca/roots' ? { trustDomain: td, roots: [realRoot, evil.rootPem] } : { cert: 'x' }));
      });
    });
    mitm.listen(0, net.bridgeAddress);
    await once(mitm, 'listening');
    const mitmUrl = `https://${net.bridgeAddress}:${(mitm.address() as { port: number }).port}`;
    const tok = await token('host-m', 'web');
    await fleet.configure('c', { node: 'host-m', registry: zkUrl, server: mitmUrl, advertise: net.hosts.c!.address, extra: ['admin: 127.0.0.1:7711'] });
    await writeFile(join(fleet.home('c'), 'join.token'), tok);
    const r = await fleet.startFailing('c');
    mitm.close();
    assert.notEqual(r.code, 0);
    assert.match(r.out, /presented a certificate that does not chain to the pinned trust root/);
    assert.deepEqual(seen.filter((x) => !x.startsWith('GET /v1/ca/roots')), [], 'nothing but the public roots was asked of the impostor');
    assert.ok(!seen.some((x) => x.includes(tok.split('.')[2]!)), 'the token secret never reached it');
    await assert.rejects(stat(join(fleet.home('c'), 'data', 'agent')), 'nothing was stored');
    // The token was never used: the real server still takes it.
    await fleet.configure('c', { node: 'host-m', registry: zkUrl, server: serverUrl, advertise: net.hosts.c!.address, extra: ['admin: 127.0.0.1:7711'] });
    await fleet.start('c');
    await fleet.stop('c');
    await rm(join(fleet.home('c'), 'data'), { recursive: true, force: true });
  });

  test('a host that was off longer than its certificate rejoins by itself; after revocation it cannot', async (t) => {
    await configure('c', 'host-c', 'cache', ['admin: 127.0.0.1:7711']);
    await writeFile(join(fleet.home('c'), 'services', 'cache.json'), JSON.stringify({ service: { name: 'cache', port: 9002 } }));
    await fleet.start('c');
    await fleet.stop('c');
    // "Off" past its certificate, and without the join token it came with.
    await rm(join(fleet.home('c'), 'join.token'));
    const certFile = join(fleet.home('c'), 'data', 'agent', 'cert.pem');
    const expires = Date.parse(new X509Certificate(await readFile(certFile, 'utf8')).validTo);
    await until('certificate expired', () => Date.now() > expires + 500, AGENT_TTL_S * 1000 + 5000, 200);
    const out = await fleet.start('c');
    assert.match(out, /rejoined with its recorded key/);
    t.diagnostic(`agent certificate ${AGENT_TTL_S} s, host off until it expired: rejoined without a token`);
    await until('cache registered', async () => /cache\s+1\/1 routable/.test(await cli('services')), 10_000, 200);

    const mark = fleet.output('c').length;
    await cli('node', 'revoke', 'host-c');
    assert.equal((await nodes()).find((n) => n.node === 'host-c')?.revokedAt !== undefined, true);
    await until('its registrations are gone', async () => !/cache/.test(await cli('services')), 10_000, 200);
    await until('the agent knows', () => /this node \(host-c\) was revoked by the control plane/.test(fleet.output('c', mark)), 10_000, 100);
    await fleet.stop('c');
    const expires2 = Date.parse(new X509Certificate(await readFile(certFile, 'utf8')).validTo);
    await until('certificate expired again', () => Date.now() > expires2 + 500, AGENT_TTL_S * 1000 + 5000, 200);
    const r = await fleet.startFailing('c');
    assert.notEqual(r.code, 0);
    assert.match(r.out, /node host-c was revoked at .*; it needs a new token \(knit token create --node host-c --services cache\)/);
  });

  test('garbage requests crash neither the server API nor an agent\'s admin API', async (t) => {
    const s = await crashProbe({ host: net.bridgeAddress, port: Number(new URL(serverUrl).port), tls: true });
    t.diagnostic(`server API: ${s.sent} probes, ${s.answered} answered`);
    assert.equal(server.child.exitCode, null, 'knit server still running');
    assert.equal((await knit(['node', 'list'], cliEnv)).code, 0, 'and serving');
    const r = await net.run('a', [process.execPath, '--import', 'tsx', join(ROOT, 'test', 'helpers', 'probe-cli.ts'), '127.0.0.1', '7701']);
    assert.equal(r.code, 0, r.stderr);
    t.diagnostic(`agent admin API: ${r.stdout.trim()}`);
    assert.equal(fleet.agents.a!.proc!.exitCode, null, 'agent A still running');
    assert.ok((await callApi()).includes('hello from api'), 'and its proxies still serve');
  });
});
