/**
 * Registry URLs: `embedded:`, `zk://h1:2181,h2:2181/knit?session_timeout=10s`,
 * `consul://127.0.0.1:8500?dc=dc1`. Parsed once into a typed value.
 *
 * A protected ZooKeeper tree takes credentials from files named in the URL,
 * never the secret itself (URLs end up in logs and `ps`):
 * `zk://zk:2181/knit?auth=file:/etc/knit/zk.digest` for this process's own
 * credential, and on knit server also `agent_auth=file:/etc/knit/zk-agent.digest`,
 * the agents' credential it grants. Each file holds one line `user:password`
 * (parseZkCredential); the files are read where the registry is opened.
 */
import { KnitError } from '../errors.js';
import { parseDuration } from './duration.js';

export type RegistryUrl =
  | { kind: 'embedded' }
  | {
      kind: 'zookeeper';
      servers: string;
      root: string;
      sessionTimeoutMs: number;
      /** `auth=file:PATH`: this process's digest credential (`user:password`); absent: anonymous. */
      authFile?: string;
      /** `agent_auth=file:PATH`, knit server only: the agents' credential, which the server grants. */
      agentAuthFile?: string;
    }
  | { kind: 'consul'; address: string; datacenter?: string };

/** ZooKeeper session timeout when the URL does not set one: a crashed host's instances vanish ~10 s later. */
export const DEFAULT_ZK_SESSION_MS = 10_000;

const ZK_PARAMS = ['session_timeout', 'auth', 'agent_auth'];

function bad(url: string, why: string): never {
  throw new KnitError('KNIT_ERR_CONFIG', `registry URL ${JSON.stringify(url)}: ${why}`);
}

/** `file:/abs/path` or `file:///abs/path` to the absolute path; anything else is a config error. */
function fileParam(url: string, q: URLSearchParams, name: string): string | undefined {
  const v = q.get(name);
  if (v === null) return undefined;
  const m = /^file:(?:\/\/\/|\/(?!\/))(.+)$/.exec(v);
  if (!m) return bad(url, `${name} must be file:/absolute/path to a file holding one line user:password`);
  return `/${m[1]!}`;
}

/** Parses a registry URL; rejects KNIT_ERR_CONFIG naming what is wrong. */
export function parseRegistryUrl(url: string): RegistryUrl {
  if (url === 'embedded:' || url === 'embedded') return { kind: 'embedded' };
  const m = /^(zk|consul):\/\/([^/?]+)(\/[^?]*)?(?:\?(.*))?$/.exec(url);
  if (!m) return bad(url, 'expected embedded:, zk://host:port[,host:port...]/path or consul://host:port');
  const [, scheme, hosts, path, query] = m;
  const q = new URLSearchParams(query ?? '');
  for (const hp of hosts!.split(',')) {
    if (!/^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/.test(hp)) bad(url, `"${hp}" is not host:port`);
    const p = Number(hp.slice(hp.lastIndexOf(':') + 1));
    if (p < 1 || p > 65535) bad(url, `port ${p} of "${hp}" is out of range (1-65535)`);
  }
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
  for (const k of q.keys()) if (!ZK_PARAMS.includes(k)) bad(url, `unknown parameter "${k}"`);
  const authFile = fileParam(url, q, 'auth');
  const agentAuthFile = fileParam(url, q, 'agent_auth');
  return {
    kind: 'zookeeper',
    servers: hosts!,
    root,
    sessionTimeoutMs,
    // Only present keys, so that a URL without credentials parses exactly as before.
    ...(authFile !== undefined && { authFile }),
    ...(agentAuthFile !== undefined && { agentAuthFile }),
  };
}

/** A ZooKeeper digest credential as a credential file holds it. */
export interface ZkCredential {
  user: string;
  password: string;
}

/**
 * Parses the content of a credential file (`auth=file:...`): one line
 * `user:password`, a trailing newline allowed. The user may not contain `:`
 * (ZooKeeper splits at the first one); the password may. Rejects
 * KNIT_ERR_CONFIG naming `file`, never echoing the content.
 */
export function parseZkCredential(text: string, file: string): ZkCredential {
  const line = text.replace(/\r?\n$/, '');
  const fail = (why: string): never => {
    throw new KnitError('KNIT_ERR_CONFIG', `ZooKeeper credential file ${file}: ${why}`);
  };
  if (/[\r\n]/.test(line)) fail('must hold exactly one line user:password');
  const at = line.indexOf(':');
  if (at <= 0) fail('expected one line user:password');
  const user = line.slice(0, at);
  const password = line.slice(at + 1);
  if (!/^[\x21-\x7e]+$/.test(user)) fail('the user must be printable ASCII without spaces');
  if (password.length === 0) fail('the password is empty');
  return { user, password };
}
