/**
 * Intentions kept in the registry's KV under one key, as one JSON document
 * `{ "default": "deny", "intentions": [...] }`, so that a change is a single
 * compare-and-set and every agent sees whole sets, never half of an apply.
 */
import { KnitError } from '../errors.js';
import { KV_KEYS, type Registry, type Watch } from '../registry/registry.js';
import { compile, type Action, type Evaluator, type Intention, type IntentionSet } from './intentions.js';

/** How many times a read-modify-write retries a lost compare-and-set. */
const CAS_RETRIES = 10;

interface Stored {
  default: Action;
  intentions: Intention[];
}

/** Parses the stored document; throws KNIT_ERR_BAD_REQUEST naming what is wrong. */
export function decodeIntentions(text: string): IntentionSet {
  let doc: Stored;
  try {
    doc = JSON.parse(text) as Stored;
  } catch (e) {
    throw new KnitError('KNIT_ERR_BAD_REQUEST', `stored intentions are not JSON: ${(e as Error).message}`);
  }
  if ((doc.default !== 'allow' && doc.default !== 'deny') || !Array.isArray(doc.intentions)) {
    throw new KnitError('KNIT_ERR_BAD_REQUEST', 'stored intentions need "default" (allow|deny) and an "intentions" list');
  }
  const set: IntentionSet = { defaultAction: doc.default, intentions: doc.intentions };
  compile(set);
  return set;
}

export function encodeIntentions(set: IntentionSet): string {
  return JSON.stringify({ default: set.defaultAction, intentions: set.intentions } satisfies Stored);
}

/** Reads, changes and watches the intention set in a registry. */
export class IntentionStore {
  constructor(private readonly registry: Registry) {}

  /** The current set and its version; `undefined` set when none was ever written. */
  async read(): Promise<{ set?: IntentionSet; version: number }> {
    const e = await this.registry.kvGet(KV_KEYS.intentions);
    return e ? { set: decodeIntentions(e.value), version: e.version } : { version: 0 };
  }

  /** Writes the initial set only if none exists; returns the set in force. */
  async seed(set: IntentionSet): Promise<IntentionSet> {
    compile(set);
    try {
      await this.registry.kvSet(KV_KEYS.intentions, encodeIntentions(set), 0);
      return set;
    } catch (e) {
      if (e instanceof KnitError && e.code === 'KNIT_ERR_CAS_CONFLICT') {
        const cur = await this.read();
        if (cur.set) return cur.set;
      }
      throw e;
    }
  }

  /** Read-modify-write with compare-and-set, retried on conflicts. `fn` must be pure. */
  async update(fn: (cur: IntentionSet) => IntentionSet, fallbackDefault: Action = 'deny'): Promise<IntentionSet> {
    for (let i = 0; ; i++) {
      const { set, version } = await this.read();
      const next = fn(set ?? { defaultAction: fallbackDefault, intentions: [] });
      compile(next);
      try {
        await this.registry.kvSet(KV_KEYS.intentions, encodeIntentions(next), version);
        return next;
      } catch (e) {
        if (!(e instanceof KnitError && e.code === 'KNIT_ERR_CAS_CONFLICT') || i >= CAS_RETRIES) throw e;
      }
    }
  }

  /**
   * Delivers a compiled evaluator now and after each change. A stored
   * document that does not parse is reported to `onError` and the last good
   * set stays in force (fail static), as does an unreachable registry.
   */
  watch(onSet: (ev: Evaluator | undefined) => void, onError: (e: Error) => void): Watch {
    return this.registry.watchKey(
      KV_KEYS.intentions,
      (entry) => {
        if (!entry) return onSet(undefined);
        try {
          onSet(compile(decodeIntentions(entry.value)));
        } catch (e) {
          onError(e as Error);
        }
      },
      onError,
    );
  }
}
