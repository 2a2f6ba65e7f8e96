/**
 * Failures the CLI turns into one line a new user can act on, instead of
 * a stack trace or a socket error's bare text.
 */
import { KnitError } from '../errors.js';

/** A failure the CLI reports as one line `knit: <message>` and exits with `exitCode` (default 1). */
export class CliError extends Error {
  constructor(message: string, readonly exitCode = 1) {
    super(message);
  }
}

/** What wanted a port, and how to move it (e.g. `--admin-addr 127.0.0.1:PORT to use another`). */
export interface PortOwner {
  what: string;
  hint: string;
}

/**
 * A failure to listen as one line naming the port and what wanted it, or
 * undefined for any other error. The listeners throw KNIT_ERR_LISTEN with
 * the socket error as `cause`; their messages start with what was
 * listening (`upstream api of web cannot listen on ...`) except the API's.
 */
export function listenFailure(thrown: unknown, owners: ReadonlyMap<number, PortOwner> = new Map()): string | undefined {
  // The listen error may arrive wrapped (a service that failed to start): look down the cause chain.
  let e: unknown = thrown;
  for (let depth = 0; e instanceof Error && depth < 5 && !(e instanceof KnitError && e.code === 'KNIT_ERR_LISTEN'); depth++) e = e.cause;
  if (!(e instanceof KnitError) || e.code !== 'KNIT_ERR_LISTEN') return undefined;
  const cause = e.cause as (NodeJS.ErrnoException & { port?: number; address?: string }) | undefined;
  const m = /^(.*?)\s*cannot listen on (\S+):(\d+):/.exec(e.message);
  const port = cause?.port ?? Number(m?.[3]);
  const host = cause?.address ?? m?.[2] ?? '?';
  const owner = owners.get(port);
  const what = m?.[1] || owner?.what || 'knit';
  const hint = owner && !m?.[1] ? `; ${owner.hint}` : m?.[1]?.startsWith('upstream') ? '; change its local_bind_port, or stop what holds the port (ss -ltnp shows who)' : '';
  switch (cause?.code) {
    case 'EADDRINUSE':
      return `port ${port} on ${host} is already in use: ${what} wanted it${hint || '; stop what holds it (ss -ltnp shows who) or choose another port'}`;
    case 'EACCES':
      return `port ${port} on ${host}: permission denied for ${what} (ports below 1024 need root or CAP_NET_BIND_SERVICE)${hint}`;
    case 'EADDRNOTAVAIL':
      return `${host} is not an address of this host: ${what} cannot listen on it${hint}`;
    default:
      return undefined;
  }
}

