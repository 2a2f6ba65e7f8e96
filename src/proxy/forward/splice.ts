/**
 * Joining two sockets both ways so that the pair behaves like one TCP
 * connection to both ends:
 *
 * - Each direction's end is passed on by itself (half-close): a client that
 *   sends its request and shuts down its write side (`shutdown(SHUT_WR)`,
 *   `nc -N`) still gets the reply. Both sockets must allow half-open
 *   (`allowHalfOpen`), which `splice` sets; over TLS an end is a
 *   close_notify, which TLS 1.3 defines as closing one direction only.
 * - A socket is fully closed only once both directions have ended.
 * - A reset (an error, or a socket torn down before both directions ended)
 *   is passed on as a reset: the other side gets a TCP RST, not a FIN that
 *   would look like a complete response.
 * - With `idleTimeoutMs`, a pair on which no byte moved either way for that
 *   long is closed: a peer that vanished without a RST does not hold two
 *   file descriptors forever.
 *
 * Data moves with `pipe`, which keeps backpressure: a slow reader slows the
 * writer instead of growing a buffer in knit.
 */
import net, { type Socket } from 'node:net';

/** How a spliced pair ended. */
export type SpliceEnd =
  /** Both directions ended in order. */
  | 'closed'
  /** One side failed (ECONNRESET, EPIPE, ...) or was torn down; the other was reset. */
  | 'reset'
  /** Nothing moved for the idle timeout; both were closed. */
  | 'idle_timeout'
  /** Knit closed both on purpose (`signal`: intentions changed); both were closed without a reset. */
  | 'aborted';

/** How a spliced pair ended, and who ended it. */
export interface SpliceResult {
  end: SpliceEnd;
  /** Which side ended it abnormally ('a' or 'b'); absent for 'closed', 'idle_timeout' and 'aborted'. */
  by?: 'a' | 'b';
  /** The error that reset it, if one did. */
  error?: Error;
}

/** What may end a spliced pair besides its two sides. */
export interface SpliceOptions {
  /** Close the pair when nothing moved either way for this long; 0 or absent never. */
  idleTimeoutMs?: number;
  /** Closes both sides (a FIN each, not a reset) when aborted; the result is 'aborted'. One signal per pair. */
  signal?: AbortSignal;
}

/**
 * The TCP socket a TLS socket runs over, when knit holds one (Node keeps
 * it as `_parent` when a TLS socket wraps an existing socket, as the HBONE
 * listener and dialler do). Undefined for a plain socket.
 */
export function tcpUnder(s: Socket): Socket | undefined {
  if (!('encrypted' in s)) return undefined;
  const parent = (s as unknown as { _parent?: unknown })._parent;
  return parent instanceof net.Socket ? parent : undefined;
}

/** True between `end()` and the end of the write side's shutdown: a reset is refused then (see reset). */
const endingWrite = (s: Socket): boolean => s.writableEnded && !s.writableFinished;

/**
 * Tears a connection down with a TCP RST: at once for a plain socket, and
 * through the TCP socket under a TLS one. A socket that is not connected
 * yet (or a TLS socket with no TCP socket knit holds) is just destroyed.
 *
 * Under TLS only the TCP socket is reset, and the TLS socket closes with
 * it. Destroying the TLS socket too, synchronously, frees its OpenSSL
 * state at once; called from within a TLS callback (a refusal in
 * `secureConnection`, while OpenSSL is still reading the same buffer) that
 * crashes the process (SIGSEGV in SSL_read, Node 20).
 *
 * A socket whose write side is ending (`end()` called, its FIN not yet
 * sent: a shutdown request pending in libuv) is closed instead: libuv
 * refuses to reset a socket while a shutdown is pending
 * (`uv_tcp_close_reset` returns EINVAL), and Node 20 then leaves the
 * handle open with nobody reading it: its descriptor leaks and the event
 * loop spins at full CPU for good. The far side was already told this
 * direction ended in order; closing the socket still refuses whatever it
 * sends next (the kernel answers it with a RST).
 *
 * What Node cannot promise: libuv reports an RST that arrives in the same
 * wakeup as data as an end of stream (its POLLHUP shortcut), so a reset
 * that follows data within a millisecond or so may reach the far side as a
 * FIN. A reset with no data just before it is always seen as a reset.
 */
export function reset(s: Socket): void {
  const under = tcpUnder(s);
  const tcp = under ?? (!('encrypted' in s) ? s : undefined);
  if (tcp && !tcp.destroyed) {
    // Under TLS the shutdown is the TLS socket's (it shuts the TCP handle down below Node's TCP socket).
    if (endingWrite(s) || endingWrite(tcp)) {
      tcp.destroy();
    } else {
      try {
        tcp.resetAndDestroy();
      } catch {
        // Not connected yet (ERR_SOCKET_CLOSED): a plain destroy is all there is.
        tcp.destroy();
      }
    }
    // Under TLS the TLS socket closes by itself once its TCP socket is gone.
    if (under) return;
  }
  if (!s.destroyed) {
    // A TLS socket is destroyed outside the current (possibly TLS) callback; see above.
    if (under) setImmediate(() => s.destroy());
    else s.destroy();
  }
}

/** True once a socket has read its peer's end and finished writing its own. */
const bothEnded = (s: Socket): boolean => s.readableEnded && s.writableFinished;

/**
 * Pipes a <-> b (see the module doc) until both are closed; resolves with
 * how the pair ended. Never rejects: errors are ends, and are answered by
 * resetting the other side.
 */
export function splice(a: Socket, b: Socket, opts: SpliceOptions = {}): Promise<SpliceResult> {
  return new Promise((resolve) => {
    let result: SpliceResult | undefined;
    const settle = (r: SpliceResult): void => {
      result ??= r;
    };
    let open = 2;
    const closed = (): void => {
      if (--open === 0) resolve(result ?? { end: 'closed' });
    };
    const sides = [
      [a, b, 'a'],
      [b, a, 'b'],
    ] as const;
    for (const [self, other, name] of sides) {
      // Half-close: an end read on one side becomes an end written on the other, and no more.
      // Settable on an open socket until its 'end' is emitted (node:stream's documented property).
      self.allowHalfOpen = true;
      self.on('error', (error: Error) => {
        settle({ end: 'reset', by: name, error });
        reset(other);
      });
      if (self.closed) {
        // Gone before the splice began (a dial that failed at once): the other side is reset.
        settle({ end: 'reset', by: name });
        reset(other);
        closed();
        continue;
      }
      self.once('close', () => {
        // Closed before both directions ended in order: it was reset or torn down, so the other is too.
        if (!bothEnded(self) && result?.end !== 'idle_timeout' && result?.end !== 'aborted') {
          settle({ end: 'reset', by: name });
          reset(other);
        }
        closed();
      });
    }
    const idle = opts.idleTimeoutMs ?? 0;
    if (idle > 0) {
      // Each socket's timer restarts on its own reads and writes, and every byte copied is a read on
      // one side and a write on the other, so either timer firing means the pair was idle both ways.
      const onIdle = (): void => {
        settle({ end: 'idle_timeout' });
        a.destroy();
        b.destroy();
      };
      a.setTimeout(idle, onIdle);
      b.setTimeout(idle, onIdle);
    }
    const signal = opts.signal;
    if (signal) {
      const onAbort = (): void => {
        settle({ end: 'aborted' });
        a.destroy();
        b.destroy();
      };
      // A signal per connection (it lives as long as the pair), so the listener needs no removal.
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    }
    a.pipe(b);
    b.pipe(a);
  });
}
