/**
 * Signed documents in the registry's KV: the control plane writes them
 * (read-modify-write under compare-and-set, `seq` one higher each time),
 * every reader verifies them (identity/signed-doc.ts) before acting on one.
 * A watcher refuses a document that does not verify or whose `seq` is
 * lower than the last one it accepted (a rollback to an older, validly
 * signed copy), tells `onRefused`, and keeps the last good one in force.
 */
import { KnitError } from '../errors.js';
import { signDocument, verifyDocument, type DocumentTrust, type SignerMaterial, type VerifiedDocument } from '../identity/signed-doc.js';
import type { Registry, Watch } from './registry.js';

/** How many times a read-modify-write retries a lost compare-and-set. */
const CAS_RETRIES = 20;

/**
 * The next `seq`: one more than the last, and at least the clock in ms, so
 * that a document written over a tampered one (whose seq is unknown) still
 * outranks every document readers have accepted before.
 */
const nextSeq = (prev: number | undefined): number => Math.max((prev ?? 0) + 1, Date.now());

/** A verified document with the KV version it was read at. */
export interface StoredDocument<T> {
  doc?: VerifiedDocument<T>;
  /** KV version; 0 when the key does not exist. */
  version: number;
}

export interface SignedKvOptions {
  registry: Registry;
  /** What readers trust (roots, trust domain); read at every verification so a rotated bundle applies. */
  trust: () => DocumentTrust;
  /** The control plane's signer; absent for read-only clients (agents). */
  signer?: () => Promise<SignerMaterial>;
}

/** Reads, writes and watches signed documents under registry keys. */
export class SignedKv {
  constructor(private readonly o: SignedKvOptions) {}

  /** Reads and verifies `key`; rejects KNIT_ERR_SIGNATURE when the stored value is not the control plane's. */
  async read<T>(key: string, kind: string): Promise<StoredDocument<T>> {
    const e = await this.o.registry.kvGet(key);
    if (!e) return { version: 0 };
    return { doc: await verifyDocument<T>(e.value, kind, this.o.trust()), version: e.version };
  }

  private async sign(kind: string, seq: number, body: unknown): Promise<string> {
    if (!this.o.signer) throw new KnitError('KNIT_ERR_UNAUTHORIZED', `only the control plane writes ${kind} documents`);
    return signDocument(await this.o.signer(), this.o.trust().trustDomain, kind, seq, body);
  }

  /** Writes `body` only if `key` does not exist; resolves false when it already did. */
  async create(key: string, kind: string, body: unknown): Promise<boolean> {
    try {
      await this.o.registry.kvSet(key, await this.sign(kind, 1, body), 0);
      return true;
    } catch (e) {
      if (e instanceof KnitError && e.code === 'KNIT_ERR_CAS_CONFLICT') return false;
      throw e;
    }
  }

  /**
   * Read-modify-write under compare-and-set, retried on conflicts. `fn`
   * gets the current body (undefined when absent) and returns the next
   * one, or `undefined` to write nothing. A stored value that does not
   * verify is an error, never silently overwritten: the operator must see
   * that someone wrote under knit's keys.
   */
  async update<T>(key: string, kind: string, fn: (cur: T | undefined) => T | undefined | Promise<T | undefined>): Promise<T | undefined> {
    for (let i = 0; ; i++) {
      const { doc, version } = await this.read<T>(key, kind);
      const next = await fn(doc?.body);
      if (next === undefined) return doc?.body;
      try {
        await this.o.registry.kvSet(key, await this.sign(kind, nextSeq(doc?.seq), next), version);
        return next;
      } catch (e) {
        if (!(e instanceof KnitError && e.code === 'KNIT_ERR_CAS_CONFLICT') || i >= CAS_RETRIES) throw e;
      }
    }
  }

  /**
   * Writes `body` whatever is stored, even a value that does not verify:
   * for documents the control plane owns whole (a full intentions apply,
   * the trust bundle), so that an operator can always put things right
   * after someone wrote under knit's keys. Still a compare-and-set against
   * the value just read, so no concurrent control-plane write is lost.
   */
  async replace(key: string, kind: string, body: unknown): Promise<void> {
    for (let i = 0; ; i++) {
      const raw = await this.o.registry.kvGet(key);
      const prev = raw ? await verifyDocument(raw.value, kind, this.o.trust()).then((d) => d.seq, () => undefined) : undefined;
      try {
        await this.o.registry.kvSet(key, await this.sign(kind, nextSeq(prev), body), raw?.version ?? 0);
        return;
      } catch (e) {
        if (!(e instanceof KnitError && e.code === 'KNIT_ERR_CAS_CONFLICT') || i >= CAS_RETRIES) throw e;
      }
    }
  }

  /** Deletes `key` (compare-and-set on `version` when given). */
  async delete(key: string, version?: number): Promise<void> {
    await this.o.registry.kvDelete(key, version);
  }

  /**
   * Delivers each verified document of `key` (or undefined when the key is
   * absent) now and after every change. A value that does not verify, or
   * whose `seq` is lower than the last accepted one, goes to `onRefused`
   * and changes nothing; registry errors go to `onError` (fail static).
   */
  watch<T>(
    key: string,
    kind: string,
    onDoc: (doc: VerifiedDocument<T> | undefined) => void,
    onRefused: (err: KnitError) => void,
    onError: (err: Error) => void,
  ): Watch {
    let lastSeq = -1;
    // Verification is async; deliveries stay in registry order.
    let chain: Promise<void> = Promise.resolve();
    return this.o.registry.watchKey(
      key,
      (entry) => {
        chain = chain.then(async () => {
          if (!entry) return onDoc(undefined);
          try {
            const doc = await verifyDocument<T>(entry.value, kind, this.o.trust());
            if (doc.seq < lastSeq) throw new KnitError('KNIT_ERR_SIGNATURE', `${kind}: refusing seq ${doc.seq} signed ${doc.iat.toISOString()}, older than the seq ${lastSeq} in force (a rollback)`);
            lastSeq = doc.seq;
            onDoc(doc);
          } catch (e) {
            onRefused(e instanceof KnitError ? e : new KnitError('KNIT_ERR_SIGNATURE', `${kind}: ${(e as Error).message}`));
          }
        });
      },
      onError,
    );
  }
}
