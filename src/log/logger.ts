/**
 * Logging: pino on stderr. Every log line carries an `event` from EVENTS so
 * that operators can grep and alert on stable names rather than prose.
 *
 * Two formats: JSON lines (for journald, files, pipes and log shippers) and
 * one human-readable line per record (for a person at a terminal); `auto`
 * picks pretty when the destination is a TTY. Writes are asynchronous
 * (pino.destination with sync: false) so that a slow terminal or a full
 * pipe never blocks the data plane; `flushLogs` waits for what is queued
 * before the process exits, and pino's own exit hook writes whatever is
 * still buffered if the process exits without it.
 *
 * The pretty format is a small formatter here rather than pino-pretty: it
 * runs in the main thread (pino's transports run in a worker thread, ~10 MB
 * more per process on agents whose memory is already their weak point, and
 * a worker makes flushing at exit harder), it needs no dependency tree, and
 * it puts the `event` name where people look.
 */
import { isatty } from 'node:tty';
import { pino, type Logger, type DestinationStream } from 'pino';

export type { Logger };

/** Stable event names. */
export const EVENTS = {
  serviceRegistered: 'service.registered',
  serviceDeregistered: 'service.deregistered',
  servicesReloaded: 'services.reloaded',
  servicesReloadFailed: 'services.reload_failed',
  healthChanged: 'health.changed',
  certIssued: 'cert.issued',
  certRenewFailed: 'cert.renew_failed',
  caCreated: 'ca.created',
  connAccepted: 'conn.accepted',
  connDenied: 'conn.denied',
  connRejected: 'conn.rejected',
  connClosedByPolicy: 'conn.closed_by_policy',
  connFailed: 'conn.failed',
  intentionsChanged: 'intentions.changed',
  endpointsChanged: 'endpoints.changed',
  listening: 'listening',
  registryError: 'registry.error',
  processUnhandledRejection: 'process.unhandled_rejection',
  processUncaughtException: 'process.uncaught_exception',
  documentRefused: 'registry.document_refused',
  tokenCreated: 'token.created',
  nodeEnrolled: 'node.enrolled',
  nodeRejoined: 'node.rejoined',
  nodeChanged: 'node.changed',
  nodeRevoked: 'node.revoked',
  rejoinRefused: 'node.rejoin_refused',
  signRefused: 'cert.sign_refused',
  certWaiting: 'cert.waiting',
  nodesChanged: 'nodes.changed',
  /** Waiting for something remote (registry, control plane), with what and where; at least every ~5 s. */
  waiting: 'waiting',
  /** `knit agent` is starting: it waits for the control plane and the registry next. */
  agentStarting: 'agent.starting',
  /** An API handler threw something that is not a KnitError (a bug): answered 500. */
  apiHandlerFailed: 'api.handler_failed',
  /** A request failed outside its handler (writing the answer, say). */
  apiRequestFailed: 'api.request_failed',
  /** Node's HTTP parser refused a request; answered 4xx. */
  apiMalformedRequest: 'api.malformed_request',
  /** An API listener could not accept a connection (EMFILE under a flood). */
  apiAcceptFailed: 'api.accept_failed',
  /** The ZooKeeper client changed state (connected, disconnected, expired). */
  registryClientState: 'registry.client_state',
  /** knit set or repaired ACLs on its ZooKeeper tree. */
  registryAclsSet: 'registry.acls_set',
  /** A connection refused at once because a connection cap (listener or host) was reached. */
  connOverLimit: 'conn.over_limit',
  /** A connection closed because no byte moved either way for the idle timeout. */
  connIdleTimeout: 'conn.idle_timeout',
  /** One attempt to one endpoint failed (refused, timed out, wrong identity); the next endpoint is tried. */
  endpointFailed: 'endpoint.failed',
  /** An endpoint failed too often in a row and is skipped for a backoff period. */
  endpointEjected: 'endpoint.ejected',
  /** An ejected endpoint carried a connection again and is back in rotation. */
  endpointRestored: 'endpoint.restored',
  /** A window closed in which lines of one key were suppressed; `suppressed` says how many. */
  logSuppressed: 'log.suppressed',
  tunnelOpened: 'hbone.tunnel_opened',
  tunnelClosed: 'hbone.tunnel_closed',
  vipsChanged: 'vips.changed',
  rulesInstalled: 'redirect.installed',
  rulesRemoved: 'redirect.removed',
  rulesFailed: 'redirect.failed',
} as const;

/** How log lines look; `auto` is pretty on a terminal, JSON lines elsewhere. */
export type LogFormat = 'json' | 'pretty' | 'auto';

/** How `createLogger` builds the process logger. */
export interface LoggerOptions {
  level?: string;
  /** Where to write (a file descriptor); defaults to stderr so stdout stays for command output. */
  destination?: number;
  /** Default `auto`. */
  format?: LogFormat;
  /** Colours in the pretty format; default: when the destination is a TTY. */
  color?: boolean;
}

/** The format `auto` means for a file descriptor. */
export function resolveLogFormat(format: LogFormat, fd: number): 'json' | 'pretty' {
  return format === 'auto' ? (isatty(fd) ? 'pretty' : 'json') : format;
}

