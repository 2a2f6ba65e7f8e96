/**
 * For tests of the data plane: two real node proxies on 127.0.0.1, as two
 * hosts would run them. Host "a" runs `web` with an upstream to `api`;
 * host "b" runs `api` in front of an application the test provides.
 * Certificates are made by code; the intentions are the test's to change.
 * Traffic from a to b rides real HBONE tunnels (HTTP/2 CONNECT over mTLS).
 */
import net from 'node:net';
import tls from 'node:tls';
import http2 from 'node:http2';
import { Duplex } from 'node:stream';
import { once } from 'node:events';
import { pino, type Logger } from 'pino';
import { NodeProxy, type NodeProxyOptions } from '../../src/proxy/node-proxy.js';
import type { Upstream } from '../../src/proxy/accept/upstream.js';
import { Metrics } from '../../src/log/metrics.js';
import { compile, type Evaluator, type IntentionSet } from '../../src/policy/intentions.js';
import type { Instance } from '../../src/registry/registry.js';
import { makePki, type TestPki } from './pki.js';
import { sniFor } from '../../src/proxy/hbone/wire.js';

/** A log line as pino writes it. */
export interface LogLine {
  level: number;
  event?: string;
  msg: string;
  reason?: string;
  [k: string]: unknown;
}

/** A real pino logger whose lines are kept in `lines` (nothing is written anywhere). */
export function captureLog(): { log: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const log = pino({ level: 'debug', base: undefined }, { write: (s: string) => void lines.push(JSON.parse(s) as LogLine) });
  return { log, lines };
}

/** A TCP server on 127.0.0.1:0; resolves once listening. */
export async function listen(onConnection: (s: net.Socket) => void, opts: net.ServerOpts = {}): Promise<{ server: net.Server; port: number }> {
  const server = net.createServer(opts, onConnection);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { server, port: (server.address() as net.AddressInfo).port };
}

/** Connects to 127.0.0.1:`port`; resolves once connected. */
export async function dial(port: number, opts: Partial<net.TcpNetConnectOpts> = {}): Promise<net.Socket> {
  const s = net.connect({ host: '127.0.0.1', port, ...opts });
  await once(s, 'connect');
  return s;
}

/** Everything a socket receives until it closes, and the error that ended it, if any. */
export function readAll(s: net.Socket): Promise<{ data: string; error?: string }> {
  return new Promise((resolve) => {
    let data = '';
    let error: string | undefined;
    s.on('data', (d: Buffer) => (data += d.toString()));
    s.on('error', (e: Error & { code?: string }) => (error = e.code ?? e.message));
    s.on('close', () => resolve({ data, error }));
  });
}

/** One host of the pair. */
export interface Host {
  proxy: NodeProxy;
  metrics: Metrics;
  log: Logger;
  lines: LogLine[];
}

export interface Mesh {
  pki: TestPki;
  a: Host;
  b: Host;
  /** web's upstream to api on host a. */
  upstream: Upstream;
  upstreamPort: number;
  /** api's instance as host a routes to it. */
  api: Instance;
  /** Replaces the intentions on both hosts and lets both re-decide open flows. */
  setIntentions(set: IntentionSet): void;
  /** The intentions in force (for more hosts: `startApiHost`). */
  policy(): Evaluator;
  close(): Promise<void>;
}

/** `web -> api` allowed, everything else denied. */
export const WEB_TO_API: IntentionSet = { defaultAction: 'deny', intentions: [{ source: 'web', destination: 'api', action: 'allow' }] };

/**
 * Starts host a (web, upstream to api) and host b (api in front of
 * 127.0.0.1:`appPort`, registered with port `apiPort`, default the app's).
 */
