/**
 * Registry URLs: `embedded:`, `zk://h1:2181,h2:2181/knit?session_timeout=10s`,
 * `consul://127.0.0.1:8500?dc=dc1`. Parsed once into a typed value.
 */
import { KnitError } from '../errors.js';
import { parseDuration } from './duration.js';

export type RegistryUrl =
  | { kind: 'embedded' }
  | { kind: 'zookeeper'; servers: string; root: string; sessionTimeoutMs: number }
  | { kind: 'consul'; address: string; datacenter?: string };

/** ZooKeeper session timeout when the URL does not set one: a crashed host's instances vanish ~10 s later. */
export const DEFAULT_ZK_SESSION_MS = 10_000;

function bad(url: string, why: string): never {
  throw new KnitError('KNIT_ERR_CONFIG', `registry URL ${JSON.stringify(url)}: ${why}`);
}

export function parseRegistryUrl(url: string): RegistryUrl {
  if (url === 'embedded:' || url === 'embedded') return { kind: 'embedded' };
  const m = /^(zk|consul):\/\/([^/?]+)(\/[^?]*)?(?:\?(.*))?$/.exec(url);
  if (!m) return bad(url, 'expected embedded:, zk://host:port[,host:port...]/path or consul://host:port');
  const [, scheme, hosts, path, query] = m;
  const q = new URLSearchParams(query ?? '');
  for (const hp of hosts!.split(',')) if (!/^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/.test(hp)) bad(url, `"${hp}" is not host:port`);
  if (scheme === 'consul') return { kind: 'consul', address: hosts!, datacenter: q.get('dc') ?? undefined };
  const root = (path ?? '/knit').replace(/\/+$/, '') || '/knit';
  if (!/^(\/[A-Za-z0-9._-]+)+$/.test(root)) bad(url, `path "${root}" must be /segments of letters, digits, . _ -`);
  let sessionTimeoutMs = DEFAULT_ZK_SESSION_MS;
  const st = q.get('session_timeout');
  if (st !== null) {
    const ms = parseDuration(st);
    if (ms === undefined || ms < 400 || ms > 60_000) bad(url, `session_timeout ${st} must be a duration from 400ms to 60s`);
    sessionTimeoutMs = ms;
  }
  for (const k of q.keys()) if (k !== 'session_timeout') bad(url, `unknown parameter "${k}"`);
  return { kind: 'zookeeper', servers: hosts!, root, sessionTimeoutMs };
}
