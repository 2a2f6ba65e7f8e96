import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { retrying } from './retry.js';
import { KnitError } from './errors.js';
import { EVENTS } from './log/logger.js';

/** A logger whose records land in an array. */
function recordingLogger(): { log: pino.Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  return { log: pino({ level: 'info' }, sink), lines };
}

test('retrying says what it waits for and where, with the last error, on one line per failure', async () => {
  const { log, lines } = recordingLogger();
  let n = 0;
  const got = await retrying('ZooKeeper at 127.0.0.1:1', log, async () => {
    if (++n < 3) throw new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', 'connection refused');
    return 'up';
  }, { firstDelayMs: 1, maxDelayMs: 5 });
  assert.equal(got, 'up');
  assert.equal(lines.length, 2);
  for (const l of lines) {
    assert.equal(l.event, EVENTS.waiting);
    assert.equal(l.waitingFor, 'ZooKeeper at 127.0.0.1:1');
    assert.match(String(l.msg), /^waiting for ZooKeeper at 127\.0\.0\.1:1: connection refused \(attempt \d, [\d.]+s so far; next try in [\d.]+s\)$/);
  }
});

test('regression: a server that cannot reach its registry was silent for 10 s per attempt (a line comes at least every reportEveryMs, even while an attempt hangs)', async () => {
  const { log, lines } = recordingLogger();
  let n = 0;
  const t0 = Date.now();
  await retrying('ZooKeeper at zk1:2181', log, async () => {
    n++;
    // The first attempt hangs far longer than the report interval, as a ZooKeeper connect does.
    if (n === 1) {
      await new Promise((r) => setTimeout(r, 300));
      throw new KnitError('KNIT_ERR_REGISTRY_UNAVAILABLE', 'cannot reach ZooKeeper within 300 ms');
    }
    return true;
  }, { firstDelayMs: 1, reportEveryMs: 50 });
  const during = lines.filter((l) => Number(l.waitedMs) < 300);
  assert.ok(during.length >= 3, `lines while the attempt hung: ${JSON.stringify(lines)}`);
  assert.match(String(during[0]!.msg), /^waiting for ZooKeeper at zk1:2181: no answer yet \(attempt 1, [\d.]+s so far\)$/);
  assert.ok(Date.now() - t0 >= 300);
});

test('the backoff is capped so that a line comes every few seconds', async () => {
  const { log, lines } = recordingLogger();
  let n = 0;
  await retrying('x', log, async () => {
    if (++n < 8) throw new KnitError('KNIT_ERR_SERVER_UNAVAILABLE', 'down');
  }, { firstDelayMs: 1, maxDelayMs: 4 });
  assert.deepEqual(lines.map((l) => l.retryInMs), [1, 2, 4, 4, 4, 4, 4]);
});

test('a failure that retrying cannot help ends the wait at once', async () => {
  const { log, lines } = recordingLogger();
  await assert.rejects(retrying('x', log, async () => {
    throw new KnitError('KNIT_ERR_UNAUTHORIZED', 'revoked');
  }), /revoked/);
  await assert.rejects(retrying('x', log, async () => {
    throw new Error('bug');
  }), /bug/);
  assert.equal(lines.length, 0);
});
