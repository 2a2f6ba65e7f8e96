/**
 * The CLI's client: the local admin API (knit dev, knit agent) over
 * loopback HTTP, or the control plane (`--server`) over HTTPS with the
 * operator token. Transport failures become one-line reasons.
 */
import { readFile } from 'node:fs/promises';
import { request, Agent as Dispatcher } from 'undici';
import { adminAddress, adminUrl, caFile, operatorTokenFile, serverAddress } from '../config/env.js';
import { checkServer } from '../agent/control-client.js';

import { CliError } from './failures.js';

export { CliError };

/** `cp:7700` or `https://cp:7700`: the control plane's URL (https:// when no scheme is given). */
export function serverUrl(v: string): string {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(v) ? v : `https://${v}`;
}

/** A base URL checked once, so that a typo is a one-line reason rather than "Invalid URL". */
function baseUrl(v: string, flag: string): string {
  if (!URL.canParse(v)) throw new CliError(`${flag} ${v}: not an address (expected host:port or http://host:port)`);
  return v;
}

export interface ApiOptions {
  admin?: string;
  server?: string;
  tokenFile?: string;
  caFile?: string;
}

async function readOr(path: string, what: string, flag: string): Promise<string> {
  try {
    return (await readFile(path, 'utf8')).trim();
  } catch (e) {
    throw new CliError(`cannot read the ${what} ${path} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); pass ${flag}`);
  }
}

/**
 * Calls the admin API or the control plane (precedence: --server, --admin,
 * $KNIT_SERVER, $KNIT_ADMIN_ADDR, http://127.0.0.1:7701); throws CliError with the server's error or a reason the user can act on. */
export async function api<T>(o: ApiOptions, method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<T> {
  // An explicit flag wins over the environment: --admin reaches the local agent even with KNIT_SERVER set.
  const rawServer = o.server ?? (o.admin ? undefined : serverAddress());
  const server = rawServer === undefined ? undefined : baseUrl(serverUrl(rawServer), o.server ? '--server' : 'KNIT_SERVER');
  const base = server ?? (o.admin ? baseUrl(adminUrl(o.admin), '--admin') : baseUrl(adminAddress(), 'KNIT_ADMIN_ADDR'));
  const headers: Record<string, string> = body === undefined ? {} : { 'content-type': 'application/json' };
  let dispatcher: Dispatcher | undefined;
  if (server) {
    headers.authorization = `Bearer ${await readOr(o.tokenFile ?? operatorTokenFile(), 'operator token', '--token-file or KNIT_TOKEN_FILE')}`;
    const ca = await readOr(o.caFile ?? caFile(), 'CA root', '--ca-file or KNIT_CA_FILE');
    dispatcher = new Dispatcher({ connect: { ca, checkServerIdentity: checkServer(undefined) } });
  }
  let res;
  try {
    res = await request(new URL(path, base), { method, body: body === undefined ? undefined : JSON.stringify(body), headers, dispatcher, signal: AbortSignal.timeout(30_000) });
  } catch (e) {
    await dispatcher?.close();
    const hint = server ? 'is knit server running there?' : 'is knit dev or knit agent running? (--admin or KNIT_ADMIN_ADDR to point elsewhere; --server for the control plane)';
    throw new CliError(`cannot reach ${base} (${(e as Error).message}); ${hint}`);
  }
  const text = await res.body.text();
  await dispatcher?.close();
  let json: unknown;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    json = text;
  }
  if (res.statusCode >= 400) {
    const err = json as { error?: string } | undefined;
    throw new CliError(err?.error ?? `${method} ${path}: HTTP ${res.statusCode}`);
  }
  return json as T;
}
