/**
 * Intentions kept in the registry's KV under one key, as one document
 * `{ "default": "deny", "intentions": [...] }` signed by the control plane,
 * so that a change is a single compare-and-set, every agent sees whole
 * sets, never half of an apply, and nobody but the control plane can write
 * a set an agent will apply.
 */
import { KnitError } from '../errors.js';
import { KV_KEYS, type Watch } from '../registry/registry.js';
import type { SignedKv } from '../registry/signed-kv.js';
import { compile, type Action, type Evaluator, type Intention, type IntentionSet } from './intentions.js';

/** The `kind` intentions documents are signed as. */
export const INTENTIONS_KIND = 'intentions';

interface Stored {
  default: Action;
  intentions: Intention[];
}

/** Checks a stored document's body; throws KNIT_ERR_BAD_REQUEST naming what is wrong. */
export function decodeIntentions(body: unknown): IntentionSet {
  const doc = body as Partial<Stored> | undefined;
  if (!doc || (doc.default !== 'allow' && doc.default !== 'deny') || !Array.isArray(doc.intentions)) {
    throw new KnitError('KNIT_ERR_BAD_REQUEST', 'stored intentions need "default" (allow|deny) and an "intentions" list');
  }
  const set: IntentionSet = { defaultAction: doc.default, intentions: doc.intentions };
  compile(set);
  return set;
}

export function encodeIntentions(set: IntentionSet): Stored {
  return { default: set.defaultAction, intentions: set.intentions };
}

/** What an agent is told when an intentions document is applied. */
export interface AppliedIntentions {
  evaluator: Evaluator;
  seq: number;
  signer: string;
}

/** Reads, changes and watches the intention set in a registry. */
export class IntentionStore {
  constructor(private readonly kv: SignedKv) {}

  /** The current set and its version; `undefined` set when none was ever written. */
  async read(): Promise<{ set?: IntentionSet; version: number }> {
    const { doc, version } = await this.kv.read<Stored>(KV_KEYS.intentions, INTENTIONS_KIND);
    return doc ? { set: decodeIntentions(doc.body), version } : { version };
  }

  /** Writes the initial set only if none exists; returns the set in force. */
  async seed(set: IntentionSet): Promise<IntentionSet> {
    compile(set);
    if (await this.kv.create(KV_KEYS.intentions, INTENTIONS_KIND, encodeIntentions(set))) return set;
    const cur = await this.read();
    if (cur.set) return cur.set;
    throw new KnitError('KNIT_ERR_CAS_CONFLICT', 'intentions vanished while seeding them');
  }

  /** Read-modify-write with compare-and-set, retried on conflicts. `fn` must be pure. */
  async update(fn: (cur: IntentionSet) => IntentionSet, fallbackDefault: Action = 'deny'): Promise<IntentionSet> {
    const next = await this.kv.update<Stored>(KV_KEYS.intentions, INTENTIONS_KIND, (cur) => {
      const set = fn(cur ? decodeIntentions(cur) : { defaultAction: fallbackDefault, intentions: [] });
      compile(set);
      return encodeIntentions(set);
    });
    return decodeIntentions(next);
  }

  /**
   * Replaces the whole set (`knit intention apply`), whatever is stored:
   * the way back after someone wrote a document the control plane did not sign.
   */
  async replace(set: IntentionSet): Promise<IntentionSet> {
    compile(set);
    await this.kv.replace(KV_KEYS.intentions, INTENTIONS_KIND, encodeIntentions(set));
    return set;
  }

  /**
   * Delivers a compiled evaluator now and after each change. A stored
   * document that is not the control plane's (unsigned, forged, a
   * rollback) or does not parse goes to `onRefused`, and the last good set
   * stays in force (fail static), as it does while the registry is
   * unreachable (`onError`).
   */
  watch(onSet: (applied: AppliedIntentions | undefined) => void, onRefused: (e: KnitError) => void, onError: (e: Error) => void): Watch {
    return this.kv.watch<Stored>(
      KV_KEYS.intentions,
      INTENTIONS_KIND,
      (doc) => {
        if (!doc) return onSet(undefined);
        try {
          onSet({ evaluator: compile(decodeIntentions(doc.body)), seq: doc.seq, signer: doc.signer });
        } catch (e) {
          onRefused(new KnitError('KNIT_ERR_SIGNATURE', `intentions seq ${doc.seq}: ${(e as Error).message}`));
        }
      },
      onRefused,
      onError,
    );
  }
}
