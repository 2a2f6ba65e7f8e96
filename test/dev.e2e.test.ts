/**
 * `knit dev` end to end: a real knit process, the example apps, real
 * sockets and real certificates. Proves the one-host mesh as a user meets it.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat, writeFile, unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import http from 'node:http';
import http2 from 'node:http2';
import { once } from 'node:events';
import { request } from 'undici';
import { start, knit, freePort, ROOT, KNIT, type Proc } from './helpers/knit.js';
import { until } from './helpers/wait.js';
import { CertificateAuthority, createCsr } from '../src/identity/ca.js';
import { serviceId } from '../src/identity/spiffe.js';

let dataDir: string;
let configDir: string;
let adminUrl: string;
let adminAddr: string;
let dev: Proc;
let ports: { api: number; web: number; upstream: number };
const apps: Proc[] = [];
const admin = (): string[] => ['--admin', adminUrl];

async function startDev(): Promise<Proc> {
  const p = start([KNIT, 'dev', '--config-dir', configDir, '--data-dir', dataDir, '--admin-addr', adminAddr, '--hbone-port', '0'], { KNIT_LOG_LEVEL: 'info' });
  await p.waitFor(/knit dev ready/);
  return p;
}

/** GET web's front page; resolves with status and body. */
async function callWeb(): Promise<{ status: number; body: string }> {
  const r = await request(`http://127.0.0.1:${ports.web}/`, { signal: AbortSignal.timeout(10_000) });
  return { status: r.statusCode, body: await r.body.text() };
}

async function state(): Promise<{ trustDomain: string; hbonePort: number; services: Array<{ name: string; port: number; health: string }> }> {
  return (await request(`${adminUrl}/v1/state`)).body.json() as never;
}

async function metric(line: RegExp): Promise<number> {
  const text = await (await request(`${adminUrl}/metrics`)).body.text();
  const m = text.split('\n').find((l) => line.test(l));
  return m ? Number(m.split(' ').pop()) : 0;
}

before(async () => {
  dataDir = await mkdtemp(join(tmpdir(), 'knit-e2e-data-'));
  configDir = await mkdtemp(join(tmpdir(), 'knit-e2e-conf-'));
  // The example's services and apps, moved to free ports so that the test runs beside anything else (a second npm run hello).
  ports = { api: await freePort(), web: await freePort(), upstream: await freePort() };
  const moved = (text: string) => text.replace(/9001/g, String(ports.api)).replace(/8080/g, String(ports.web)).replace(/9191/g, String(ports.upstream));
  for (const f of ['api.yaml', 'web.json']) await writeFile(join(configDir, f), moved(await readFile(join(ROOT, 'examples/hello/services', f), 'utf8')));
  adminAddr = `127.0.0.1:${await freePort()}`;
  adminUrl = `http://${adminAddr}`;
  const env = { API_PORT: String(ports.api), WEB_PORT: String(ports.web), API_UPSTREAM: `http://127.0.0.1:${ports.upstream}/` };
  for (const app of ['api.mjs', 'web.mjs']) {
    const p = start([join(ROOT, 'examples/hello', app)], env);
    apps.push(p);
    await p.waitFor(/listening/);
  }
  dev = await startDev();
  const applied = await knit(['intention', 'apply', '-f', join(ROOT, 'examples/hello/intentions.yaml'), ...admin()]);
  assert.equal(applied.code, 0, applied.stderr);
  await until('both services passing', async () => (await state()).services.every((s) => s.health === 'passing'), 15_000);
});

after(async () => {
  await dev?.stop();
  for (const a of apps) await a.stop();
  await rm(dataDir, { recursive: true, force: true });
  await rm(configDir, { recursive: true, force: true });
});

