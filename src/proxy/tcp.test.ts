/**
 * The node proxy behaves like TCP, end to end, on both of its paths:
 *
 * - hbone: host a's upstream listener -> an HBONE tunnel (HTTP/2 CONNECT
 *   over mTLS) -> host b -> the application;
 * - same host: host a's upstream listener -> the application on host a
 *   (no TLS, no tunnel).
 *
 * Half-close both ways, resets passed on as resets both ways, 4 MB intact
 * both ways, Nagle off, keepalive on every socket knit holds (the upstream
 * socket, the application socket and, on the hbone path, the tunnel's TCP
 * socket at both ends), idle connections closed.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import { once } from 'node:events';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { startMesh, listen, dial, readAll, type Mesh } from '../../test/helpers/mesh-pair.js';
import type { TcpOptions } from './limits.js';
import { until } from '../../test/helpers/wait.js';

const cleanups: Array<() => Promise<void> | void> = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** One of the node proxy's two paths, set up in front of an application. */
interface Path {
  mesh: Mesh;
  /** Where the application connects: host a's upstream port. */
  port: number;
  /** Flows open on each host the path crosses. */
  flows(): number[];
  /** The sockets knit holds for one connection, as `ss` filters, by what they are. */
  sockets(appPort: number): Record<string, string>;
  /** Counted closes of the path's flows that ended with `end`, on every host it crosses. */
  closed(end: string): number;
}

const PATHS = {
  hbone: async (appPort: number, tcp: Partial<TcpOptions> = {}): Promise<Path> => {
    const mesh = await startMesh(appPort, { a: { tcp }, b: { tcp } });
    cleanups.push(() => mesh.close());
    return {
      mesh,
      port: mesh.upstreamPort,
      flows: () => [mesh.a.proxy.flows.size, mesh.b.proxy.flows.size],
      sockets: (app) => ({
        'upstream <- app': `sport = :${mesh.upstreamPort}`,
        'tunnel -> agent b': `dport = :${mesh.b.proxy.hbonePort}`,
        'agent b <- tunnel': `sport = :${mesh.b.proxy.hbonePort}`,
        'agent b -> app': `dport = :${app}`,
      }),
      closed: (end) => [mesh.a, mesh.b].reduce((n, h) => n + h.metrics.get('knit_tcp_connections_closed_total', { reporter: h === mesh.a ? 'source' : 'destination', source_service: 'web', destination_service: 'api', end }), 0),
    };
  },
  'same host': async (appPort: number, tcp: Partial<TcpOptions> = {}): Promise<Path> => {
    const mesh = await startMesh(appPort, { a: { tcp } });
    cleanups.push(() => mesh.close());
    // api also runs on host a: the upstream's only endpoint is local.
    mesh.a.proxy.setService('a/api', { name: 'api', port: appPort, target: { host: '127.0.0.1', port: appPort } });
    mesh.a.proxy.setServiceTls('api', await mesh.pki.leaf('api'));
    mesh.upstream.setEndpoints([{ ...mesh.api, id: 'a/api', node: 'a' }]);
    return {
      mesh,
      port: mesh.upstreamPort,
      flows: () => [mesh.a.proxy.flows.size],
      sockets: (app) => ({
        'upstream <- app': `sport = :${mesh.upstreamPort}`,
        'host a -> app': `dport = :${app}`,
      }),
      closed: (end) => mesh.a.metrics.get('knit_tcp_connections_closed_total', { reporter: 'source', source_service: 'web', destination_service: 'api', end }),
    };
  },
} as const;

const noFlows = (p: Path) => p.flows().every((n) => n === 0);

/** An application that reads the whole request, and only after its EOF replies and closes: like a server behind `nc -N`. */
async function replyAfterEof() {
  const app = await listen(
    (s) => {
      s.on('error', () => undefined);
      const chunks: Buffer[] = [];
      s.on('data', (d: Buffer) => chunks.push(d));
      s.on('end', () => {
        const req = Buffer.concat(chunks).toString();
        s.end(`got ${req.length} bytes: ${req}`);
      });
    },
    { allowHalfOpen: true },
  );
  cleanups.push(() => void app.server.close());
  return app;
}

