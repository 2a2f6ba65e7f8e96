/**
 * Certificates on disk, so a restarted agent (a rebooted VM) keeps working
 * while the control plane is away: `<data_dir>/agent/` holds the agent's own
 * identity and `<data_dir>/services/<name>/` each service's leaf. Renewals
 * are written here too, so the agent never needs its (long expired) join
 * token again.
 *
 * The key, the certificate chain and the trust bundle belong together: a
 * key beside another key's certificate is useless, and a crash between two
 * file writes must never produce one. So they are written as one unit, a
 * directory, and made current by renaming a symlink (as Kubernetes'
 * AtomicWriter lays out secret volumes):
 *
 *   <dir>/current -> .identity-<id>        the commit point: one rename(2)
 *   <dir>/.identity-<id>/key.pem (0600), cert.pem, roots.pem
 *   <dir>/key.pem -> current/key.pem       for people and tools that know
 *   <dir>/cert.pem -> current/cert.pem     the older three-file layout
 *   <dir>/roots.pem -> current/roots.pem
 *
 * Every file and the unit directory are fsynced before the symlink is
 * renamed into place, and the parent after, so a crash at any instant
 * leaves the complete old unit or the complete new one. The reader takes
 * the unit `current` names, and only when there is no `current` the three
 * files of the older layout (an upgrade; the first write converts them).
 * Either way it checks that the key is the certificate's: a torn or
 * mismatched identity is absent (it gets issued again), never a crash.
 */
