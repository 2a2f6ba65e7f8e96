/**
 * Joining an application socket and an HBONE stream (an HTTP/2 CONNECT
 * stream) so that the pair behaves like one TCP connection, as splice.ts
 * does for two sockets:
 *
 * - each direction ends by itself: the socket's FIN becomes the stream's
 *   END_STREAM and the other way round (half-close);
 * - a reset is passed on as a reset: an error or an early close of the
 *   socket cancels the stream (RST_STREAM CANCEL), a stream reset by the
 *   peer (or a tunnel that broke) resets the socket (TCP RST);
 * - an idle timeout and an abort signal end both, without a reset.
 *
 * Data moves with `pipe` from the socket, and with pipeToSocket (batched
 * writes, at most APP_BUFFER held) to it, so HTTP/2 flow control slows a
 * fast writer down to its reader's pace instead of growing a buffer in knit.
 */
import http2, { type Http2Stream } from 'node:http2';
import type { Socket } from 'node:net';
import { reset, type SpliceResult } from './splice.js';

const { NGHTTP2_CANCEL, NGHTTP2_NO_ERROR } = http2.constants;

/** Cancels a stream with RST_STREAM, once. */
export function cancel(stream: Http2Stream, code = NGHTTP2_CANCEL): void {
  if (!stream.closed && !stream.destroyed) stream.close(code);
}

/**
 * Bytes knit holds for an application that reads slower than its peer
 * sends; past this it stops reading the stream, and HTTP/2 flow control
 * slows the sender.
 */
const APP_BUFFER = 256 << 10;

/** The smallest DATA piece that corks the application socket (see pipeToSocket). */
const CORK_FROM = 4 << 10;

/**
 * `stream.pipe(app, { end: false })`, with the stream's DATA written to the
 * socket in batches. nghttp2 hands DATA over as it parses it out of the
 * TLS records Node decrypts 16 KiB at a time, and a DATA frame (16 KiB of
 * payload and a 9-byte header) straddles two records: a bulk transfer
 * arrives as pieces of ~7 KiB on average (measured: 83,000 pieces for
 * 576 MB), several per turn of the event loop. A piece of 4 KiB or more
 * corks the socket until the turn ends, so the pieces of one turn go out in
 * one writev instead of one write each (bulk through two agents: 171 to
 * 283 MiB/s in the same run). Smaller pieces (request/response traffic)
 * are written at once, as before.
 */
function pipeToSocket(stream: Http2Stream, app: Socket): void {
  const uncork = (): void => app.uncork();
  stream.on('data', (chunk: Buffer) => {
    if (app.destroyed) return;
    if (!app.writableCorked && chunk.length >= CORK_FROM) {
      app.cork();
      setImmediate(uncork);
    }
    app.write(chunk);
    if (app.writableLength >= APP_BUFFER) stream.pause();
  });
  app.on('drain', () => stream.resume());
}

/** Pipes `app` <-> `stream` until both are done; resolves with how the pair ended. Never rejects. */
export function spliceStream(app: Socket, stream: Http2Stream, opts: { idleTimeoutMs?: number; signal?: AbortSignal } = {}): Promise<SpliceResult> {
  return new Promise((resolve) => {
    let result: SpliceResult | undefined;
    const settle = (r: SpliceResult): void => {
      result ??= r;
    };
    let open = 2;
    const done = (): void => {
      if (--open === 0) resolve(result ?? { end: 'closed' });
    };
    app.allowHalfOpen = true;
    const appEnded = (): boolean => app.readableEnded && app.writableFinished;

    app.on('error', (error: Error) => {
      settle({ end: 'reset', by: 'a', error });
      cancel(stream);
    });
    app.once('close', () => {
      if (!appEnded() && !result) {
        settle({ end: 'reset', by: 'a' });
        cancel(stream);
      }
      done();
    });
    stream.on('error', (error: Error) => {
      settle({ end: 'reset', by: 'b', error });
      reset(app);
    });
    stream.once('close', () => {
      // Closed by a reset (the peer's RST_STREAM, a broken tunnel), not both directions in order: reset the socket.
      if (stream.rstCode !== undefined && stream.rstCode !== NGHTTP2_NO_ERROR && !result) {
        settle({ end: 'reset', by: 'b' });
        reset(app);
      } else if (!app.destroyed && appEnded()) {
        app.destroy();
      }
      done();
    });
    if (app.closed) {
      settle({ end: 'reset', by: 'a' });
      cancel(stream);
    }
    const end = (why: 'idle_timeout' | 'aborted'): void => {
      settle({ end: why });
      cancel(stream, NGHTTP2_NO_ERROR);
      app.destroy();
    };
    const idle = opts.idleTimeoutMs ?? 0;
    if (idle > 0) {
      // Every byte copied is a read on one side and a write on the other: the socket's own timer sees both directions.
      app.setTimeout(idle, () => end('idle_timeout'));
    }
    if (opts.signal) {
      if (opts.signal.aborted) end('aborted');
      else opts.signal.addEventListener('abort', () => end('aborted'), { once: true });
    }
    app.pipe(stream);
    // The stream's end is passed on by hand: Node ends a stream's readable side also when the peer
    // resets it (RST_STREAM), just before it reports the reset ('aborted', then 'close' with the
    // code). Piping the end would send the application a FIN before knit learns it was a reset.
    pipeToSocket(stream, app);
    stream.once('end', () => {
      setImmediate(() => {
        if (stream.aborted || (stream.rstCode ?? NGHTTP2_NO_ERROR) !== NGHTTP2_NO_ERROR) {
          if (!result) {
            settle({ end: 'reset', by: 'b' });
            reset(app);
          }
        } else if (!app.destroyed) app.end();
      });
    });
  });
}
