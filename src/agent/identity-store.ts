/**
 * The agent's own identity on disk: `<data_dir>/agent/{key.pem (0600),
 * cert.pem, roots.pem}`. Renewals are written here, so a restarted agent
 * uses its current identity and never needs its (long expired) join token
 * again.
 */
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from '../registry/embedded/embedded.js';
import { certInfo, splitPem } from '../identity/x509.js';
import type { ServiceTls } from '../proxy/tls.js';

const dir = (dataDir: string): string => join(dataDir, 'agent');

/** The stored identity if it is this node's and valid now; otherwise undefined. */
export async function readAgentIdentity(dataDir: string, node: string, now = new Date()): Promise<{ tls: ServiceTls; trustDomain: string } | undefined> {
  let cert: string, key: string, roots: string;
  try {
    [cert, key, roots] = await Promise.all(['cert.pem', 'key.pem', 'roots.pem'].map((f) => readFile(join(dir(dataDir), f), 'utf8')) as [Promise<string>, Promise<string>, Promise<string>]);
  } catch {
    return undefined;
  }
  const info = certInfo(cert);
  const id = info.spiffeId;
  if (!id || id.what.kind !== 'agent' || id.what.node !== node) return undefined;
  if (info.notAfter <= now) return undefined;
  return { tls: { certChainPem: cert, keyPem: key, trustBundlePem: splitPem(roots) }, trustDomain: id.trustDomain };
}

/** Writes the identity atomically; the key 0600. */
export async function writeAgentIdentity(dataDir: string, t: ServiceTls): Promise<void> {
  await mkdir(dir(dataDir), { recursive: true, mode: 0o700 });
  await writeFileAtomic(join(dir(dataDir), 'key.pem'), t.keyPem, 0o600);
  await writeFileAtomic(join(dir(dataDir), 'cert.pem'), t.certChainPem, 0o644);
  await writeFileAtomic(join(dir(dataDir), 'roots.pem'), t.trustBundlePem.join('\n'), 0o644);
}