import { X509Certificate, createPrivateKey, randomBytes } from 'node:crypto';
import { lstat, mkdir, readFile, readdir, readlink, rename, rm, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { fsyncPath, writeFileAtomic, writeSynced } from '../files.js';
import { certInfo, splitPem, type CertInfo } from '../identity/x509.js';
import type { ServiceTls } from '../identity/tls.js';

/** Where the agent's own identity is kept. */
export const agentDir = (dataDir: string): string => join(dataDir, 'agent');
/** Where a service's leaf is kept. */
export const serviceDir = (dataDir: string, service: string): string => join(dataDir, 'services', service);

const CURRENT = 'current';
const UNIT_PREFIX = '.identity-';
const FILES = { key: 'key.pem', cert: 'cert.pem', roots: 'roots.pem' } as const;
/**
 * Debris of a writer that died (a unit never made current, a temporary
 * symlink) is removed by a later write once it is this old: far longer
 * than any write takes, so a write still under way is never touched.
 */
const DEBRIS_AGE_MS = 3600_000;

/** Why stored material was not used. */
export type StoredAbsence =
  | { found: false; reason: 'absent'; detail: string }
  | { found: false; reason: 'torn' | 'mismatch' | 'expired' | 'unusable'; detail: string };

/** Stored material with its parsed certificate, or why there is none to use. */
export type StoredResult = { found: true; tls: ServiceTls; info: CertInfo; layout: 'unit' | 'files' } | StoredAbsence;

const errno = (e: unknown): string | undefined => (e as NodeJS.ErrnoException).code;

/** The three PEM texts of the current unit (or of the older layout), or why they cannot be read. */
async function readMaterial(dir: string): Promise<{ key: string; cert: string; roots: string; layout: 'unit' | 'files' } | StoredAbsence> {
  // A writer in this process may replace the unit between readlink and the reads: read again then.
  for (let attempt = 0; ; attempt++) {
    let target: string | undefined;
    try {
      target = await readlink(join(dir, CURRENT));
    } catch (e) {
      if (errno(e) !== 'ENOENT') return { found: false, reason: 'torn', detail: `${join(dir, CURRENT)}: ${(e as Error).message}` };
    }
    const from = target === undefined ? dir : join(dir, target);
    try {
      const [key, cert, roots] = await Promise.all([FILES.key, FILES.cert, FILES.roots].map((f) => readFile(join(from, f), 'utf8')));
      return { key: key!, cert: cert!, roots: roots!, layout: target === undefined ? 'files' : 'unit' };
    } catch (e) {
      if (target !== undefined && attempt < 3 && (await readlink(join(dir, CURRENT)).catch(() => undefined)) !== target) continue;
      if (target === undefined && errno(e) === 'ENOENT') {
        // Nothing at all is absent; some of the three files is an identity written in part.
        const some = await Promise.all(Object.values(FILES).map((f) => lstat(join(dir, f)).then(() => true, () => false)));
        if (!some.includes(true)) return { found: false, reason: 'absent', detail: `no identity in ${dir}` };
      }
      return { found: false, reason: 'torn', detail: `${from}: ${(e as Error).message}` };
    }
  }
}

/**
 * Stored material with its parsed certificate, or the reason it cannot be
 * used: absent; torn (a part missing or unreadable); mismatch (the key is
 * not the certificate's); expired (unless `allowExpired`); unusable (not
 * PEM, no trust bundle, no SPIFFE ID).
 */
export async function loadStored(dir: string, now = new Date(), allowExpired = false): Promise<StoredResult> {
  const m = await readMaterial(dir);
  if ('found' in m) return m;
  let info: CertInfo;
  try {
    info = certInfo(m.cert);
  } catch (e) {
    return { found: false, reason: 'unusable', detail: `${dir}: ${(e as Error).message}` };
  }
  const bundle = splitPem(m.roots);
  if (!bundle.length) return { found: false, reason: 'unusable', detail: `${dir}: no trust bundle` };
  try {
    if (!new X509Certificate(m.cert).checkPrivateKey(createPrivateKey(m.key))) {
      return { found: false, reason: 'mismatch', detail: `${dir}: the key is not the certificate's` };
    }
  } catch (e) {
    return { found: false, reason: 'unusable', detail: `${dir}: ${(e as Error).message}` };
  }
  if (!info.spiffeId) return { found: false, reason: 'unusable', detail: `${dir}: the certificate names no SPIFFE ID` };
  if (!allowExpired && info.notAfter <= now) return { found: false, reason: 'expired', detail: `${dir}: expired at ${info.notAfter.toISOString()}` };
  return { found: true, tls: { certChainPem: m.cert, keyPem: m.key, trustBundlePem: bundle }, info, layout: m.layout };
}

/**
 * Stored material with its parsed certificate; undefined when absent,
 * torn, mismatched, unreadable, or (unless `allowExpired`) expired.
 */
export async function readStored(dir: string, now = new Date(), allowExpired = false): Promise<{ tls: ServiceTls; info: CertInfo } | undefined> {
  const got = await loadStored(dir, now, allowExpired);
  return got.found ? { tls: got.tls, info: got.info } : undefined;
}

/** The steps of writeStored, in order; `committed` is the one after which a reader sees the new unit. */
export const WRITE_STEPS = ['dir', 'unit', 'key', 'cert', 'roots', 'unit-synced', 'link', 'committed', 'files', 'cleaned'] as const;
export type WriteStep = (typeof WRITE_STEPS)[number];

/** Hooks into writeStored, for tests that stop the writer between two steps. */
export interface WriteHooks {
  /** Runs after each step, and is awaited: a test can pause or kill the writer there. */
  afterStep?: (step: WriteStep) => void | Promise<void>;
}

/** Points `name` in `dir` at `target` by renaming a new symlink over it: atomic, whatever was there. */
async function swapLink(dir: string, name: string, target: string, tag: string): Promise<void> {
  const tmp = join(dir, `${name}.tmp-${tag}`);
  await symlink(target, tmp);
  await rename(tmp, join(dir, name));
}

/**
 * Writes key, certificate chain and trust bundle as one unit (see the
 * module doc): a crash at any instant leaves the old identity or the new
 * one, whole. The key is 0600 and the directories 0700.
 */
export async function writeStored(dir: string, t: ServiceTls, hooks: WriteHooks = {}): Promise<void> {
  const step = async (s: WriteStep): Promise<void> => {
    await hooks.afterStep?.(s);
  };
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await step('dir');
  const tag = `${Date.now().toString(36)}-${randomBytes(6).toString('hex')}`;
  const unitName = `${UNIT_PREFIX}${tag}`;
  const unit = join(dir, unitName);
  await mkdir(unit, { mode: 0o700 });
  await step('unit');
  await writeSynced(join(unit, FILES.key), t.keyPem, 0o600);
  await step('key');
  await writeSynced(join(unit, FILES.cert), t.certChainPem, 0o644);
  await step('cert');
  await writeSynced(join(unit, FILES.roots), t.trustBundlePem.join('\n'), 0o644);
  await step('roots');
  // The unit's files, and its own entry in `dir`, are on disk before anything can point at it.
  await fsyncPath(unit);
  await fsyncPath(dir);
  await step('unit-synced');
  const previous = await readlink(join(dir, CURRENT)).catch(() => undefined);
  await symlink(unitName, join(dir, `${CURRENT}.tmp-${tag}`));
  await step('link');
  await rename(join(dir, `${CURRENT}.tmp-${tag}`), join(dir, CURRENT));
  await fsyncPath(dir);
  await step('committed');
  // The older layout's names, as symlinks into the current unit (done once; from then on they follow `current`).
  let converted = false;
  for (const f of Object.values(FILES)) {
    const want = join(CURRENT, f);
    if ((await readlink(join(dir, f)).catch(() => undefined)) === want) continue;
    await swapLink(dir, f, want, tag);
    converted = true;
  }
  if (converted) await fsyncPath(dir);
  await step('files');
  // The unit this write replaced (no reader can reach it any more: `current` names another, and only
  // a write makes a unit current), and debris of writers that died.
  if (previous && previous !== unitName && previous.startsWith(UNIT_PREFIX)) await rm(join(dir, previous), { recursive: true, force: true });
  for (const name of await readdir(dir)) {
    if (name === unitName || !(name.startsWith(UNIT_PREFIX) || name.includes('.tmp-'))) continue;
    const st = await lstat(join(dir, name)).catch(() => undefined);
    if (st && Date.now() - st.mtimeMs > DEBRIS_AGE_MS && (await readlink(join(dir, CURRENT)).catch(() => undefined)) !== name) {
      await rm(join(dir, name), { recursive: true, force: true });
    }
  }
  await step('cleaned');
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

/** Writes the agent's own identity as one unit (see writeStored). */
export function writeAgentIdentity(dataDir: string, t: ServiceTls, hooks?: WriteHooks): Promise<void> {
  return writeStored(agentDir(dataDir), t, hooks);
}

/** The registry credential the control plane handed this agent (`user:password`), kept 0600. */
export async function readRegistryAuth(dataDir: string): Promise<string | undefined> {
  try {
    return (await readFile(join(agentDir(dataDir), 'registry.auth'), 'utf8')).trim() || undefined;
  } catch {
    return undefined;
  }
}

/** Stores the registry credential: one file, written to a temporary name, fsynced and renamed, so it is whole or absent. */
export async function writeRegistryAuth(dataDir: string, auth: string): Promise<void> {
  await mkdir(agentDir(dataDir), { recursive: true, mode: 0o700 });
  await writeFileAtomic(join(agentDir(dataDir), 'registry.auth'), `${auth}\n`, 0o600);
}