export async function startMesh(appPort: number, opts: { apiPort?: number; a?: Partial<NodeProxyOptions>; b?: Partial<NodeProxyOptions>; pki?: TestPki; intentions?: IntentionSet } = {}): Promise<Mesh> {
  const pki = opts.pki ?? (await makePki());
  let ev: Evaluator = compile(opts.intentions ?? WEB_TO_API);
  const host = (node: string, extra: Partial<NodeProxyOptions> = {}): Host => {
    const { log, lines } = captureLog();
    const metrics = new Metrics();
    const proxy = new NodeProxy({ node, trustDomain: pki.trustDomain, listenHost: '127.0.0.1', hbonePort: 0, advertise: '127.0.0.1', policy: () => ev, log, metrics, ...extra });
    return { proxy, metrics, log, lines };
  };
  const a = host('a', opts.a);
  const b = host('b', opts.b);
  await a.proxy.start();
  await b.proxy.start();
  const apiPort = opts.apiPort ?? appPort;
  b.proxy.setService('b/api', { name: 'api', port: apiPort, target: { host: '127.0.0.1', port: appPort } });
  b.proxy.setServiceTls('api', await pki.leaf('api'));
  a.proxy.setService('a/web', { name: 'web', port: 0 });
  a.proxy.setServiceTls('web', await pki.leaf('web'));
  const upstream = await a.proxy.addUpstream({ source: 'web', destination: 'api', listenHost: '127.0.0.1', listenPort: 0 });
  const api: Instance = { id: 'b/api', service: 'api', node: 'b', address: '127.0.0.1', port: apiPort, hbonePort: b.proxy.hbonePort, tags: [], meta: {}, health: 'passing' };
  upstream.setEndpoints([api]);
  return {
    pki,
    a,
    b,
    upstream,
    upstreamPort: upstream.port,
    api,
    policy: () => ev,
    setIntentions(set) {
      ev = compile(set);
      a.proxy.reauthorize();
      b.proxy.reauthorize();
    },
    async close() {
      await a.proxy.close();
      await b.proxy.close();
    },
  };
}

/**
 * One more host of the mesh (same PKI, same intentions) running `api` in
 * front of 127.0.0.1:`appPort`, registered with `apiPort` (default the
 * app's), its HBONE listener on `hbonePort` (default any free port).
 * Resolves with the host and api's instance there; the caller closes it.
 */
export async function startApiHost(mesh: Mesh, node: string, appPort: number, opts: { apiPort?: number; hbonePort?: number } = {}): Promise<{ host: Host; api: Instance }> {
  const { log, lines } = captureLog();
  const metrics = new Metrics();
  const proxy = new NodeProxy({ node, trustDomain: mesh.pki.trustDomain, listenHost: '127.0.0.1', hbonePort: opts.hbonePort ?? 0, advertise: '127.0.0.1', policy: () => mesh.policy(), log, metrics });
  const hbonePort = await proxy.start();
  const port = opts.apiPort ?? appPort;
  proxy.setService(`${node}/api`, { name: 'api', port, target: { host: '127.0.0.1', port: appPort } });
  proxy.setServiceTls('api', await mesh.pki.leaf('api'));
  return { host: { proxy, metrics, log, lines }, api: { id: `${node}/api`, service: 'api', node, address: '127.0.0.1', port, hbonePort, tags: [], meta: {}, health: 'passing' } };
}

/** An instance of `api` whose agent's HBONE port is `hbonePort`, registered with `port` (the router's key). */
export function apiAt(hbonePort: number, port = hbonePort, node = `n${hbonePort}`): Instance {
  return { id: `${node}/api`, service: 'api', node, address: '127.0.0.1', port, hbonePort, tags: [], meta: {}, health: 'passing' };
}

/** How a hand-made HBONE attempt ended. */
export type HboneOutcome =
  /** The stream was answered 200 and echoed what was sent. */
  | { end: 'echoed'; data: string }
  /** The stream was refused with a status (and `knit-reason`). */
  | { end: 'status'; status: number; reason: string }
  /** The connection ended without serving a stream; `handshake`: whether the TLS handshake had completed. */
  | { end: 'closed'; handshake: boolean };

/**
 * A hand-made HBONE client: TLS to 127.0.0.1:`port` presenting `cert`
 * (or none), SNI `sniFor(service)` and ALPN h2, then one CONNECT stream to
 * `authority` that sends `send` and waits for the echo.
 */
