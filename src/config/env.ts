/**
 * The only reader of process.env. Every knit setting that may come from the
 * environment is named here.
 */
import { homedir, hostname } from 'node:os';
import { join } from 'node:path';

/** `KNIT_LOG_LEVEL`: pino level (default info). */
export function logLevel(): string {
  return process.env.KNIT_LOG_LEVEL ?? 'info';
}

/** How log lines look: `json` (one JSON object per line), `pretty` (for people), `auto` (pretty on a terminal). */
export type LogFormat = 'json' | 'pretty' | 'auto';

/** The log formats a user may name. */
export const LOG_FORMATS: readonly LogFormat[] = ['json', 'pretty', 'auto'];

/**
 * `KNIT_LOG_FORMAT`: json, pretty or auto (default auto: pretty when stderr
 * is a terminal, JSON lines otherwise). Throws naming the variable when it
 * holds anything else.
 */
export function logFormat(): LogFormat {
  const v = process.env.KNIT_LOG_FORMAT;
  if (v === undefined || v === '') return 'auto';
  if ((LOG_FORMATS as readonly string[]).includes(v)) return v as LogFormat;
  throw new Error(`KNIT_LOG_FORMAT=${v}: expected ${LOG_FORMATS.join(', ')}`);
}

/** `NO_COLOR` (no-color.org): set and non-empty turns colours off in pretty logs. */
export function noColor(): boolean {
  return !!process.env.NO_COLOR;
}

/**
 * An admin API address as users write it (`127.0.0.1:7701`, `localhost:7701`,
 * `http://127.0.0.1:7701`) as a URL: without a scheme, http:// is meant.
 */
export function adminUrl(v: string): string {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(v) ? v : `http://${v}`;
}

/** `KNIT_ADMIN_ADDR`: where CLI commands find the admin API (default http://127.0.0.1:7701; a bare host:port means http://). */
export function adminAddress(): string {
  return adminUrl(process.env.KNIT_ADMIN_ADDR || 'http://127.0.0.1:7701');
}

/** Default data dir of `knit dev`: `~/.knit/dev`. */
export function devDataDir(): string {
  return join(process.env.HOME ?? homedir(), '.knit', 'dev');
}

/** This host's node name, reduced to the characters a SPIFFE path segment allows. */
export function defaultNodeName(): string {
  return hostname().replace(/[^A-Za-z0-9._-]/g, '-') || 'node';
}

/** `KNIT_SERVER`: the control plane CLI commands talk to instead of the local admin API. */
export function serverAddress(): string | undefined {
  return process.env.KNIT_SERVER || undefined;
}

/** `KNIT_TOKEN_FILE`: the operator token (default: the server's data dir). */
export function operatorTokenFile(): string {
  return process.env.KNIT_TOKEN_FILE ?? '/var/lib/knit/operator.token';
}

/** `KNIT_CA_FILE`: the root a CLI trusts for the control plane (default: the server's data dir). */
export function caFile(): string {
  return process.env.KNIT_CA_FILE ?? '/var/lib/knit/ca/root.pem';
}
