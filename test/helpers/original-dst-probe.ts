/**
 * A capture-port stand-in for src/proxy/transparent/original-dst.test.ts,
 * run inside a test network namespace (`ip netns exec NS node --import tsx
 * ...`): listens on HOST:PORT and prints, for every connection it accepts,
 * one JSON line with what originalDestination() and notRedirected() say.
 *
 *   original-dst-probe.ts HOST PORT [TARGET ...]
 *
 * Prints {"listening":PORT} once listening. With TARGETs (`a.b.c.d:port` or
 * `[v6]:port`) it also connects to each in turn from inside the namespace,
 * prints {"target":...,"seen":RECORD} (or {"target":...,"connectError":...})
 * and exits; without, it serves until killed.
 */
import net from 'node:net';
import { notRedirected, originalDestination } from '../../src/proxy/transparent/original-dst.js';

export interface ProbeRecord {
  remote: string;
  remotePort: number;
  local: string;
  localPort: number;
  localFamily: string;
  dst: ReturnType<typeof originalDestination>;
  notRedirected?: boolean;
}

const [host = '::', portArg = '15001', ...targets] = process.argv.slice(2);
const port = Number(portArg);
const print = (v: unknown): void => {
  process.stdout.write(`${JSON.stringify(v)}\n`);
};

// Accepted connections by the client's port, for a TARGET's connect to find its own.
const waiting = new Map<number, (r: ProbeRecord) => void>();
const seen = new Map<number, ProbeRecord>();

const server = net.createServer((socket) => {
  const dst = originalDestination(socket);
  const record: ProbeRecord = {
    remote: socket.remoteAddress ?? '',
    remotePort: socket.remotePort ?? 0,
    local: socket.localAddress ?? '',
    localPort: socket.localPort ?? 0,
    localFamily: socket.localFamily ?? '',
    dst,
    ...('error' in dst ? {} : { notRedirected: notRedirected(socket, dst) }),
  };
  socket.destroy();
  if (targets.length === 0) return print(record);
  seen.set(record.remotePort, record);
  waiting.get(record.remotePort)?.(record);
});

/** Connects to `target` and resolves with what the listener saw of that connection. */
function probe(target: string): Promise<unknown> {
  const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(target);
  if (!m) return Promise.resolve({ target, connectError: 'not host:port' });
  return new Promise((resolve) => {
    const client = net.connect({ host: m[1]!, port: Number(m[2]) });
    const timer = setTimeout(() => {
      client.destroy();
      resolve({ target, connectError: 'the listener saw no connection within 10 s' });
    }, 10_000);
    client.on('error', (e) => {
      clearTimeout(timer);
      resolve({ target, connectError: e.message });
    });
    client.on('connect', () => {
      const mine = client.localPort ?? 0;
      const done = (r: ProbeRecord): void => {
        clearTimeout(timer);
        waiting.delete(mine);
        client.destroy();
        resolve({ target, seen: r });
      };
      const already = seen.get(mine);
      if (already) done(already);
      else waiting.set(mine, done);
    });
  });
}

server.listen({ host, port, ipv6Only: false }, () => {
  print({ listening: port });
  if (targets.length === 0) return;
  void (async () => {
    for (const t of targets) print(await probe(t));
    server.close();
  })();
});
server.on('error', (e) => {
  print({ listenError: e.message });
  process.exit(1);
});
process.on('SIGTERM', () => process.exit(0));
