import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Router } from './route.js';

const key = (e: string) => e;
function router(list: string[], outlier = {}, start = 0) {
  let now = 0;
  const r = new Router<string>({ key, outlier: { jitter: 0, ...outlier }, now: () => now, random: () => start });
  r.setEndpoints(list);
  return { r, advance: (ms: number) => (now += ms), at: () => now };
}

test('round-robin from a random start, skipping nothing while all are healthy', () => {
  const r = new Router<string>({ key, random: () => 0.5 });
  r.setEndpoints(['a', 'b', 'c', 'd']);
  const picks = Array.from({ length: 6 }, () => {
    const e = r.pick()!;
    r.success(e);
    return e;
  });
  assert.deepEqual(picks, ['c', 'd', 'a', 'b', 'c', 'd']);
});

test('a connection never gets the same endpoint twice, and runs out after every one was tried', () => {
  const { r } = router(['a', 'b', 'c']);
  const tried = new Set<string>();
  for (let i = 0; i < 3; i++) tried.add(r.pick(tried)!);
  assert.deepEqual([...tried].sort(), ['a', 'b', 'c']);
  assert.equal(r.pick(tried), undefined);
});

test('consecutive failures eject an endpoint; a success in between resets the count', () => {
  const { r } = router(['a', 'b'], { consecutiveFailures: 3, baseEjectionMs: 1000 });
  r.failure('a');
  r.failure('a');
  r.success('a');
  r.failure('a');
  assert.deepEqual(r.failure('a'), { ejected: false, consecutive: 2 });
  assert.deepEqual(r.failure('a'), { ejected: true, forMs: 1000, ejections: 1 });
  for (let i = 0; i < 5; i++) assert.equal(r.pick(), 'b', 'ejected endpoints are skipped');
});

test('ejection backs off exponentially up to the cap; probation lets one attempt through and one failure re-ejects', () => {
  const { r, advance } = router(['a', 'b'], { consecutiveFailures: 2, baseEjectionMs: 1000, maxEjectionMs: 5000 });
  r.failure('a');
  const periods: number[] = [];
  let out = r.failure('a');
  for (let i = 0; i < 5; i++) {
    assert.equal(out.ejected, true);
    if (!out.ejected) return;
    periods.push(out.forMs);
    advance(out.forMs);
    // Probation: the first pick that reaches it gets it, concurrent ones skip it until it reports.
    const seen = [r.pick(), r.pick(), r.pick()];
    assert.equal(seen.filter((e) => e === 'a').length, 1, `one probe at a time (${seen.join()})`);
    out = r.failure('a');
  }
  assert.deepEqual(periods, [1000, 2000, 4000, 5000, 5000]);
  // A success restores it fully: the next ejection needs `consecutiveFailures` again and starts at the base.
  if (!out.ejected) return;
  advance(out.forMs);
  assert.equal(r.success('a'), true, 'reported as restored');
  assert.deepEqual(r.failure('a'), { ejected: false, consecutive: 1 });
  assert.deepEqual(r.failure('a'), { ejected: true, forMs: 1000, ejections: 1 });
});

test('late failures of attempts begun before an ejection do not lengthen it', () => {
  const { r } = router(['a', 'b'], { consecutiveFailures: 1, baseEjectionMs: 1000 });
  assert.deepEqual(r.failure('a'), { ejected: true, forMs: 1000, ejections: 1 });
  assert.deepEqual(r.failure('a'), { ejected: false, consecutive: 0 });
  assert.equal(r.states().find((s) => s.key === 'a')?.ejections, 1);
});

test('never all ejected: with every untried endpoint ejected, the least recently failed is tried', () => {
  const { r, advance } = router(['a', 'b', 'c'], { consecutiveFailures: 1, baseEjectionMs: 60_000 });
  r.failure('b');
  advance(10);
  r.failure('a');
  advance(10);
  r.failure('c');
  assert.equal(r.pick(), 'b');
  assert.equal(r.pick(new Set(['b'])), 'a');
  assert.equal(r.pick(new Set(['b', 'a'])), 'c');
});

test('jitter lengthens a period by up to its ratio', () => {
  const r = new Router<string>({ key, outlier: { consecutiveFailures: 1, baseEjectionMs: 1000, jitter: 0.5 }, now: () => 0, random: () => 0.999 });
  r.setEndpoints(['a']);
  const out = r.failure('a');
  assert.ok(out.ejected && out.forMs > 1000 && out.forMs <= 1500, JSON.stringify(out));
});

test('an endpoint update keeps the state of endpoints that stay and forgets the ones that left', () => {
  const { r } = router(['a', 'b'], { consecutiveFailures: 1, baseEjectionMs: 60_000 });
  r.failure('a');
  r.failure('b');
  r.setEndpoints(['a', 'c']);
  assert.deepEqual(r.states().map((s) => [s.key, s.ejections]), [['a', 1], ['c', 0]]);
  r.setEndpoints(['a', 'b']);
  assert.equal(r.states().find((s) => s.key === 'b')?.ejections, 0, 'b came back with a clean slate');
  assert.deepEqual(r.failure('gone'), { ejected: false, consecutive: 0 }, 'a late report about a departed endpoint is ignored');
});
