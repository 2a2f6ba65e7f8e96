/**
 * Every error knit raises on purpose. A `KnitError` carries a stable `code`
 * (callers and tests branch on it, never on the message), the `cause` it
 * wraps, and whether retrying the same call may succeed. Library and socket
 * errors are wrapped once, at the boundary where they enter knit.
 */

/** The stable error codes, with whether a retry of the same call may help. */
export const ERROR_CODES = {
  /** A config, service or intention file is not valid. */
  KNIT_ERR_CONFIG: { retryable: false },
  /** A SPIFFE ID does not follow the SPIFFE rules. */
  KNIT_ERR_SPIFFE_ID: { retryable: false },
  /** A certificate or CSR failed validation (chain, SAN, usage, expiry). */
  KNIT_ERR_CERT: { retryable: false },
  /** The CA refused to sign. */
  KNIT_ERR_CA: { retryable: false },
  /** A signed document (intentions, node records, join tokens) is unsigned, forged, stale or signed by someone else. */
  KNIT_ERR_SIGNATURE: { retryable: false },
  /** A compare-and-set lost against a concurrent writer. */
  KNIT_ERR_CAS_CONFLICT: { retryable: true },
  /** The control plane (knit server) could not be reached. */
  KNIT_ERR_SERVER_UNAVAILABLE: { retryable: true },
  /** The registry could not be reached or answered with an error. */
  KNIT_ERR_REGISTRY_UNAVAILABLE: { retryable: true },
  /**
   * The registry refused an operation because this client lacks the
   * credential it needs (ZooKeeper NO_AUTH): the message names the path and
   * the credential. Retrying with the same credential cannot help.
   */
  KNIT_ERR_REGISTRY_DENIED: { retryable: false },
  /** A registry key or instance does not exist. */
  KNIT_ERR_NOT_FOUND: { retryable: false },
  /** An intention denied a connection. */
  KNIT_ERR_DENIED: { retryable: false },
  /** No healthy instance of the destination service. */
  KNIT_ERR_NO_ENDPOINT: { retryable: true },
  /** A dial or request took longer than allowed. */
  KNIT_ERR_TIMEOUT: { retryable: true },
  /** A request to an API was malformed. */
  KNIT_ERR_BAD_REQUEST: { retryable: false },
  /** The caller is not authenticated or not allowed. */
  KNIT_ERR_UNAUTHORIZED: { retryable: false },
  /** A port or address could not be bound. */
  KNIT_ERR_LISTEN: { retryable: false },
  /** The backend or object has been closed. */
  KNIT_ERR_CLOSED: { retryable: false },
} as const;

export type KnitErrorCode = keyof typeof ERROR_CODES;

/** The base of every knit error. */
export class KnitError extends Error {
  readonly code: KnitErrorCode;
  readonly retryable: boolean;

  constructor(code: KnitErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'KnitError';
    this.code = code;
    this.retryable = ERROR_CODES[code].retryable;
  }
}

/** One problem found in a file, located as precisely as the parser knows. */
export interface FileProblem {
  file: string;
  /** 1-based line, when known. */
  line?: number;
  /** Dotted path of the field, e.g. `service.connect.sidecar_service.proxy.upstreams[0].local_bind_port`. */
  field?: string;
  message: string;
}

/** Formats a problem as `file:line: field: message`, the form editors jump to. */
export function formatProblem(p: FileProblem): string {
  const where = p.line !== undefined ? `${p.file}:${p.line}` : p.file;
  return p.field ? `${where}: ${p.field}: ${p.message}` : `${where}: ${p.message}`;
}

/** A config error that carries every problem found, not only the first. */
export class ConfigError extends KnitError {
  readonly problems: FileProblem[];
  constructor(problems: FileProblem[]) {
    super('KNIT_ERR_CONFIG', problems.map(formatProblem).join('\n'));
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

/** Wraps anything thrown by a library into a KnitError, keeping KnitErrors as they are. */
export function wrapError(code: KnitErrorCode, message: string, cause: unknown): KnitError {
  if (cause instanceof KnitError) return cause;
  const detail = cause instanceof Error ? cause.message : String(cause);
  return new KnitError(code, `${message}: ${detail}`, { cause });
}

/** True when `e` is a KnitError with the given code. */
export function isKnitError(e: unknown, code?: KnitErrorCode): e is KnitError {
  return e instanceof KnitError && (code === undefined || e.code === code);
}
