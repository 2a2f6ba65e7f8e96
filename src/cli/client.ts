/**
 * The CLI's client: the local admin API (knit dev, knit agent) over
 * loopback HTTP, or the control plane (`--server`) over HTTPS with the
 * operator token. Transport failures become one-line reasons.
 */
import { readFile } from 'node:fs/promises';
import { request, Agent as Dispatcher } from 'undici';
import { adminAddress, caFile, operatorTokenFile, serverAddress } from '../config/env.js';
import { checkServer } from '../agent/control-client.js';

export class CliError extends Error {}

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

/** Calls the admin API or the control plane; throws CliError with the server's error or a reason the user can act on. */
export async function api<T>(o: ApiOptions, method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<T> {
  const server = o.server ?? serverAddress();
  const base = server ?? o.admin ?? adminAddress();
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
