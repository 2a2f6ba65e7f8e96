/**
 * What knit puts on the wire between agents (HBONE, as Istio's ztunnel
 * speaks it), in one place so that another implementation can
 * interoperate; README "HBONE on the wire" says the same in prose.
 *
 * - One TCP port per host (15008 by default), TLS 1.3, ALPN `h2`, both
 *   sides presenting X.509-SVIDs of the knit trust domain.
 * - The client presents the certificate of the *source* service. It sends
 *   SNI `<service>.<namespace>.svc.<trust-domain>` naming the *destination*
 *   service; the server presents that service's certificate, and the client
 *   checks it is exactly `spiffe://<td>/ns/<namespace>/svc/<service>`.
 * - Each application connection is one HTTP/2 stream: `:method CONNECT`,
 *   `:authority <address>:<port>` (the destination instance as registered,
 *   IPv6 in brackets), and `forwarded: for="<client address>"`. The server
 *   answers 200 and both directions become the stream's DATA; END_STREAM
 *   is a half-close, RST_STREAM a reset.
 * - Refusals are statuses with a `knit-reason` header: 400 (not a CONNECT,
 *   or a malformed authority), 403 (an intention denies it; the reason names
 *   the rule), 421 (the authority names no instance of the service whose
 *   identity the tunnel proved), 503 (the application did not accept).
 * - The server allows 100 concurrent streams per connection (configurable);
 *   a client opens another connection only when every one it holds for the
 *   same {source identity, destination identity, destination agent} is full.
 */
import { isIP } from 'node:net';

/** The ALPN protocol of an HBONE connection. */
export const HBONE_ALPN = 'h2';
/** The default HBONE port (Istio's). */
export const DEFAULT_HBONE_PORT = 15008;
/** Streams per connection (RFC 9113 recommends at least 100; Go and ztunnel use 100). */
export const DEFAULT_MAX_STREAMS = 100;
/** Idle connections are closed after this long (ztunnel's pool releases them after 5 minutes). */
export const DEFAULT_TUNNEL_IDLE_MS = 5 * 60_000;
/** The header that carries why a stream was refused. */
export const REASON_HEADER = 'knit-reason';

/** Statuses an HBONE server answers, by meaning. */
export const STATUS = {
  ok: 200,
  badRequest: 400,
  denied: 403,
  misdirected: 421,
  unavailable: 503,
} as const;

/**
 * HTTP/2 settings of both ends. Windows far above the 64 KiB default, so
 * that one stream can fill a fast link and a tunnel carrying many streams
 * is not throttled by its connection window; frames up to 256 KiB, so bulk
 * data costs fewer frame headers and callbacks.
 */
export const H2_SETTINGS = {
  initialWindowSize: 4 << 20,
  maxFrameSize: 256 << 10,
} as const;
/** The connection-level receive window each end grants (HTTP/2's default is 64 KiB). */
export const CONNECTION_WINDOW = 32 << 20;

/** The SNI a client sends to reach `service`: `<service>.<namespace>.svc.<trust-domain>`. */
export function sniFor(service: string, namespace: string, trustDomain: string): string {
  return `${service}.${namespace}.svc.${trustDomain}`;
}

/** The service and namespace an SNI names, if it is one of this trust domain's. */
export function parseSni(sni: string | undefined, trustDomain: string): { service: string; namespace: string } | undefined {
  if (!sni) return undefined;
  const suffix = `.svc.${trustDomain}`;
  if (!sni.endsWith(suffix)) return undefined;
  const [service, namespace, ...rest] = sni.slice(0, -suffix.length).split('.');
  if (!service || !namespace || rest.length) return undefined;
  return { service, namespace };
}

/** `address:port`, IPv6 in brackets. */
export function authorityOf(address: string, port: number): string {
  return isIP(address) === 6 ? `[${address}]:${port}` : `${address}:${port}`;
}

/** The address and port of an authority; undefined when it is not `host:port` with a port 1-65535. */
export function parseAuthority(a: string | undefined): { address: string; port: number } | undefined {
  if (!a) return undefined;
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(a);
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port < 1 || port > 65535) return undefined;
  return { address: (m[1] ?? m[2])!, port };
}
