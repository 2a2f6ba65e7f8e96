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

/** `KNIT_ADMIN_ADDR`: where CLI commands find the admin API (default http://127.0.0.1:7701). */
export function adminAddress(): string {
  return process.env.KNIT_ADMIN_ADDR ?? 'http://127.0.0.1:7701';
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
