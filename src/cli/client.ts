/** The CLI's client of the admin API; turns transport failures into one-line reasons. */
import { request } from 'undici';
import { adminAddress } from '../config/env.js';

export class CliError extends Error {}

export interface ApiOptions {
  admin?: string;
}

/** Calls the admin API; throws CliError with the server's error or a reason the user can act on. */
export async function api<T>(o: ApiOptions, method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<T> {
  const base = o.admin ?? adminAddress();
  let res;
  try {
    res = await request(new URL(path, base), {
      method,
      body: body === undefined ? undefined : JSON.stringify(body),
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      signal: AbortSignal.timeout(30_000),
    });
  } catch (e) {
    throw new CliError(`cannot reach the knit admin API at ${base} (${(e as Error).message}); is knit dev or knit agent running? (--admin or KNIT_ADMIN_ADDR to point elsewhere)`);
  }
  const text = await res.body.text();
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