export async function hboneAttempt(port: number, o: { trustDomain: string; ca: string[]; cert?: string; key?: string; service?: string; namespace?: string; authority: string; send?: string }): Promise<HboneOutcome> {
  const s = tls.connect({
    host: '127.0.0.1', port, ca: o.ca, cert: o.cert, key: o.key,
    servername: sniFor(o.service ?? 'api', o.namespace ?? 'default', o.trustDomain), ALPNProtocols: ['h2'], checkServerIdentity: () => undefined,
  });
  s.on('error', () => undefined);
  const handshake = await new Promise<boolean>((resolve) => {
    s.once('secureConnect', () => resolve(true));
    s.once('close', () => resolve(false));
  });
  if (!handshake) return { end: 'closed', handshake: false };
  const session = http2.connect(`https://127.0.0.1:${port}`, { createConnection: () => s });
  session.on('error', () => undefined);
  try {
    return await new Promise<HboneOutcome>((resolve) => {
      const closed = (): void => resolve({ end: 'closed', handshake: true });
      session.once('close', closed);
      const st = session.request({ ':method': 'CONNECT', ':authority': o.authority });
      st.on('error', () => undefined);
      st.once('close', closed);
      st.once('response', (h) => {
        const status = Number(h[':status']);
        if (status !== 200) return resolve({ end: 'status', status, reason: String(h['knit-reason'] ?? '') });
        st.once('data', (d: Buffer) => resolve({ end: 'echoed', data: d.toString() }));
        st.write(o.send ?? 'hello');
      });
    });
  } finally {
    session.destroy();
    s.destroy();
  }
}

/** A fake destination agent: what it saw. */
export interface FakeAgent {
  port: number;
  /** TCP connections accepted. */
  connections(): number;
  /** TLS handshakes completed (as the server saw them: a client that leaves right after its Finished may not count). */
  handshakes(): number;
  /** Bytes received after the TLS handshake (the HTTP/2 preface, CONNECTs, data), over all connections. */
  bytes(): number;
  /** SHA-256 fingerprints of the client certificates presented, one per handshake. */
  clientCerts: string[];
  /** Resolves once every connection it accepted has closed. */
  closed(): Promise<void>;
  close(): void;
}

/**
 * A TLS server that stands in for another host's agent: it presents
 * `cert` whatever the SNI, negotiates ALPN h2, and serves HBONE (every
 * CONNECT is answered 200 and echoed). It counts every byte it receives
 * after the handshake, so a test can tell that a refused server got
 * nothing: not even the HTTP/2 preface.
 */
export async function fakeAgent(leaf: { cert: string; key: string }): Promise<FakeAgent> {
  let connections = 0;
  let handshakes = 0;
  let bytes = 0;
  const clientCerts: string[] = [];
  const open = new Set<tls.TLSSocket>();
  const h2 = http2.createServer();
  h2.on('session', (session) => session.on('error', () => undefined));
  h2.on('stream', (stream) => {
    stream.on('error', () => undefined);
    stream.respond({ ':status': 200 });
    stream.pipe(stream);
  });
  const srv = tls.createServer({ cert: leaf.cert, key: leaf.key, minVersion: 'TLSv1.3', ALPNProtocols: ['h2'], requestCert: true, rejectUnauthorized: false }, (s) => {
    handshakes++;
    clientCerts.push(s.getPeerX509Certificate()?.fingerprint256 ?? 'none');
    open.add(s);
    s.on('error', () => undefined);
    s.once('close', () => open.delete(s));
    // Between the TLS socket and the HTTP/2 server, a stream that counts what arrives.
    const counted = new Duplex({
      read: () => void s.resume(),
      write: (chunk: Buffer, _enc, cb) => void s.write(chunk, cb),
      final: (cb) => {
        s.end();
        cb();
      },
      destroy: (err, cb) => {
        s.destroy();
        cb(err);
      },
    });
    s.on('data', (d: Buffer) => {
      bytes += d.length;
      if (!counted.push(d)) s.pause();
    });
    s.once('end', () => counted.push(null));
    s.once('close', () => counted.destroy());
    h2.emit('connection', counted);
  });
  srv.on('connection', () => connections++);
  srv.on('tlsClientError', () => undefined);
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  return {
    port: (srv.address() as net.AddressInfo).port,
    connections: () => connections,
    handshakes: () => handshakes,
    bytes: () => bytes,
    clientCerts,
    async closed() {
      for (const s of [...open]) if (!s.closed) await once(s, 'close');
    },
    close() {
      for (const s of open) s.destroy();
      srv.close();
    },
  };
}
