import { test } from 'node:test';
import assert from 'node:assert/strict';
import { compile, evaluate, precedenceOf, upsert, remove, sorted, type IntentionSet, type Intention, type Action } from './intentions.js';

const set = (defaultAction: Action, ...intentions: Intention[]): IntentionSet => ({ defaultAction, intentions });
const I = (source: string, destination: string, action: Action): Intention => ({ source, destination, action });

test('precedence follows exact->exact > *->exact > exact->* > *->*', () => {
  assert.equal(precedenceOf(I('a', 'b', 'allow')), 9);
  assert.equal(precedenceOf(I('*', 'b', 'allow')), 8);
  assert.equal(precedenceOf(I('a', '*', 'allow')), 6);
  assert.equal(precedenceOf(I('*', '*', 'allow')), 5);
});

test('no intention: the default decides and says so', () => {
  const d = evaluate(set('deny'), 'web', 'api');
  assert.deepEqual(d, { allow: false, reason: 'default', rule: 'default (deny)' });
  assert.equal(evaluate(set('allow'), 'web', 'api').allow, true);
});

test('the decision names the intention that matched', () => {
  const d = evaluate(set('deny', I('web', 'api', 'allow')), 'web', 'api');
  assert.equal(d.allow, true);
  assert.equal(d.rule, 'intention web -> api (allow)');
  assert.equal(d.reason === 'intention' && d.precedence, 9);
});

test('exhaustive: every combination of the four levels picks the most specific', () => {
  const levels: Array<[string, string]> = [['web', 'api'], ['*', 'api'], ['web', '*'], ['*', '*']];
  // Each level present or not, each with either action: 3^4 sets.
  const choices: Array<Action | undefined> = [undefined, 'allow', 'deny'];
  for (const a of choices) for (const b of choices) for (const c of choices) for (const d of choices) {
    const acts = [a, b, c, d];
    const intentions = levels.flatMap(([s, t], i) => (acts[i] ? [I(s, t, acts[i])] : []));
    for (const def of ['allow', 'deny'] as const) {
      const s = set(def, ...intentions);
      const first = acts.findIndex((x) => x !== undefined);
      const want = first === -1 ? def : acts[first];
      const got = evaluate(s, 'web', 'api');
      assert.equal(got.allow, want === 'allow', JSON.stringify({ s }));
      // Order of the list never matters.
      assert.equal(evaluate({ ...s, intentions: [...intentions].reverse() }, 'web', 'api').rule, got.rule);
      // Another pair only sees wildcard rules that cover it.
      const other = evaluate(s, 'db', 'cache');
      const wild = acts[3];
      assert.equal(other.allow, (wild ?? def) === 'allow');
    }
  }
});

test('a wildcard deny on a destination beats the default but not an exact allow', () => {
  const s = set('allow', I('*', 'db', 'deny'), I('web', 'db', 'allow'));
  assert.equal(evaluate(s, 'web', 'db').allow, true);
  const d = evaluate(s, 'api', 'db');
  assert.equal(d.allow, false);
  assert.equal(d.rule, 'intention * -> db (deny)');
});

test('duplicate pairs and bad names are refused', () => {
  assert.throws(() => compile(set('deny', I('a', 'b', 'allow'), I('a', 'b', 'deny'))), /duplicate intention a -> b/);
  assert.throws(() => compile(set('deny', I('a b', 'b', 'allow'))), /source service name/);
  assert.throws(() => upsert(set('deny'), I('a', '', 'allow')), /destination service name is empty/);
});

test('upsert replaces the same pair, remove reports whether it removed', () => {
  let s = upsert(set('deny'), I('web', 'api', 'allow'));
  s = upsert(s, I('web', 'api', 'deny'));
  assert.equal(s.intentions.length, 1);
  assert.equal(evaluate(s, 'web', 'api').allow, false);
  assert.equal(remove(s, 'web', 'api').removed, true);
  assert.equal(remove(s, 'x', 'y').removed, false);
  assert.deepEqual(sorted(set('deny', I('*', '*', 'deny'), I('a', 'b', 'allow'))).map((i) => i.source), ['a', '*']);
});
