/**
 * Intentions: allow/deny between services, and the pure `evaluate()` that
 * turns them into a Decision. Only a whole-value `*` wildcard exists.
 * Precedence (Consul's numbers, highest first): exact->exact 9,
 * `*`->exact 8, exact->`*` 6, `*`->`*` 5. A source/destination pair is
 * unique, so at most one intention matches at each level and the result
 * never depends on list order. When nothing matches, the set's explicit
 * default decides (deny unless configured) and the decision says so.
 */
import { validateSegment } from '../identity/spiffe.js';
import { byCodeUnit } from '../compare.js';
import { KnitError } from '../errors.js';

export type Action = 'allow' | 'deny';

/** One intention: `source -> destination : action`. */
export interface Intention {
  source: string;
  destination: string;
  action: Action;
  description?: string;
}

/** All intentions plus the default applied when none matches. */
export interface IntentionSet {
  defaultAction: Action;
  intentions: Intention[];
}

/** Why a connection was allowed or denied; always names the rule. */
export type Decision =
  | { allow: boolean; reason: 'intention'; intention: Intention; precedence: number; rule: string }
  | { allow: boolean; reason: 'default'; rule: string };

export const WILDCARD = '*';

/** Precedence of an intention by the shape of its two sides. */
export function precedenceOf(i: Pick<Intention, 'source' | 'destination'>): number {
  const srcWild = i.source === WILDCARD;
  const dstWild = i.destination === WILDCARD;
  if (!srcWild && !dstWild) return 9;
  if (srcWild && !dstWild) return 8;
  if (!srcWild && dstWild) return 6;
  return 5;
}

/** The human name of an intention, as logs and `knit intention check` print it. */
export function ruleName(i: Pick<Intention, 'source' | 'destination' | 'action'>): string {
  return `intention ${i.source} -> ${i.destination} (${i.action})`;
}

/** Checks a service name or `*` as one side of an intention. */
export function validateSide(name: string, side: 'source' | 'destination'): string {
  if (name === WILDCARD) return name;
  try {
    return validateSegment(name, `${side} service name`);
  } catch (e) {
    throw new KnitError('KNIT_ERR_BAD_REQUEST', (e as Error).message.replace(/^invalid SPIFFE ID [^:]*: /, ''));
  }
}

const key = (src: string, dst: string): string => `${src}\u0000${dst}`;

/** A compiled, immutable intention set answering `evaluate` with four map lookups. */
export interface Evaluator {
  readonly set: IntentionSet;
  evaluate(source: string, destination: string): Decision;
}

/** Compiles a set; throws KNIT_ERR_BAD_REQUEST on a duplicate pair or a bad name. */
export function compile(set: IntentionSet): Evaluator {
  const byPair = new Map<string, Intention>();
  for (const i of set.intentions) {
    validateSide(i.source, 'source');
    validateSide(i.destination, 'destination');
    const k = key(i.source, i.destination);
    if (byPair.has(k)) throw new KnitError('KNIT_ERR_BAD_REQUEST', `duplicate intention ${i.source} -> ${i.destination}`);
    byPair.set(k, i);
  }
  const defaultDecision: Decision = {
    allow: set.defaultAction === 'allow',
    reason: 'default',
    rule: `default (${set.defaultAction})`,
  };
  const decide = (i: Intention): Decision => ({
    allow: i.action === 'allow',
    reason: 'intention',
    intention: i,
    precedence: precedenceOf(i),
    rule: ruleName(i),
  });
  return {
    set,
    evaluate(source: string, destination: string): Decision {
      const hit =
        byPair.get(key(source, destination)) ??
        byPair.get(key(WILDCARD, destination)) ??
        byPair.get(key(source, WILDCARD)) ??
        byPair.get(key(WILDCARD, WILDCARD));
      return hit ? decide(hit) : defaultDecision;
    },
  };
}

/** Evaluates one connection against a set. Pure; compile once when evaluating many. */
export function evaluate(set: IntentionSet, source: string, destination: string): Decision {
  return compile(set).evaluate(source, destination);
}

/** Returns a new set with `i` added or replacing the intention on the same pair. */
export function upsert(set: IntentionSet, i: Intention): IntentionSet {
  validateSide(i.source, 'source');
  validateSide(i.destination, 'destination');
  const rest = set.intentions.filter((x) => !(x.source === i.source && x.destination === i.destination));
  return { ...set, intentions: [...rest, i] };
}

/** Returns a new set without the intention on this pair, and whether one was removed. */
export function remove(set: IntentionSet, source: string, destination: string): { set: IntentionSet; removed: boolean } {
  const rest = set.intentions.filter((x) => !(x.source === source && x.destination === destination));
  return { set: { ...set, intentions: rest }, removed: rest.length !== set.intentions.length };
}

/** Sorted by precedence then names, the order `list` prints. */
export function sorted(set: IntentionSet): Intention[] {
  return [...set.intentions].sort(
    (a, b) =>
      precedenceOf(b) - precedenceOf(a) || byCodeUnit(a.source, b.source) || byCodeUnit(a.destination, b.destination),
  );
}
