/**
 * Joining two sockets both ways. An error on one side resets the other
 * (a TCP reset for L4, as users of a proxy expect), an orderly end is
 * passed on as an end.
 */
import type { Socket } from 'node:net';

/** Destroys a socket with a TCP RST when it is a plain TCP socket, else closes it. */
export function reset(s: Socket): void {
  if (s.destroyed) return;
  if (typeof s.resetAndDestroy === 'function' && !('encrypted' in s)) {
    try {
      s.resetAndDestroy();
      return;
    } catch {
      // Not connected yet: a plain destroy is all there is.
    }
  }
  s.destroy();
}

/** Pipes a <-> b until both close; resolves when both are closed. */
export function splice(a: Socket, b: Socket): Promise<void> {
  a.pipe(b);
  b.pipe(a);
  const closed = (s: Socket): Promise<void> => new Promise((r) => (s.destroyed ? r() : s.once('close', () => r())));
  a.on('error', () => reset(b));
  b.on('error', () => reset(a));
  a.once('close', (hadError) => (hadError ? reset(b) : b.end()));
  b.once('close', (hadError) => (hadError ? reset(a) : a.end()));
  a.resume();
  b.resume();
  return Promise.all([closed(a), closed(b)]).then(() => undefined);
}
