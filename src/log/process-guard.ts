/**
 * The process's last line of defence: what happens to an error that nothing
 * caught. Node's default is to exit on the first one, which for a knit agent
 * means every proxied connection on the host drops because one callback
 * threw. The guard logs each one with a stable event and keeps serving; only
 * a burst of uncaught exceptions, which says the process is broken rather
 * than one request unlucky, makes it exit for a clean restart.
 *
 * Bugs are still fixed where they happen (the API router answers malformed
 * requests itself); this is for the ones not found yet.
 */
import { EVENTS, type Logger } from './logger.js';

/**
 * Exit status after too many uncaught exceptions: EX_SOFTWARE ("internal
 * software error") from sysexits(3). Any non-zero status makes systemd's
 * `Restart=on-failure` (systemd/knit-agent.service, knit-server.service)
 * start a fresh process after RestartSec, and its start-rate limit stops a
 * crash loop; 70 tells an operator reading `systemctl status` that knit
 * gave up on itself rather than being killed or misconfigured (1).
 */
export const EXIT_UNCAUGHT_BURST = 70;

/** What the guard listens on: `process`, or any EventEmitter in a test. */
export type ProcessEvents = Pick<NodeJS.EventEmitter, 'on' | 'off'>;

export interface ProcessGuardOptions {
  /** Where `unhandledRejection` and `uncaughtException` come from. Default: `process`. */
  events?: ProcessEvents;
  /** Ends the process. Default: `process.exit`. Called at most once. */
  exit?: (code: number) => void;
  /**
   * Uncaught exceptions tolerated within `windowMs`; one more exits with
   * EXIT_UNCAUGHT_BURST. Default 10: a handful of independent failures
   * is survivable, ten a minute means a loop is throwing.
   */
  maxUncaught?: number;
  /** The sliding window, in ms. Default 60 000. */
  windowMs?: number;
  /** The clock. Default: `Date.now`. */
  now?: () => number;
}

/** A thrown or rejected value as text, even one whose toString throws. */
function describe(e: unknown): string {
  try {
    return e instanceof Error ? e.message : String(e);
  } catch {
    return 'unprintable value';
  }
}

/** Log fields for a thrown value: pino's `err` serializer for an Error (with its stack), text otherwise. */
function errFields(e: unknown): Record<string, unknown> {
  return e instanceof Error ? { err: e } : { reason: describe(e) };
}

/**
 * Installs the process-level policy for unhandled rejections and uncaught
 * exceptions: each is logged (events `process.unhandled_rejection`,
 * `process.uncaught_exception`) and the process keeps serving; more than
 * `maxUncaught` uncaught exceptions within `windowMs` log a fatal line and
 * exit with EXIT_UNCAUGHT_BURST (70). Unhandled rejections are logged only:
 * a rejected promise leaves no half-run synchronous code behind.
 *
 * Call once, early, with the process logger. Returns a function that
 * removes the listeners again (for tests, and for embedding knit).
 */
export function installProcessGuard(log: Logger, opts: ProcessGuardOptions = {}): () => void {
  const events = opts.events ?? process;
  const exit = opts.exit ?? ((code: number) => process.exit(code));
  const max = opts.maxUncaught ?? 10;
  const windowMs = opts.windowMs ?? 60_000;
  const now = opts.now ?? Date.now;
  let recent: number[] = [];
  let exiting = false;

  // Neither listener may throw: an exception inside an uncaughtException listener ends Node with status 7.
  const onRejection = (reason: unknown): void => {
    try {
      log.error({ event: EVENTS.processUnhandledRejection, ...errFields(reason) }, `unhandled promise rejection, still serving: ${describe(reason)}`);
    } catch {
      // Nowhere left to report to (stderr gone); keep serving.
    }
  };
  const onException = (err: unknown, origin?: unknown): void => {
    const t = now();
    recent = recent.filter((at) => t - at < windowMs);
    recent.push(t);
    const giveUp = recent.length > max && !exiting;
    const fields = { event: EVENTS.processUncaughtException, ...errFields(err), origin, inWindow: recent.length, windowMs };
    try {
      if (giveUp) log.fatal(fields, `${recent.length} uncaught exceptions within ${windowMs / 1000}s: exiting with status ${EXIT_UNCAUGHT_BURST} to be restarted`);
      else log.error(fields, `uncaught exception (${recent.length} within ${windowMs / 1000}s), still serving: ${describe(err)}`);
    } catch {
      // Nowhere left to report to; the count still decides.
    }
    if (giveUp) {
      exiting = true;
      exit(EXIT_UNCAUGHT_BURST);
    }
  };
  events.on('unhandledRejection', onRejection);
  events.on('uncaughtException', onException);
  return () => {
    events.off('unhandledRejection', onRejection);
    events.off('uncaughtException', onException);
  };
}
