import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseIntentionsFile, applyFile } from './intentions-file.js';
import { ConfigError } from '../errors.js';

test('parses the product.md example', () => {
  const f = parseIntentionsFile('i.yaml', 'default: deny\nintentions:\n  - { source: web, destination: api, action: allow }\n  - { source: "*", destination: db, action: deny }\n');
  assert.equal(f.defaultAction, 'deny');
  assert.deepEqual(f.intentions[1], { source: '*', destination: 'db', action: 'deny' });
  assert.deepEqual(applyFile({ defaultAction: 'allow', intentions: [] }, { intentions: [] }).defaultAction, 'allow');
});

const bad: Array<[string, string, number, RegExp]> = [
  ['bad action', 'intentions:\n  - { source: a, destination: b, action: permit }\n', 2, /intentions\[0\]\.action: must be "allow" or "deny"/],
  ['unknown field', 'intentions:\n  - source: a\n    destination: b\n    action: allow\n    port: 80\n', 5, /intentions\[0\]\.port: unknown field "port"/],
  ['duplicate pair', 'intentions:\n  - { source: a, destination: b, action: allow }\n  - { source: a, destination: b, action: deny }\n', 3, /duplicate intention a -> b/],
  ['bad name', 'intentions:\n  - { source: "a b", destination: b, action: allow }\n', 2, /intentions\[0\]\.source: .*may only contain/],
  ['bad default', 'default: maybe\nintentions: []\n', 1, /default: must be "allow" or "deny"/],
];
for (const [what, text, line, re] of bad) {
  test(`rejects ${what} with file:line: field`, () => {
    assert.throws(() => parseIntentionsFile('i.yaml', text), (e: unknown) => {
      assert.ok(e instanceof ConfigError);
      assert.match(e.message, re);
      assert.ok(e.problems.some((p) => p.line === line && p.file === 'i.yaml'), JSON.stringify(e.problems));
      return true;
    });
  });
}

test('regression: a type error in one intention hid the problems of the others', () => {
  assert.throws(() => parseIntentionsFile('i.yaml', 'default: deny\nintentions:\n  - { source: 1, destination: b, action: allow }\n  - { source: "a b", destination: b, action: allow }\n  - { source: c, destination: d, action: permit }\n'), (e: unknown) => {
    assert.ok(e instanceof ConfigError);
    assert.deepEqual(e.problems.map((p) => [p.line, p.field]), [
      [3, 'intentions[0].source'],
      [5, 'intentions[2].action'],
      [4, 'intentions[1].source'],
    ]);
    assert.match(e.problems[0]!.message, /must be string, not number 1/);
    return true;
  });
});

test('an intentions file whose intentions are not a list says so once', () => {
  assert.throws(() => parseIntentionsFile('i.yaml', 'intentions: { source: a }\n'), (e: unknown) => e instanceof ConfigError && e.problems.length === 1 && /intentions: must be array, not a map/.test(e.message));
});
