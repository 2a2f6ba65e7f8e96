/** Waiting for something remote (registry, control plane), saying what is awaited, with capped backoff. */
import { setTimeout as delay } from 'node:timers/promises';
import { KnitError } from './errors.js';
import type { Logger } from './log/logger.js';

/** Retries `fn` while it fails with a retryable KnitError; other errors end the wait. */
export async function retrying<T>(what: string, log: Logger, fn: () => Promise<T>): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn();
    } catch (e) {
      if (!(e instanceof KnitError) || !e.retryable) throw e;
      const wait = Math.min(10_000, 500 * 2 ** attempt);
      log.warn({ err: e.message, retryInMs: wait }, `waiting for ${what}: ${e.message}`);
      await delay(wait);
    }
  }
}
