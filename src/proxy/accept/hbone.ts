/**
 * The accept stage for traffic from other hosts: one HBONE listener per
 * host (15008 by default).
 *
 *   TCP: connection caps and socket options, before a byte of TLS is spent
 *   TLS: SNI picks the local service whose certificate is presented; the
 *        client must present a certificate (its service's)
 *   identify: the client's X.509-SVID (identify.ts); refusals counted and
 *        logged with their reason, the connection reset
 *   HTTP/2: the verified connection becomes an HTTP/2 session; each CONNECT
 *        stream is handed on with the identities the connection proved
 *
 * A session ends when the client's certificate expires: a tunnel lives no
 * longer than the identity it proved.
 */
import http2, { type IncomingHttpHeaders, type ServerHttp2Stream } from 'node:http2';
import net, { type Socket } from 'node:net';
import tls, { type TLSSocket } from 'node:tls';
import { once } from 'node:events';
import { KnitError } from '../../errors.js';
import { PeerIdentityReader } from '../../identity/peer.js';
import type { SpiffeId } from '../../identity/spiffe.js';
import { identifyPeer } from '../identify.js';
import { reset } from '../forward/splice.js';
import { admitSocket, type ConnectionLimit, type TcpOptions } from '../limits.js';
import { CONNECTION_WINDOW, DEFAULT_MAX_STREAMS, H2_SETTINGS, HBONE_ALPN, parseSni } from '../hbone/wire.js';

/** What the connection a stream arrived on proved. */
export interface StreamOrigin {
  /** The client's identity (its service's certificate). */
  peer: SpiffeId;
  peerService: string;
  /** The local service the client asked for by SNI, whose certificate this side presented. */
  service: string;
  /** The client's address. */
  remote: string;
}

export interface HboneServerOptions {
  host: string;
  port: number;
  trustDomain: string;
  namespace: string;
  /** Roots a client must chain to. */
  trustBundle: string[];
  /** The secure context of a local service, or undefined when no such service runs here. */
  contextFor: (service: string) => tls.SecureContext | undefined;
  /** A CONNECT stream on a verified connection. */
  onStream: (stream: ServerHttp2Stream, headers: IncomingHttpHeaders, origin: StreamOrigin) => void;
  /** A connection refused before HTTP/2: counted and logged by the caller; the connection is reset here. */
  onRefused: (reason: string, remote: string, service: string, fields: Record<string, unknown>, detail: string) => void;
  limit: ConnectionLimit;
  tcp: TcpOptions;
  maxStreams?: number;
  handshakeTimeoutMs?: number;
}

const ORIGIN = Symbol('knit.hbone.origin');
type Tagged = TLSSocket & { [ORIGIN]?: StreamOrigin };

/**
 * Classifies a handshake that did not complete (`tlsClientError`) into a
 * short reason users can act on: a metric label, so a fixed phrase, never
 * OpenSSL's raw message (it starts with a per-thread address and ends with
 * a source path). `servername` is the SNI the client sent, if any: without
 * one no certificate is chosen (every certificate here is a service's), so
 * the handshake fails for want of one.
 */
export function handshakeReason(err: Error & { code?: string }, servername?: string | false | null): string {
  const m = `${err.code ?? ''} ${err.message}`;
  if (/PEER_DID_NOT_RETURN_A_CERTIFICATE|certificate required/i.test(m)) return 'no client certificate';
  if (/callback failed|unrecognized name|SNI/i.test(m)) return 'no local service of that name (SNI)';
  if (/timeout|ETIMEDOUT/i.test(m)) return 'handshake timeout';
  if (/ECONNRESET|socket hang up/i.test(m)) return 'client closed during handshake';
  if (/wrong version|http request|unknown protocol|WRONG_VERSION_NUMBER|packet length/i.test(m)) return 'not a TLS client';
  if (/NO_APPLICATION_PROTOCOL|no application protocol/i.test(m)) return 'client did not offer HBONE (ALPN h2)';
  if (!servername) return 'no SNI: the client did not name the service it calls';
  // OpenSSL's reason string ("...:SSL routines:<function>:<reason>:<file>:<line>"), else Node's code.
  const reason = /:error:[0-9A-Fa-f]+:[^:]*:[^:]*:([^:]+)/.exec(err.message)?.[1] ?? err.code ?? err.message.slice(0, 80);
  return `handshake failed: ${reason}`;
}

export class HboneServer {
  private readonly tcpServer: net.Server;
  private readonly tlsServer: tls.Server;
  private readonly h2: http2.Http2Server;
  private readonly peers = new PeerIdentityReader();
  private readonly sessions = new Set<http2.ServerHttp2Session>();

