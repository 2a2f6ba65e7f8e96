/**
 * For tests of the data plane: a real outbound + inbound proxy pair over
 * mTLS on 127.0.0.1, in front of an application the test provides, with
 * certificates made by code. Not used by knit itself.
 */
import net from 'node:net';
import { once } from 'node:events';
import { pino, type Logger } from 'pino';
import { InboundProxy, type InboundOptions } from '../../src/proxy/inbound/inbound.js';
import { OutboundProxy, type OutboundOptions } from '../../src/proxy/outbound/outbound.js';
import { Metrics } from '../../src/log/metrics.js';
import type { Instance } from '../../src/registry/registry.js';
import { makePki, type TestPki } from './pki.js';

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

/** An instance of `api` at 127.0.0.1:`port`. */
export const endpoint = (port: number): Instance => ({ id: `n/api-${port}`, service: 'api', node: 'n', address: '127.0.0.1', port, tags: [], meta: {}, health: 'passing' });

/** A TCP server on 127.0.0.1:0; resolves once listening. */
export async function listen(onConnection: (s: net.Socket) => void, opts: net.ServerOpts = {}): Promise<{ server: net.Server; port: number }> {
  const server = net.createServer(opts, onConnection);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { server, port: (server.address() as net.AddressInfo).port };
}

/** A running outbound + inbound pair, its metrics and captured log lines. */
export interface Pair {
  pki: TestPki;
  metrics: Metrics;
  log: Logger;
  lines: LogLine[];
  inbound: InboundProxy;
  inboundPort: number;
  outbound: OutboundProxy;
  outboundPort: number;
  close(): Promise<void>;
}

/**
 * Starts `web`'s outbound to `api` and `api`'s inbound to 127.0.0.1:`appPort`,
 * `web -> api` allowed, with extra options for either side.
 */
export async function startPair(
  appPort: number,
  extra: { inbound?: Partial<InboundOptions>; outbound?: Partial<OutboundOptions>; pki?: TestPki } = {},
): Promise<Pair> {
  const pki = extra.pki ?? (await makePki());
  const metrics = new Metrics();
  const { log, lines } = captureLog();
  const inbound = new InboundProxy({
    service: 'api', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: 0, targetHost: '127.0.0.1', targetPort: appPort,
    tls: await pki.leaf('api'), authorize: () => ({ allow: true, reason: 'default', rule: 'default (allow)' }), log, metrics,
    ...extra.inbound,
  });
  const inboundPort = await inbound.start();
  const outbound = new OutboundProxy({
    source: 'web', destination: 'api', trustDomain: pki.trustDomain, listenHost: '127.0.0.1', listenPort: 0, tls: await pki.leaf('web'), log, metrics,
    ...extra.outbound,
  });
  const outboundPort = await outbound.start();
  outbound.setEndpoints([endpoint(inboundPort)]);
  return {
    pki, metrics, log, lines, inbound, inboundPort, outbound, outboundPort,
    async close() {
      await outbound.close();
      await inbound.close();
    },
  };
}

/** Connects to 127.0.0.1:`port` with Nagle off; resolves once connected. */
export async function dial(port: number, opts: Partial<net.TcpNetConnectOpts> = {}): Promise<net.Socket> {
  const s = net.connect({ port, host: '127.0.0.1', noDelay: true, ...opts });
  await once(s, 'connect');
  return s;
}

/** Everything `s` sends until its end, or the error that ended it. */
export function readAll(s: net.Socket): Promise<{ data: string; error?: string }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    s.on('data', (d: Buffer) => chunks.push(d));
    s.once('end', () => resolve({ data: Buffer.concat(chunks).toString() }));
    s.once('error', (e: Error & { code?: string }) => resolve({ data: Buffer.concat(chunks).toString(), error: e.code ?? e.message }));
  });
}
