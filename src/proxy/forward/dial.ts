/**
 * Dialing a mesh peer: a TCP connection, tuned (Nagle, keepalive), with a
 * TLS 1.3 client over it, under one deadline that covers both the TCP
 * connect and the handshake (a black-holed endpoint that accepts TCP but
 * never answers the ClientHello is a timeout, not a hang).
 *
 * The handshake is let finish (`rejectUnauthorized: false`); the caller
 * reads OpenSSL's verdict and the peer's SVID before a byte of application
 * data is written, so that a wrong identity is a refusal with a reason,
 * not a socket error. knit keeps the TCP socket, so that a reset can be
 * passed on as a TCP RST (see ./splice.ts).
 */
import net from 'node:net';
import tls, { type TLSSocket } from 'node:tls';
import { KnitError } from '../../errors.js';
import { tuneSocket, type TcpOptions } from '../limits.js';

/** Why one dial to one endpoint failed; each is a reason to try the next endpoint. */
export type DialFailureKind = 'refused' | 'timeout' | 'error';

/**
 * A dial that did not reach a TLS session. `KNIT_ERR_TIMEOUT` for a
 * timeout, `KNIT_ERR_NO_ENDPOINT` (retryable: another endpoint may answer)
 * for a refused or failed connection; `kind` says which.
 */
export class DialError extends KnitError {
  constructor(
    readonly kind: DialFailureKind,
    message: string,
    cause?: unknown,
  ) {
    super(kind === 'timeout' ? 'KNIT_ERR_TIMEOUT' : 'KNIT_ERR_NO_ENDPOINT', message, { cause });
    this.name = 'DialError';
  }
}

/** Where and how to dial one mesh peer. */
export interface DialTlsOptions {
  host: string;
  port: number;
  secureContext: tls.SecureContext;
  /** Deadline for TCP connect plus TLS handshake. */
  timeoutMs: number;
  tcp: TcpOptions;
  /** SNI to send (HBONE names the destination service with it). */
  servername?: string;
  /** ALPN protocols to offer (HBONE: h2). */
  alpn?: string[];
}

/** A TLS session to a peer and the TCP socket under it. */
export interface MeshConnection {
  tls: TLSSocket;
  tcp: net.Socket;
}

/**
 * Connects and handshakes; resolves on `secureConnect` with nothing
 * written yet. Rejects with a DialError. The TLS socket keeps a no-op
 * error listener: whoever uses it attaches their own.
 */
export function dialTls(o: DialTlsOptions): Promise<MeshConnection> {
  return new Promise((resolve, reject) => {
    // Not half-open during the handshake, so that a peer closing mid-handshake ends the dial at
    // once; splice makes it half-open once data flows.
    const tcp = net.connect({ host: o.host, port: o.port, allowHalfOpen: false });
    tuneSocket(tcp, o.tcp);
    tcp.on('error', () => undefined);
    const s = tls.connect({
      socket: tcp,
      secureContext: o.secureContext,
      // OpenSSL still verifies the chain; the caller reads its verdict on secureConnect.
      rejectUnauthorized: false,
      minVersion: 'TLSv1.3',
      // Identity is a SPIFFE URI, checked by the caller; Node's check only knows DNS names.
      checkServerIdentity: () => undefined,
      servername: o.servername,
      ALPNProtocols: o.alpn,
    });
    let done = false;
    const fail = (e: DialError): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      tcp.destroy();
      reject(e);
    };
    const timer = setTimeout(() => fail(new DialError('timeout', `connect timed out after ${o.timeoutMs} ms`)), o.timeoutMs);
    s.on('error', (e: Error & { code?: string }) => {
      fail(new DialError(e.code === 'ECONNREFUSED' ? 'refused' : 'error', e.code === 'ECONNREFUSED' ? 'connection refused' : e.message, e));
    });
    const onClose = (): void => fail(new DialError('error', 'closed during the TLS handshake'));
    s.once('close', onClose);
    s.once('secureConnect', () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.removeListener('close', onClose);
      resolve({ tls: s, tcp });
    });
  });
}
