import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import { RateLimitedLog } from './ratelimit.js';
import { EVENTS } from './logger.js';
import { until } from '../../test/helpers/wait.js';

interface Line {
  level: number;
  event?: string;
  msg: string;
  suppressed?: number;
  suppressedEvent?: string;
  [k: string]: unknown;
}

/** A real pino logger whose lines land in an array. */
function capture(): { log: pino.Logger; lines: Line[] } {
  const lines: Line[] = [];
  const log = pino({ level: 'debug', base: undefined }, { write: (s: string) => lines.push(JSON.parse(s) as Line) });
  return { log, lines };
}

test('the first `burst` lines of a key are written, the rest summarized once the window closes', () => {
  const { log, lines } = capture();
  let now = 1_000;
  const rl = new RateLimitedLog(log, { burst: 3, windowMs: 10_000, now: () => now });
  for (let i = 0; i < 100; i++) rl.warn('conn.rejected|no client certificate', { event: 'conn.rejected', reason: 'no client certificate', i }, `refused ${i}`);
  assert.equal(lines.length, 3);
  assert.deepEqual(lines.map((l) => l.i), [0, 1, 2]);
  // The next line after the window first reports what the last window suppressed.
  now += 10_000;
  assert.equal(rl.warn('conn.rejected|no client certificate', { event: 'conn.rejected', i: 100 }, 'refused 100'), true);
  assert.equal(lines.length, 5);
  const summary = lines[3]!;
  assert.equal(summary.event, EVENTS.logSuppressed);
  assert.equal(summary.suppressedEvent, 'conn.rejected');
  assert.equal(summary.suppressed, 97);
  assert.equal(summary.msg, 'suppressed 97 similar in 10 s: refused 0');
  assert.equal(summary.level, 40, 'at the level of the lines it stands for');
  assert.equal(lines[4]!.i, 100);
});

test('keys are limited independently, and a global budget bounds many distinct keys', () => {
  const { log, lines } = capture();
  const rl = new RateLimitedLog(log, { burst: 2, maxPerWindow: 10, windowMs: 10_000, now: () => 0 });
  for (let i = 0; i < 5; i++) {
    rl.warn('a', { event: 'x' }, 'a');
    rl.warn('b', { event: 'x' }, 'b');
  }
  assert.deepEqual(lines.map((l) => l.msg), ['a', 'b', 'a', 'b']);
  for (let k = 0; k < 1000; k++) rl.warn(`k${k}`, { event: 'x' }, `k${k}`);
  assert.equal(lines.length, 10, 'at most maxPerWindow lines per window, however many keys');
  rl.flush();
  assert.equal(lines.length, 11, 'one line says how much went unsaid');
  assert.equal(lines[10]!.event, EVENTS.logSuppressed);
  assert.equal(lines[10]!.suppressed, 6 + 1000 - 6);
});

test('the number of keys tracked is bounded; the oldest is summarized when evicted', () => {
  const { log, lines } = capture();
  const rl = new RateLimitedLog(log, { burst: 1, maxKeys: 4, maxPerWindow: 1000, now: () => 0 });
  rl.warn('first', { event: 'x' }, 'first');
  rl.warn('first', { event: 'x' }, 'first again');
  for (let k = 0; k < 100; k++) rl.warn(`k${k}`, { event: 'x' }, `k${k}`);
  assert.ok(rl.size <= 4);
  const summary = lines.find((l) => l.event === EVENTS.logSuppressed);
  assert.equal(summary?.suppressed, 1);
  assert.equal(summary?.key, 'first');
});

test('a burst that stops is still summarized when its window closes, without another line', async () => {
  const { log, lines } = capture();
  const rl = new RateLimitedLog(log, { burst: 1, windowMs: 50 });
  for (let i = 0; i < 10; i++) rl.warn('k', { event: 'conn.failed' }, 'failed');
  assert.equal(lines.length, 1);
  const summary = await until('summary written by the window timer', () => lines.find((l) => l.event === EVENTS.logSuppressed));
  assert.equal(summary.suppressed, 9);
  assert.equal(rl.size, 0, 'the closed window is forgotten');
});

test('flush writes pending summaries and forgets every key', () => {
  const { log, lines } = capture();
  const rl = new RateLimitedLog(log, { burst: 1 });
  rl.info('a', { event: 'x' }, 'a');
  rl.info('a', { event: 'x' }, 'a');
  rl.info('b', { event: 'x' }, 'b');
  rl.flush();
  assert.deepEqual(lines.map((l) => l.msg), ['a', 'b', 'suppressed 1 similar in 10 s: a']);
  assert.equal(rl.size, 0);
});
