/**
 * Logging: pino, JSON lines on stderr by default. Every log line that
 * describes something that happened carries an `event` from EVENTS so that
 * operators can grep and alert on stable names rather than prose.
 */
import { pino, type Logger } from 'pino';

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
} as const;

export interface LoggerOptions {
  level?: string;
  /** Where to write; defaults to stderr so stdout stays for command output. */
  destination?: number;
}

/** Builds the process logger. */
export function createLogger(opts: LoggerOptions = {}): Logger {
  return pino(
    { level: opts.level ?? 'info', base: undefined, timestamp: pino.stdTimeFunctions.isoTime },
    pino.destination({ dest: opts.destination ?? 2, sync: true }),
  );
}

/** A logger that drops everything; for library callers and tests that do not care. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