/** Counts what a socket receives; `reach(n)` resolves once n bytes in all have arrived. */
function received(s: net.Socket): (n: number) => Promise<void> {
  let got = 0;
  let waiters: Array<[number, () => void]> = [];
  s.on('data', (d: Buffer) => {
    got += d.length;
    waiters = waiters.filter(([at, resolve]) => (got >= at ? (resolve(), false) : true));
  });
  return (n) => (got >= n ? Promise.resolve() : new Promise<void>((resolve) => waiters.push([n, resolve])));
}

/**
 * `rounds` exchanges on one connection through knit: each way, a message in
 * two small writes (a header, then a body), the body written only once the
 * header has arrived at the far end. Resolves with the elapsed ms.
 *
 * Why this shape: Nagle holds a small segment while an earlier one is not
 * acknowledged yet, and the receiver of the header, with nothing to send
 * back, delays its ACK by Linux's minimum delayed-ACK time, 40 ms
 * (TCP_DELACK_MIN). So with Nagle on any socket knit writes to, each body
 * waits ~40 ms, except in a connection's first few segments, which Linux
 * acknowledges at once (quick-ACK mode): hence many rounds on one
 * connection, not one round on many. Measured here: 40 rounds take
 * ~10-20 ms with Nagle off everywhere, ~1.7 s with Nagle on at one host.
 */
async function twoWritePingPong(port: number, app: DrivenApp, rounds: number): Promise<number> {
  const seen = app.accepted.length;
  const client = await dial(port, { noDelay: true });
  client.write('!');
  const server = await until('the application accepted', () => app.accepted[seen]);
  const atApp = received(server);
  const atClient = received(client);
  await atApp(1);
  const t0 = performance.now();
  for (let i = 0; i < rounds; i++) {
    client.write('len4');
    await atApp(1 + 8 * i + 4);
    client.write('body');
    await atApp(1 + 8 * i + 8);
    server.write('len4');
    await atClient(8 * i + 4);
    server.write('body');
    await atClient(8 * i + 8);
  }
  const ms = performance.now() - t0;
  client.destroy();
  return ms;
}

/** An application whose connections the test drives itself. */
interface DrivenApp {
  port: number;
  /** Every connection it accepted, in order. */
  accepted: net.Socket[];
}

async function drivenApp(): Promise<DrivenApp> {
  const accepted: net.Socket[] = [];
  const app = await listen((s) => {
    s.setNoDelay(true);
    s.on('error', () => undefined);
    accepted.push(s);
  });
  cleanups.push(() => {
    for (const s of accepted) s.destroy();
    app.server.close();
  });
  return { port: app.port, accepted };
}

/** `ss` lines (with timers) of established TCP sockets on 127.0.0.1 matching a filter. */
function ssTimers(filter: string): string[] {
  const out = execFileSync('ss', ['-tnoH', 'state', 'established', filter], { encoding: 'utf8' });
  return out.split('\n').filter((l) => l.trim());
}

