/**
 * Certificates on disk, so a restarted agent (a rebooted VM) keeps working
 * while the control plane is away: `<data_dir>/agent/` holds the agent's own
 * identity and `<data_dir>/services/<name>/` each service's leaf, as
 * key.pem (0600), cert.pem and roots.pem. Renewals are written here too, so
 * the agent never needs its (long expired) join token again.
 */
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from '../registry/embedded/embedded.js';
import { certInfo, splitPem, type CertInfo } from '../identity/x509.js';
import type { ServiceTls } from '../proxy/tls.js';

/** Where the agent's own identity is kept. */
export const agentDir = (dataDir: string): string => join(dataDir, 'agent');
/** Where a service's leaf is kept. */
export const serviceDir = (dataDir: string, service: string): string => join(dataDir, 'services', service);

/**
 * Stored material with its parsed certificate; undefined when absent,
 * unreadable, or (unless `allowExpired`) expired.
 */
export async function readStored(dir: string, now = new Date(), allowExpired = false): Promise<{ tls: ServiceTls; info: CertInfo } | undefined> {
  try {
    const [cert, key, roots] = await Promise.all(['cert.pem', 'key.pem', 'roots.pem'].map((f) => readFile(join(dir, f), 'utf8')));
    const info = certInfo(cert!);
    if ((!allowExpired && info.notAfter <= now) || !info.spiffeId) return undefined;
    return { tls: { certChainPem: cert!, keyPem: key!, trustBundlePem: splitPem(roots!) }, info };
  } catch {
    return undefined;
  }
}

/** Writes material atomically; the key 0600. */
export async function writeStored(dir: string, t: ServiceTls): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await writeFileAtomic(join(dir, 'key.pem'), t.keyPem, 0o600);
  await writeFileAtomic(join(dir, 'cert.pem'), t.certChainPem, 0o644);
  await writeFileAtomic(join(dir, 'roots.pem'), t.trustBundlePem.join('\n'), 0o644);
}

/**
 * The stored agent identity if it is this node's, valid or expired (an
 * expired one is what a host that was off rejoins with).
 */
export async function readAgentIdentity(dataDir: string, node: string, now = new Date()): Promise<{ tls: ServiceTls; trustDomain: string; expired: boolean } | undefined> {
  const got = await readStored(agentDir(dataDir), now, true);
  const id = got?.info.spiffeId;
  if (!got || !id || id.what.kind !== 'agent' || id.what.node !== node) return undefined;
  return { tls: got.tls, trustDomain: id.trustDomain, expired: got.info.notAfter <= now };
}

export function writeAgentIdentity(dataDir: string, t: ServiceTls): Promise<void> {
  return writeStored(agentDir(dataDir), t);
}

/** The registry credential the control plane handed this agent (`user:password`), kept 0600. */
export async function readRegistryAuth(dataDir: string): Promise<string | undefined> {
  try {
    return (await readFile(join(agentDir(dataDir), 'registry.auth'), 'utf8')).trim() || undefined;
  } catch {
    return undefined;
  }
}

export async function writeRegistryAuth(dataDir: string, auth: string): Promise<void> {
  await mkdir(agentDir(dataDir), { recursive: true, mode: 0o700 });
  await writeFileAtomic(join(agentDir(dataDir), 'registry.auth'), `${auth}\n`, 0o600);
}
