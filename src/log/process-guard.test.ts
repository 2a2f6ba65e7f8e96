import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { pino } from 'pino';
import { installProcessGuard, EXIT_UNCAUGHT_BURST } from './process-guard.js';
import { EVENTS } from './logger.js';

type Line = { level: number; event?: string; msg: string; err?: { message: string; stack: string }; reason?: string; inWindow?: number };

/** A guard on a fake process with a fake clock, its log lines and its exits. */
function guarded(opts: { maxUncaught?: number; windowMs?: number } = {}) {
  const lines: Line[] = [];
  const log = pino({ level: 'info' }, { write: (l: string) => void lines.push(JSON.parse(l) as Line) });
  const events = new EventEmitter();
  const exits: number[] = [];
  let clock = 1_000_000;
  const uninstall = installProcessGuard(log, { events, exit: (c) => void exits.push(c), now: () => clock, ...opts });
  return {
    lines,
    exits,
    events,
    uninstall,
    advance: (ms: number) => void (clock += ms),
    throwOne: (msg = 'boom') => events.emit('uncaughtException', new Error(msg), 'uncaughtException'),
  };
}

test('an unhandled rejection is logged with its event and the process keeps serving', () => {
  const g = guarded();
  g.events.emit('unhandledRejection', new Error('nobody awaited me'), Promise.resolve());
  g.events.emit('unhandledRejection', 'a bare string', Promise.resolve());
  g.events.emit('unhandledRejection', Object.create(null), Promise.resolve());
  for (let i = 0; i < 50; i++) g.events.emit('unhandledRejection', new Error(`again ${i}`), Promise.resolve());
  assert.deepEqual(g.exits, []);
  assert.equal(g.lines.length, 53);
  assert.ok(g.lines.every((l) => l.event === EVENTS.processUnhandledRejection && l.level === 50));
  assert.equal(g.lines[0]!.err!.message, 'nobody awaited me');
  assert.match(g.lines[0]!.err!.stack, /nobody awaited me\n\s+at /);
  assert.equal(g.lines[1]!.reason, 'a bare string');
  assert.equal(g.lines[2]!.reason, 'unprintable value');
  assert.match(g.lines[0]!.msg, /still serving: nobody awaited me/);
});

test('up to 10 uncaught exceptions a minute are logged and survived; the 11th exits with 70, once', () => {
  const g = guarded();
  for (let i = 1; i <= 10; i++) {
    g.throwOne(`boom ${i}`);
    g.advance(5000);
  }
  assert.deepEqual(g.exits, []);
  assert.equal(g.lines.length, 10);
  assert.ok(g.lines.every((l) => l.event === EVENTS.processUncaughtException && l.level === 50));
  assert.deepEqual(g.lines.map((l) => l.inWindow), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  g.throwOne('boom 11');
  assert.deepEqual(g.exits, [EXIT_UNCAUGHT_BURST]);
  assert.equal(EXIT_UNCAUGHT_BURST, 70);
  const fatal = g.lines.at(-1)!;
  assert.equal(fatal.level, 60);
  assert.equal(fatal.event, EVENTS.processUncaughtException);
  assert.equal(fatal.err!.message, 'boom 11');
  assert.match(fatal.msg, /11 uncaught exceptions within 60s: exiting with status 70/);
  // While exit is under way (or, here, injected and returning), more exceptions are logged but exit is not called again.
  g.throwOne('boom 12');
  assert.deepEqual(g.exits, [70]);
});

test('the window slides: exceptions spread out never add up to an exit', () => {
  const g = guarded();
  for (let i = 0; i < 100; i++) {
    g.throwOne();
    g.advance(6001);
  }
  assert.deepEqual(g.exits, []);
  assert.ok(g.lines.every((l) => (l.inWindow ?? 0) <= 10));
});

test('the bound and the window are options', () => {
  const g = guarded({ maxUncaught: 2, windowMs: 1000 });
  g.throwOne();
  g.throwOne();
  g.advance(1000);
  g.throwOne();
  g.throwOne();
  assert.deepEqual(g.exits, []);
  g.throwOne();
  assert.deepEqual(g.exits, [70]);
});

test('uninstall removes both listeners', () => {
  const g = guarded();
  assert.equal(g.events.listenerCount('uncaughtException'), 1);
  assert.equal(g.events.listenerCount('unhandledRejection'), 1);
  g.uninstall();
  assert.equal(g.events.listenerCount('uncaughtException'), 0);
  assert.equal(g.events.listenerCount('unhandledRejection'), 0);
});

test('a logger that throws does not turn the guard into a crash', () => {
  const events = new EventEmitter();
  const exits: number[] = [];
  const log = pino({ level: 'info' }, { write: () => { throw new Error('EPIPE'); } });
  installProcessGuard(log, { events, exit: (c) => void exits.push(c), maxUncaught: 1 });
  events.emit('unhandledRejection', new Error('x'), Promise.resolve());
  events.emit('uncaughtException', new Error('x'), 'uncaughtException');
  assert.deepEqual(exits, []);
  events.emit('uncaughtException', new Error('x'), 'uncaughtException');
  assert.deepEqual(exits, [70]);
});

test('on a real process: a throw from a timer and a rejected promise are survived, a burst exits 70', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'knit-guard-'));
  try {
    const script = join(dir, 'child.mts');
    const url = (p: string) => pathToFileURL(join(import.meta.dirname, p)).href;
    await writeFile(script, `
      import { installProcessGuard } from ${JSON.stringify(url('process-guard.ts'))};
      import { createLogger } from ${JSON.stringify(url('logger.ts'))};
      installProcessGuard(createLogger(), { maxUncaught: 3 });
      void Promise.reject(new Error('rejected on purpose'));
      let n = 0;
      const step = () => {
        n += 1;
        if (n === 3) process.stdout.write('still serving after 2 throws\\n');
        setImmediate(step);
        throw new Error('thrown on purpose ' + n);
      };
      setImmediate(step);
    `);
    const r = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const c = execFile(process.execPath, ['--import', 'tsx', script], { cwd: join(import.meta.dirname, '..', '..'), timeout: 30_000 }, (_e, stdout, stderr) => resolve({ code: c.exitCode, stdout, stderr }));
    });
    assert.equal(r.code, 70, r.stderr);
    assert.match(r.stdout, /still serving after 2 throws/);
    const lines = r.stderr.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Line);
    assert.deepEqual(lines.map((l) => [l.event, l.level]), [
      [EVENTS.processUnhandledRejection, 50],
      [EVENTS.processUncaughtException, 50],
      [EVENTS.processUncaughtException, 50],
      [EVENTS.processUncaughtException, 50],
      [EVENTS.processUncaughtException, 60],
    ]);
    assert.equal(lines.at(-1)!.err!.message, 'thrown on purpose 4');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