for (const [name, start] of Object.entries(PATHS)) {
  test(`${name}: half-close: a client that shuts down its write side after its request gets the reply, as it does directly`, async () => {
    const app = await replyAfterEof();
    const p = await start(app.port);
    for (const [how, port] of [['direct', app.port], ['through knit', p.port]] as const) {
      const s = await dial(port, { allowHalfOpen: true });
      const reply = readAll(s);
      s.end('GET / HTTP/1.0\r\n\r\n'); // write, then shutdown(SHUT_WR), like `nc -N`
      assert.deepEqual(await reply, { data: 'got 18 bytes: GET / HTTP/1.0\r\n\r\n', error: undefined }, how);
    }
    await until('every host let go of the connection once both directions ended', () => noFlows(p));
  });

  test(`${name}: half-close the other way: the application ends first and still receives what the client sends afterwards`, async () => {
    let received: Promise<string> | undefined;
    const app = await listen(
      (s) => {
        s.on('error', () => undefined);
        s.end('hello, then my side is done');
        received = readAll(s).then((r) => r.data);
      },
      { allowHalfOpen: true },
    );
    cleanups.push(() => void app.server.close());
    const p = await start(app.port);
    const s = await dial(p.port, { allowHalfOpen: true });
    const closed = once(s, 'close');
    const greeting = await new Promise<string>((resolve) => {
      const chunks: Buffer[] = [];
      s.on('data', (d: Buffer) => chunks.push(d));
      s.once('end', () => resolve(Buffer.concat(chunks).toString()));
    });
    assert.equal(greeting, 'hello, then my side is done');
    assert.ok(p.flows().every((n) => n === 1), `one direction ended: the connection stays open (${p.flows().join()})`);
    s.end('late words from the client');
    await until('app accepted', () => received !== undefined);
    assert.equal(await received, 'late words from the client');
    await closed;
    await until('closed on every host', () => noFlows(p));
    assert.ok(p.closed('closed') >= 1, 'counted as an orderly close');
  });

  test(`${name}: a full close only when both directions ended: the reply may take its time after the client's EOF`, async () => {
    let release: (() => void) | undefined;
    const app = await listen(
      (s) => {
        s.on('error', () => undefined);
        s.resume();
        s.on('end', () => (release = () => s.end('late reply')));
      },
      { allowHalfOpen: true },
    );
    cleanups.push(() => void app.server.close());
    const p = await start(app.port);
    const s = await dial(p.port, { allowHalfOpen: true });
    const reply = readAll(s);
    s.end('request');
    await until('app saw the EOF', () => release !== undefined);
    assert.ok(p.flows().every((n) => n === 1), `still open on every host (${p.flows().join()})`);
    release!();
    assert.deepEqual(await reply, { data: 'late reply', error: undefined });
    await until('closed on every host', () => noFlows(p));
  });

  test(`${name}: a reset by the application reaches the client as a reset, not as an orderly end`, async () => {
    const app = await listen((s) => {
      s.on('error', () => undefined);
      // Acknowledge first, then reset on the next message: the RST does not trail fresh data (see reset() in forward/splice.ts).
      s.write('ack');
      s.once('data', () => s.once('data', () => s.resetAndDestroy()));
    });
    cleanups.push(() => void app.server.close());
    const p = await start(app.port);
    const s = await dial(p.port);
    const ended = readAll(s);
    s.write('one');
    await until('ack', () => s.bytesRead >= 3);
    s.write('two');
    assert.deepEqual(await ended, { data: 'ack', error: 'ECONNRESET' });
    await until('closed on every host', () => noFlows(p));
    assert.ok(p.closed('reset') >= 1, 'counted as a reset');
  });

  test(`${name}: a reset by the client reaches the application as a reset`, async () => {
    let appEnded: Promise<{ data: string; error?: string }> | undefined;
    const app = await listen((s) => {
      s.on('error', () => undefined);
      appEnded = readAll(s);
      s.write('ready');
    });
    cleanups.push(() => void app.server.close());
    const p = await start(app.port);
    const s = await dial(p.port);
    s.on('error', () => undefined);
    const ready = once(s, 'data');
    s.write('hi');
    await ready;
    await until('app accepted', () => appEnded !== undefined);
    await until('the flow is open on every host', () => p.flows().every((n) => n === 1));
    s.resetAndDestroy();
    assert.deepEqual(await appEnded, { data: 'hi', error: 'ECONNRESET' });
  });

  test(`${name}: a 4 MB exchange both ways arrives intact, with half-close`, async () => {
    const size = 4 * 1024 * 1024;
    const app = await listen(
      (s) => {
        s.on('error', () => undefined);
        const h = createHash('sha256');
        s.on('data', (d: Buffer) => h.update(d));
        s.on('end', () => {
          const digest = h.digest('hex');
          // Reply with as much again (a pattern of its own), then the digest of what came in.
          const reply = Buffer.alloc(size);
          for (let i = 0; i < size; i++) reply[i] = (i * 7 + 3) & 0xff;
          s.write(reply);
          s.end(`\n${digest}`);
        });
      },
      { allowHalfOpen: true },
    );
    cleanups.push(() => void app.server.close());
    const p = await start(app.port);
    const payload = Buffer.alloc(size);
    for (let i = 0; i < size; i++) payload[i] = (i * 31) & 0xff;
    const s = await dial(p.port, { allowHalfOpen: true });
    const chunks: Buffer[] = [];
    s.on('data', (d: Buffer) => chunks.push(d));
    const done = once(s, 'end');
    s.end(payload);
    await done;
    const all = Buffer.concat(chunks);
    assert.equal(all.length, size + 65);
    assert.ok(all.subarray(0, size).every((b, i) => b === ((i * 7 + 3) & 0xff)), 'the reply arrived intact and in order');
    assert.equal(all.subarray(size + 1).toString(), createHash('sha256').update(payload).digest('hex'), 'the request arrived intact and in order');
    s.destroy();
  });

  test(`${name}: Nagle is off on every socket knit writes to: small two-part messages both ways are not held ~40 ms each by a delayed ACK`, async () => {
    const app = await drivenApp();
    const p = await start(app.port);
    await twoWritePingPong(p.port, app, 2); // warm up: JIT, the tunnel's handshake
    const ms = await twoWritePingPong(p.port, app, 40);
    // A real timing bound, on purpose (see twoWritePingPong): with Nagle on a socket knit writes to, some 30
    // of the 40 rounds wait ~40 ms for a delayed ACK (>= 1.2 s in all); with TCP_NODELAY everywhere the 40
    // take some tens of ms. 600 ms leaves room for a loaded machine and still fails if a hop keeps Nagle.
    assert.ok(ms < 600, `40 rounds took ${ms.toFixed(1)} ms`);
  });

  test(`${name}: noDelay: false keeps Nagle for bulk-only services (and still carries traffic)`, async () => {
    const app = await drivenApp();
    const p = await start(app.port, { noDelay: false });
    const ms = await twoWritePingPong(p.port, app, 40);
    // The same exchange as above, now held by the delayed ACKs: Nagle is on where it was asked for.
    assert.ok(ms > 600, `40 rounds took ${ms.toFixed(1)} ms`);
  });

  test(`${name}: TCP keepalive is on for every socket knit holds, with the configured idle time`, async (t) => {
    try {
      execFileSync('ss', ['-V']);
    } catch {
      t.skip('ss (iproute2) is not installed: npm test installs it');
      return;
    }
    const app = await listen((s) => {
      s.on('error', () => undefined);
      s.pipe(s);
    });
    cleanups.push(() => void app.server.close());
    const p = await start(app.port, { keepAliveMs: 7_000 });
    const s = await dial(p.port);
    s.write('x');
    await once(s, 'data');
    for (const [which, filter] of Object.entries(p.sockets(app.port))) {
      // ss shows one timer per socket: a retransmission or delayed-ACK timer hides the keepalive one while
      // data is in flight, so look again until the socket is quiet.
      const line = await until(`${which} shows a keepalive timer`, () => {
        const lines = ssTimers(filter);
        assert.equal(lines.length, 1, `${which}: ${lines.join(' | ')}`);
        return /timer:\(keepalive,/.test(lines[0]!) ? lines[0] : undefined;
      });
      const m = /timer:\(keepalive,(\d+(?:\.\d+)?)(ms|sec|min)/.exec(line)!;
      const secs = Number(m[1]) * (m[2] === 'ms' ? 0.001 : m[2] === 'min' ? 60 : 1);
      assert.ok(secs > 0 && secs <= 7, `${which} probes after at most 7 s (${m[1]}${m[2]})`);
    }
    s.destroy();
  });

  test(`${name}: an idle connection is closed after the idle timeout: a peer that vanished without a RST does not hold its descriptors`, async () => {
    let appSide: Promise<{ data: string; error?: string }> | undefined;
    const app = await listen((s) => {
      s.on('error', () => undefined);
      appSide = readAll(s);
      s.write('hi');
    });
    cleanups.push(() => void app.server.close());
    const p = await start(app.port, { idleTimeoutMs: 300 });
    // The client says nothing after its first exchange and never closes: to knit it is exactly a peer
    // whose host vanished (no FIN, no RST ever comes).
    const s = await dial(p.port);
    s.on('error', () => undefined);
    const closed = once(s, 'close');
    await once(s, 'data');
    await until('tracked', () => p.flows().every((n) => n === 1));
    const t0 = Date.now();
    await until('every host closed the idle connection', () => noFlows(p), 5000);
    assert.ok(Date.now() - t0 >= 200, 'not before the idle timeout');
    await until('app accepted', () => appSide !== undefined);
    await appSide; // the application saw its connection closed
    await closed;
    assert.ok(p.closed('idle_timeout') >= 1, 'counted as an idle timeout');
  });

  test(`${name}: a connection that keeps talking is not closed by the idle timeout`, async () => {
    const app = await listen((s) => {
      s.on('error', () => undefined);
      s.pipe(s);
    });
    cleanups.push(() => void app.server.close());
    const p = await start(app.port, { idleTimeoutMs: 300 });
    const s = await dial(p.port);
    const closed = once(s, 'close');
    let rounds = 0;
    const t0 = Date.now();
    // Traffic every ~100 ms for 1 s: three times the idle timeout, never idle for one.
    while (Date.now() - t0 < 1000) {
      const got = once(s, 'data');
      s.write('.');
      await got;
      rounds++;
      await until('100 ms passed', () => Date.now() - t0 >= rounds * 100, 1000, 20);
    }
    assert.ok(p.flows().every((n) => n === 1), 'still open');
    s.destroy();
    await closed;
  });
}

test('regression: noDelay: false was overridden on HBONE tunnel sockets (Node\'s HTTP/2 turns Nagle off on every socket it is given)', async () => {
  // Spy on every setNoDelay call on a TLS socket: the last one on each end of the tunnel decides.
  const calls = new Map<tls.TLSSocket, boolean>();
  const proto = net.Socket.prototype;
  const real = Object.getOwnPropertyDescriptor(proto, 'setNoDelay')!;
  Object.defineProperty(proto, 'setNoDelay', {
    ...real,
    value(this: net.Socket, enable?: boolean): net.Socket {
      if (this instanceof tls.TLSSocket) calls.set(this, enable ?? true);
      return (real.value as (this: net.Socket, enable?: boolean) => net.Socket).call(this, enable);
    },
  });
  try {
    for (const noDelay of [false, true]) {
      calls.clear();
      const app = await listen((s) => {
        s.on('error', () => undefined);
        s.pipe(s);
      });
      cleanups.push(() => void app.server.close());
      const mesh = await startMesh(app.port, { a: { tcp: { noDelay } }, b: { tcp: { noDelay } } });
      cleanups.push(() => mesh.close());
      const s = await dial(mesh.upstreamPort);
      s.write('x');
      await once(s, 'data');
      s.destroy();
      const ends = [...calls].filter(([t]) => t.remotePort === mesh.b.proxy.hbonePort || t.localPort === mesh.b.proxy.hbonePort);
      assert.equal(ends.length, 2, 'both ends of the tunnel');
      assert.deepEqual(ends.map(([, v]) => v), [noDelay, noDelay], `TCP_NODELAY as configured (noDelay: ${noDelay})`);
    }
  } finally {
    Object.defineProperty(proto, 'setNoDelay', real);
  }
});
