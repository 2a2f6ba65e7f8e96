/**
 * Waiting without sleeping for fixed times: poll a condition until a
 * deadline, or collect values from a callback and wait for one that fits.
 */
import { setTimeout as delay } from 'node:timers/promises';

/** Polls `check` until it returns a truthy value or `timeoutMs` passes; throws naming `what`. */
export async function until<T>(what: string, check: () => T | Promise<T>, timeoutMs = 5000, everyMs = 10): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
      last = v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await delay(everyMs);
  }
}

/** Records every value a callback receives and waits for one matching a predicate. */
export class Recorder<T> {
  readonly values: T[] = [];
  private waiters: Array<{ pred: (v: T) => boolean; resolve: (v: T) => void }> = [];

  readonly push = (v: T): void => {
    this.values.push(v);
    this.waiters = this.waiters.filter((w) => {
      if (!w.pred(v)) return true;
      w.resolve(v);
      return false;
    });
  };

  /** The first value (already seen since `from`, or future) matching `pred`. */
  async next(what: string, pred: (v: T) => boolean, timeoutMs = 5000, from = 0): Promise<T> {
    const at = this.values.slice(from).findIndex(pred);
    if (at !== -1) return this.values[from + at]!;
    return new Promise<T>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; saw ${JSON.stringify(this.values.slice(-3))}`)), timeoutMs);
      this.waiters.push({ pred, resolve: (v) => { clearTimeout(t); resolve(v); } });
    });
  }
}