test('web reaches api through the mesh over mTLS, and the decision names the intention', async () => {
  const r = await callWeb();
  assert.equal(r.status, 200);
  assert.match(r.body, /hello from api/);
  assert.ok((await metric(/^knit_inbound_connections_total\{.*decision="allow".*rule="intention web -> api \(allow\)".*service="api".*source="web"/)) >= 1);
  const check = await knit(['intention', 'check', 'web', 'api', ...admin()]);
  assert.equal(check.stdout.trim(), 'allowed: web -> api by intention web -> api (allow)');
  const other = await knit(['intention', 'check', 'db', 'api', ...admin()]);
  assert.equal(other.stdout.trim(), 'denied: db -> api by default (deny)');
});

test('knit intention deny closes an open connection and the next call fails at once', async () => {
  // An open keep-alive connection through web's upstream listener, as the web app would hold.
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const get = () => new Promise<number>((resolve, reject) => http.get(`http://127.0.0.1:${ports.upstream}/`, { agent }, (res) => { res.resume(); res.on('end', () => resolve(res.statusCode ?? 0)); }).on('error', reject));
  assert.equal(await get(), 200);
  const sock = Object.values(agent.freeSockets)[0]?.[0];
  assert.ok(sock, 'a kept-alive socket');
  // A denial resets the connection (an error, then the close): wait for the close.
  const closed = new Promise((r) => sock.once('close', r));
  sock.on('error', () => undefined);

  const denied = await knit(['intention', 'deny', 'web', 'api', ...admin()]);
  assert.equal(denied.code, 0, denied.stderr);
  await Promise.race([closed, until('open connection closed', () => false, 5000)]);

  const t0 = Date.now();
  const r = await callWeb();
  assert.equal(r.status, 502);
  assert.ok(Date.now() - t0 < 1000, `failed in ${Date.now() - t0} ms`);
  assert.ok((await metric(/^knit_inbound_closed_by_policy_total\{.*rule="intention web -> api \(deny\)"/)) >= 1);
  agent.destroy();

  assert.equal((await knit(['intention', 'allow', 'web', 'api', ...admin()])).code, 0);
  await until('allowed again', async () => (await callWeb()).status === 200);
});

test('the HBONE port refuses no certificate, another CA, an expired certificate, and a service without intention', async () => {
  const st = await state();
  const apiPort = st.services.find((s) => s.name === 'api')!.port;
  const ca = await CertificateAuthority.load({ certPem: await readFile(join(dataDir, 'ca/root.pem'), 'utf8'), keyPem: await readFile(join(dataDir, 'ca/root.key'), 'utf8') });
  const leaf = async (signer: CertificateAuthority, service: string, now?: Date) => {
    const id = serviceId(ca.trustDomain, service);
    const { keyPem, csrPem } = await createCsr(id);
    return { key: keyPem, cert: (await signer.signCsr(csrPem, id, { now })).certPem };
  };
  /** An HBONE client: TLS to api (SNI), one CONNECT stream to api's port, a request; 'served' if api answered. */
  const attempt = async (creds: { key?: string; cert?: string }): Promise<'served' | 'refused'> => {
    const s = tls.connect({ host: '127.0.0.1', port: st.hbonePort, ca: ca.rootPem, checkServerIdentity: () => undefined, servername: `api.default.svc.${ca.trustDomain}`, ALPNProtocols: ['h2'], ...creds });
    s.on('error', () => undefined);
    try {
      await once(s, 'secureConnect');
      if (s.destroyed) return 'refused';
      const session = http2.connect(`https://127.0.0.1:${st.hbonePort}`, { createConnection: () => s });
      session.on('error', () => undefined);
      const got = await new Promise<string>((resolve) => {
        // A connection the server refuses may die before the session notices: its socket's close ends the wait.
        s.once('close', () => resolve('closed'));
        const stream = session.request({ ':method': 'CONNECT', ':authority': `127.0.0.1:${apiPort}` });
        let body = '';
        stream.on('response', (h) => {
          if (h[':status'] !== 200) return resolve(`status ${h[':status']}`);
          stream.write('GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n');
        });
        stream.on('data', (d: Buffer) => (body += d.toString()));
        // The app answers and closes its side: the stream's end (half-close) is the answer's end.
        stream.on('end', () => resolve(body));
        stream.on('close', () => resolve(body));
        stream.on('error', () => undefined);
        session.on('close', () => resolve(body));
      });
      session.destroy();
      return /hello from api/.test(got) ? 'served' : 'refused';
    } catch {
      return 'refused';
    } finally {
      s.destroy();
    }
  };
  const rejected = (reason: string) => metric(new RegExp(`^knit_inbound_rejected_total\\{reason="${reason}",service="api"\\}`));

  assert.equal(await attempt({}), 'refused');
  await until('no-cert refusal counted', async () => (await rejected('no client certificate')) >= 1);

  const foreign = await CertificateAuthority.create(ca.trustDomain);
  assert.equal(await attempt(await leaf(foreign, 'web')), 'refused');
  await until('foreign CA refusal counted', async () => (await rejected('client certificate not signed by the trust bundle')) >= 1);

  assert.equal(await attempt(await leaf(ca, 'web', new Date(Date.now() - 3 * 24 * 3600e3))), 'refused');
  await until('expired refusal counted', async () => (await rejected('client certificate expired')) >= 1);

  assert.equal(await attempt(await leaf(ca, 'db')), 'refused');
  await until('db denial counted', async () => (await metric(/^knit_inbound_connections_total\{decision="deny",rule="default \(deny\)",service="api",source="db"\}/)) >= 1);

  // The same route with a valid web certificate is served: the refusals above are about the certificates.
  assert.equal(await attempt(await leaf(ca, 'web')), 'served');
});

test('a bad service file is refused with the file named; running services keep running', async () => {
  const bad = join(configDir, 'zz-bad.json');
  await writeFile(bad, '{ "service": {\n  "name": "cache",\n  "port": 99999\n} }\n');
  try {
    const v = await knit(['validate', configDir]);
    assert.equal(v.code, 1);
    assert.match(v.stderr, new RegExp(`${bad.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:3: service\\.port: .*port out of range`));

    const other = await mkdtemp(join(tmpdir(), 'knit-e2e-bad-'));
    const refused = await knit(['dev', '--config-dir', configDir, '--data-dir', other, '--admin-addr', `127.0.0.1:${await freePort()}`, '--hbone-port', '0']);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /zz-bad\.json:3: service\.port/);
    assert.match(refused.stderr, /knit: refusing to start: 1 problem/);
    await rm(other, { recursive: true, force: true });

    // SIGHUP on the running knit dev: reload refused, services kept.
    dev.child.kill('SIGHUP');
    await dev.waitFor(/reload refused[\s\S]*zz-bad\.json:3/);
    const r = await request(`${adminUrl}/v1/agent/reload`, { method: 'POST' });
    assert.equal(r.statusCode, 400);
    const body = (await r.body.json()) as { problems: Array<{ file: string; line: number; field: string }> };
    assert.deepEqual(body.problems.map((p) => [p.file, p.line, p.field]), [[bad, 3, 'service.port']]);
    assert.equal((await callWeb()).status, 200);
    assert.deepEqual((await state()).services.map((s) => s.name).sort(), ['api', 'web']);
  } finally {
    await unlink(bad);
  }
});

test('SIGKILL and restart keep the CA, the trust domain and the intentions', async () => {
  assert.equal((await stat(join(dataDir, 'ca/root.key'))).mode & 0o777, 0o600, 'CA key is 0600');
  assert.equal((await stat(join(dataDir, 'registry/kv.json'))).mode & 0o777, 0o600);
  const rootsBefore = await knit(['ca', 'roots', ...admin()]);
  const tdBefore = (await state()).trustDomain;
  assert.equal((await knit(['intention', 'deny', '*', 'web', ...admin()])).code, 0);
  const listBefore = (await knit(['intention', 'list', ...admin()])).stdout;
  assert.match(listBefore, /\* -> web: deny/);

  await dev.kill();
  dev = await startDev();
  assert.equal((await state()).trustDomain, tdBefore);
  assert.equal((await knit(['ca', 'roots', ...admin()])).stdout, rootsBefore.stdout);
  assert.equal((await knit(['intention', 'list', ...admin()])).stdout, listBefore);
  assert.match(dev.stdout(), /default intention is deny/);
  await until('services healthy after restart', async () => (await state()).services.every((s) => s.health === 'passing'), 15_000);
  await until('web reaches api after restart', async () => (await callWeb()).status === 200, 10_000);
  assert.equal((await knit(['intention', 'delete', '*', 'web', ...admin()])).code, 0);
});
