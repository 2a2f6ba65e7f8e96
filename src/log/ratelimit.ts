/**
 * Logging at a bounded rate, so that a flood of refusals (a port scan, a
 * misconfigured client retrying in a loop, a black-holed endpoint) costs a
 * few log lines instead of one per connection. The data plane must never
 * wait on its logger: pino writes stderr synchronously here, and 10k lines
 * a second into a full pipe would stall every connection on the host.
 *
 * Lines are grouped by a caller-chosen key (an event and its reason): the
 * first `burst` lines of a key in each window are written as they come,
 * the rest are counted, and when the window closes one summary line says
 * `suppressed K similar: <the first line's message>` with event
 * `log.suppressed`. A global budget per window bounds the total when keys
 * themselves vary (many distinct reasons), and the number of keys tracked
 * is bounded too. Counting every occurrence is the metrics' job, not the
 * log's: callers count before they log.
 */
import type { Logger } from 'pino';
import { EVENTS } from './logger.js';


/** Levels a rate-limited line may be written at. */
export type LimitedLevel = 'error' | 'warn' | 'info' | 'debug';

/** How many lines a RateLimitedLog lets through, and over which window. */
export interface RateLimitOptions {
  /** Lines written per key and window before suppressing. Default 5. */
  burst?: number;
  /** Window length. Default 10 s: a human reading a log notices a new problem within it. */
  windowMs?: number;
  /** Lines written per window over all keys. Default 50. */
  maxPerWindow?: number;
  /** Keys tracked at once; the oldest is summarized and dropped beyond it. Default 256. */
  maxKeys?: number;
  /** The clock; injectable for tests. */
  now?: () => number;
}

interface Window {
  start: number;
  written: number;
  suppressed: number;
  level: LimitedLevel;
  event: unknown;
  /** The first line's message, quoted in the summary. */
  msg: string;
  timer?: NodeJS.Timeout;
}

/** Fields a line carries; `event` is expected, as on every knit line. */
export type LineFields = Record<string, unknown> & { event?: string };

/**
 * A logger wrapper that writes at most `burst` lines per key per window,
 * and a summary of the rest. Cheap when suppressing: a map lookup and a
 * counter, no formatting.
 */
export class RateLimitedLog {
  private readonly windows = new Map<string, Window>();
  private readonly burst: number;
  private readonly windowMs: number;
  private readonly maxPerWindow: number;
  private readonly maxKeys: number;
  private readonly now: () => number;
  private globalStart = -Infinity;
  private globalWritten = 0;
  /** Suppressed lines whose summary found no budget left in the global window. */
  private overflow = 0;
  private overflowTimer?: NodeJS.Timeout;

  constructor(
    private readonly log: Logger,
    opts: RateLimitOptions = {},
  ) {
    this.burst = opts.burst ?? 5;
    this.windowMs = opts.windowMs ?? 10_000;
    this.maxPerWindow = opts.maxPerWindow ?? 50;
    this.maxKeys = opts.maxKeys ?? 256;
    this.now = opts.now ?? Date.now;
  }

  /**
   * Writes `fields`/`msg` at `level` unless `key` already had `burst`
   * lines in its window (or the window's global budget is spent). Returns
   * whether the line was written.
   */
  write(level: LimitedLevel, key: string, fields: LineFields, msg: string): boolean {
    const t = this.now();
    let w = this.windows.get(key);
    if (w && t - w.start >= this.windowMs) {
      this.summarize(key, w);
      w = undefined;
    }
    if (!w) {
      if (this.windows.size >= this.maxKeys) {
        const [oldest, ow] = this.windows.entries().next().value as [string, Window];
        this.summarize(oldest, ow);
      }
      w = { start: t, written: 0, suppressed: 0, level, event: fields.event, msg };
      this.windows.set(key, w);
    }
    if (w.written < this.burst && this.spend(t)) {
      w.written++;
      this.log[level](fields, msg);
      return true;
    }
    w.suppressed++;
    if (!w.timer) {
      const win = w;
      // When the window closes, say what was suppressed even if nothing else comes.
      win.timer = setTimeout(() => this.summarize(key, win), Math.max(0, win.start + this.windowMs - t));
      win.timer.unref();
    }
    return false;
  }

  /** `write('warn', ...)`. */
  warn(key: string, fields: LineFields, msg: string): boolean {
    return this.write('warn', key, fields, msg);
  }

  /** `write('info', ...)`. */
  info(key: string, fields: LineFields, msg: string): boolean {
    return this.write('info', key, fields, msg);
  }

  /** `write('debug', ...)`. */
  debug(key: string, fields: LineFields, msg: string): boolean {
    return this.write('debug', key, fields, msg);
  }

  /** Writes the summary of every window that suppressed lines and forgets all keys (on close). */
  flush(): void {
    for (const [key, w] of [...this.windows]) this.summarize(key, w);
    if (this.overflow > 0) this.rollGlobal(this.now());
  }

  /** Keys currently tracked (tests and the admin API). */
  get size(): number {
    return this.windows.size;
  }

  /** Takes one line from the global budget of the current window, if any is left. */
  private spend(t: number): boolean {
    if (t - this.globalStart >= this.windowMs) this.rollGlobal(t);
    if (this.globalWritten >= this.maxPerWindow) return false;
    this.globalWritten++;
    return true;
  }

  /** Starts a new global window, first saying how many summaries the last one had no budget for. */
  private rollGlobal(t: number): void {
    if (this.overflowTimer) clearTimeout(this.overflowTimer);
    this.overflowTimer = undefined;
    if (this.overflow > 0) {
      this.log.warn(
        { event: EVENTS.logSuppressed, key: '*', suppressed: this.overflow, windowMs: this.windowMs },
        `suppressed ${this.overflow} lines of many different kinds`,
      );
    }
    this.overflow = 0;
    this.globalStart = t;
    this.globalWritten = 0;
  }

  private summarize(key: string, w: Window): void {
    if (w.timer) clearTimeout(w.timer);
    w.timer = undefined;
    if (this.windows.get(key) === w) this.windows.delete(key);
    if (w.suppressed === 0) return;
    const n = w.suppressed;
    w.suppressed = 0;
    if (!this.spend(this.now())) {
      // Keys churn faster than the budget: one line per global window says how much went unsaid.
      this.overflow += n;
      if (!this.overflowTimer) {
        this.overflowTimer = setTimeout(() => this.rollGlobal(this.now()), Math.max(0, this.globalStart + this.windowMs - this.now()));
        this.overflowTimer.unref();
      }
      return;
    }
    const seconds = Math.round(this.windowMs / 100) / 10;
    this.log[w.level](
      { event: EVENTS.logSuppressed, suppressedEvent: w.event, key, suppressed: n, windowMs: this.windowMs },
      `suppressed ${n} similar in ${seconds} s: ${w.msg}`,
    );
  }
}