const LEVELS: Record<number, [string, string]> = {
  10: ['TRACE', '\x1b[90m'],
  20: ['DEBUG', '\x1b[90m'],
  30: ['INFO', '\x1b[32m'],
  40: ['WARN', '\x1b[33m'],
  50: ['ERROR', '\x1b[31m'],
  60: ['FATAL', '\x1b[35m'],
};
const RESET = '\x1b[0m';
const DIM = '\x1b[2m';
const CYAN = '\x1b[36m';

function fieldValue(v: unknown): string {
  if (typeof v === 'string') return /^[^\s"=]+$/.test(v) ? v : JSON.stringify(v);
  return JSON.stringify(v) ?? String(v);
}

/**
 * One pino JSON record as one line for people:
 * `14:02:07.311 WARN  waiting  waiting for ZooKeeper at zk1:2181 ...  retryInMs=5000`
 * (local time, level, event, message, then the other fields as key=value;
 * an error's stack follows on indented lines). A line that is not JSON is
 * passed through unchanged.
 */
export function formatPretty(line: string, color = false): string {
  let rec: Record<string, unknown>;
  try {
    rec = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return line.endsWith('\n') ? line : `${line}\n`;
  }
  const { level, time, msg, event, err, ...rest } = rec;
  const paint = (code: string, text: string): string => (color ? `${code}${text}${RESET}` : text);
  const d = new Date(typeof time === 'string' || typeof time === 'number' ? time : Date.now());
  const pad = (n: number, w = 2): string => String(n).padStart(w, '0');
  const clock = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  const [name, code] = LEVELS[typeof level === 'number' ? level : 30] ?? [String(level), ''];
  const parts = [`${paint(DIM, clock)} ${paint(code, name.padEnd(5))}`];
  if (typeof event === 'string') parts.push(paint(CYAN, event));
  if (msg !== undefined) parts.push(typeof msg === 'string' ? msg : JSON.stringify(msg));
  let stack = '';
  if (err !== undefined) {
    const e = err as { message?: unknown; stack?: unknown };
    if (typeof e === 'object' && e !== null && typeof e.message === 'string') {
      rest.err = e.message;
      if (typeof e.stack === 'string') stack = e.stack.split('\n').slice(1).map((l) => `    ${l.trim()}`).join('\n');
    } else rest.err = err;
  }
  const fields = Object.entries(rest).map(([k, v]) => `${k}=${fieldValue(v)}`).join(' ');
  if (fields) parts.push(paint(DIM, fields));
  return `${parts.join('  ')}\n${stack ? `${paint(DIM, stack)}\n` : ''}`;
}

/**
 * How long an exit waits for a write already handed to the thread pool
 * before the rest is written synchronously: a write to a pipe or terminal
 * takes microseconds; 50 ms covers a busy pool without holding up an exit.
 */
const EXIT_SETTLE_MS = 50;

/** The part of a SonicBoom this module uses: asynchronous writes and the `write` event with the bytes written. */
interface AsyncDestination {
  write(s: string): unknown;
  on(event: 'write', fn: (n: number) => void): unknown;
}

/**
 * What pino writes to: hands each line (formatted when pretty) to the
 * asynchronous destination and counts bytes queued and written, so that
 * `flush` can wait until the destination has written everything.
 */
class LogSink implements DestinationStream {
  private queued = 0;
  private written = 0;
  private waiters: Array<() => void> = [];

  constructor(private readonly out: AsyncDestination, private readonly format?: (line: string) => string) {
    // A direct process.exit while a write is in flight: pino's exit hook writes the rest
    // synchronously at once, which could land before the in-flight chunk (out of order).
    // Give the in-flight write a moment to complete first; knit's own exits use flushLogs.
    process.prependListener('exit', () => {
      if (this.written < this.queued) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, EXIT_SETTLE_MS);
    });
    out.on('write', (n: number) => {
      this.written += n;
      if (this.written < this.queued) return;
      const w = this.waiters;
      this.waiters = [];
      for (const f of w) f();
    });
  }

  write(line: string): void {
    const text = this.format ? this.format(line) : line;
    this.queued += Buffer.byteLength(text);
    this.out.write(text);
  }

  /** Calls `cb` once every line written so far has reached the file descriptor. */
  flush(cb: () => void): void {
    if (this.written >= this.queued) cb();
    else this.waiters.push(cb);
  }
}

/** Builds the process logger: asynchronous, JSON lines or pretty (see LogFormat). */
export function createLogger(opts: LoggerOptions = {}): Logger {
  const fd = opts.destination ?? 2;
  const dest = pino.destination({ dest: fd, sync: false });
  const pretty = resolveLogFormat(opts.format ?? 'auto', fd) === 'pretty';
  const color = opts.color ?? isatty(fd);
  return pino({ level: opts.level ?? 'info', base: undefined, timestamp: pino.stdTimeFunctions.isoTime }, new LogSink(dest, pretty ? (l) => formatPretty(l, color) : undefined));
}

/**
 * Resolves once the logger's queued lines are written, or after `timeoutMs`
 * (a destination that stopped taking writes must not hold up an exit).
 * Call before `process.exit`.
 */
export function flushLogs(log: Logger, timeoutMs = 2000): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, timeoutMs);
    t.unref();
    log.flush(() => {
      clearTimeout(t);
      resolve();
    });
  });
}

/** A logger that drops everything; for library callers and tests that do not care. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
