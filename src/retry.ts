/**
 * Waiting for something remote (registry, control plane): the one shared
 * wait loop. It retries while the failure is retryable, with a backoff
 * capped at a few seconds, and says on one human-readable line what it is
 * waiting for and where, at least every `reportEveryMs`, even while a
 * single attempt hangs (a ZooKeeper connect waits up to 10 s before it
 * fails), so that a person watching `knit server` start is never left
 * looking at a silent terminal.
 */
import { setTimeout as delay } from 'node:timers/promises';
import { KnitError } from './errors.js';
import { EVENTS, type Logger } from './log/logger.js';

/** Tuning of a wait; the defaults suit a person watching a terminal. */
export interface RetryOptions {
  /** Longest pause between attempts (backoff 0.5 s, 1 s, 2 s, ... up to this). Default 5000. */
  maxDelayMs?: number;
  /** First pause. Default 500. */
  firstDelayMs?: number;
  /** A line at least this often while waiting, attempts included. Default 5000. */
  reportEveryMs?: number;
  /** The clock. Default `Date.now`. */
  now?: () => number;
}

/** `0.5s`, `2s`, `12s`: short, and never "0s" for a half-second pause. */
const seconds = (ms: number): string => (ms < 10_000 ? `${Number((ms / 1000).toFixed(1))}s` : `${Math.round(ms / 1000)}s`);

/**
 * Runs `fn` until it succeeds; retries while it fails with a retryable
 * KnitError (anything else ends the wait and is rethrown). `what` names
 * the thing and where it is, e.g. `ZooKeeper at zk1:2181`: every line reads
 * `waiting for <what>: <last error> (...)` with event `waiting`.
 */
export async function retrying<T>(what: string, log: Logger, fn: () => Promise<T>, opts: RetryOptions = {}): Promise<T> {
  const now = opts.now ?? Date.now;
  const maxDelay = opts.maxDelayMs ?? 5000;
  const first = opts.firstDelayMs ?? 500;
  const every = opts.reportEveryMs ?? 5000;
  const started = now();
  let lastLine = started;
  let attempt = 0;
  let lastError: string | undefined;
  const say = (text: string, fields: Record<string, unknown> = {}): void => {
    lastLine = now();
    log.warn({ event: EVENTS.waiting, waitingFor: what, attempt, waitedMs: lastLine - started, ...(lastError !== undefined && { err: lastError }), ...fields }, text);
  };
  // While an attempt hangs, the failure line cannot come: say that we are still waiting.
  const heartbeat = setInterval(() => {
    if (now() - lastLine < every) return;
    say(`waiting for ${what}: ${lastError ?? 'no answer yet'} (attempt ${attempt}, ${seconds(now() - started)} so far)`);
  }, Math.max(1, Math.floor(every / 5)));
  try {
    for (;;) {
      attempt++;
      try {
        return await fn();
      } catch (e) {
        if (!(e instanceof KnitError) || !e.retryable) throw e;
        lastError = e.message;
        const wait = Math.min(maxDelay, first * 2 ** (attempt - 1));
        say(`waiting for ${what}: ${e.message} (attempt ${attempt}, ${seconds(now() - started)} so far; next try in ${seconds(wait)})`, { retryInMs: wait });
        await delay(wait);
      }
    }
  } finally {
    clearInterval(heartbeat);
  }
}