  constructor(private readonly o: HboneServerOptions) {
    this.tlsServer = tls.createServer({
      // Client certificates chain to these; the presented certificate is the SNI's service's.
      ca: o.trustBundle,
      requestCert: true,
      // OpenSSL still verifies; knit refuses unverified clients itself so every refusal is counted with its reason.
      rejectUnauthorized: false,
      minVersion: 'TLSv1.3',
      ALPNProtocols: [HBONE_ALPN],
      handshakeTimeout: o.handshakeTimeoutMs ?? 10_000,
      SNICallback: (servername, cb) => {
        const svc = parseSni(servername, o.trustDomain);
        const ctx = svc && svc.namespace === o.namespace ? o.contextFor(svc.service) : undefined;
        if (ctx) cb(null, ctx);
        else cb(new Error(`unrecognized name: no local service ${servername}`));
      },
    });
    this.tlsServer.on('secureConnection', (s: TLSSocket) => this.accept(s));
    this.tlsServer.on('tlsClientError', (err: Error & { code?: string }, s: TLSSocket) => this.refuse(s, handshakeReason(err, (s as TLSSocket & { servername?: string | false | null }).servername), '', {}, ''));
    this.h2 = http2.createServer({
      settings: { ...H2_SETTINGS, maxConcurrentStreams: o.maxStreams ?? DEFAULT_MAX_STREAMS, enablePush: false },
      // A malformed frame ends that session, never the process.
      maxSessionInvalidFrames: 100,
    });
    this.h2.on('session', (session) => {
      this.sessions.add(session);
      session.on('error', () => undefined);
      session.once('close', () => this.sessions.delete(session));
      session.once('connect', () => session.setLocalWindowSize(CONNECTION_WINDOW));
    });
    this.h2.on('stream', (stream, headers) => {
      const origin = (stream.session?.socket as Tagged | undefined)?.[ORIGIN];
      stream.on('error', () => undefined);
      if (!origin) {
        stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
        return;
      }
      this.o.onStream(stream, headers, origin);
    });
    // Not half-open during the handshake: a client that closes before finishing it (a port scan) ends at once.
    this.tcpServer = net.createServer({ allowHalfOpen: false }, (raw) => this.admit(raw));
  }

  /** Listens; resolves with the bound port. Rejects KNIT_ERR_LISTEN naming the address. */
  async start(): Promise<number> {
    this.tcpServer.listen(this.o.port, this.o.host);
    try {
      await once(this.tcpServer, 'listening');
    } catch (e) {
      throw new KnitError('KNIT_ERR_LISTEN', `HBONE listener cannot listen on ${this.o.host}:${this.o.port}: ${(e as Error).message}`, { cause: e });
    }
    this.tcpServer.on('error', () => undefined);
    return (this.tcpServer.address() as net.AddressInfo).port;
  }

  /** A new trust bundle (root rotation): new connections are verified against it. */
  setTrustBundle(roots: string[]): void {
    this.tlsServer.setSecureContext({ ca: roots, minVersion: 'TLSv1.3' });
  }

  /** Open HTTP/2 sessions (tunnels from other agents). */
  get tunnels(): number {
    return this.sessions.size;
  }

  private admit(raw: Socket): void {
    raw.on('error', () => undefined);
    const a = admitSocket(raw, this.o.limit, this.o.tcp);
    if (!a.admitted) {
      this.o.onRefused(a.reason, `${raw.remoteAddress}:${raw.remotePort}`, '', { limit: a.refusal.scope }, '');
      reset(raw);
      return;
    }
    this.tlsServer.emit('connection', raw);
  }

  private refuse(s: Socket, reason: string, service: string, fields: Record<string, unknown>, detail: string): void {
    this.o.onRefused(reason, `${s.remoteAddress}:${s.remotePort}`, service, fields, detail);
    reset(s);
  }

  private accept(socket: TLSSocket): void {
    socket.on('error', () => undefined);
    const service = parseSni((socket as TLSSocket & { servername?: string }).servername, this.o.trustDomain)?.service ?? '';
    if (socket.alpnProtocol !== HBONE_ALPN) return this.refuse(socket, 'client did not negotiate HBONE (ALPN h2)', service, {}, '');
    const who = identifyPeer(socket, 'client', this.peers, this.o.trustDomain, this.o.namespace);
    if (!who.ok) return this.refuse(socket, who.reason, service, who.fields, who.detail);
    (socket as Tagged)[ORIGIN] = { peer: who.id, peerService: who.service, service, remote: socket.remoteAddress ?? '' };
    // The session dies with the client's certificate.
    const left = who.notAfter.getTime() - Date.now();
    const expiry = setTimeout(() => socket.destroy(), Math.max(0, Math.min(left, 2 ** 31 - 1)));
    expiry.unref();
    socket.once('close', () => clearTimeout(expiry));
    this.h2.emit('connection', socket);
    // Node's Http2Session turns Nagle off on the socket it is given: set it back as configured.
    socket.setNoDelay(this.o.tcp.noDelay);
  }

  /** Stops accepting; with `now`, ends every tunnel at once (streams are reset). */
  async close(): Promise<void> {
    const closed = new Promise<void>((r) => this.tcpServer.close(() => r()));
    for (const s of this.sessions) s.destroy();
    await closed;
  }
}
