// Sockets for the netfilter tests, run inside a network namespace (and, for
// clients, as another uid through setpriv): where a connection or a DNS
// query lands is told by the label of the server that answered it.
//
//   serve LABEL=PROTO:PORT ...   listen on every address (:: dual stack),
//                                answer each TCP connection / UDP datagram
//                                with LABEL; prints "ready" when all listen
//   tcp HOST PORT                connect, print {"reply": LABEL} or {"error": CODE}
//   udp HOST PORT                send one datagram, print the same
import net from 'node:net';
import dgram from 'node:dgram';
import { isIPv6 } from 'node:net';

const [mode, ...args] = process.argv.slice(2);
const TIMEOUT_MS = 3000;

function print(out) {
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

if (mode === 'serve') {
  const ready = args.map((arg) => {
    const m = /^([^=]+)=(tcp|udp):(\d+)$/.exec(arg);
    if (!m) throw new Error(`bad listener ${arg}`);
    const [, label, proto, port] = m;
    return new Promise((resolve, reject) => {
      if (proto === 'tcp') {
        const server = net.createServer((s) => {
          s.on('error', () => undefined);
          s.end(label);
        });
        server.once('error', reject);
        server.listen({ port: Number(port), host: '::', ipv6Only: false }, resolve);
      } else {
        const sock = dgram.createSocket({ type: 'udp6', ipv6Only: false });
        sock.on('message', (_msg, rinfo) => sock.send(label, rinfo.port, rinfo.address));
        sock.once('error', reject);
        sock.bind(Number(port), '::', resolve);
      }
    });
  });
  Promise.all(ready).then(
    () => process.stdout.write('ready\n'),
    (e) => {
      process.stderr.write(`${e.message}\n`);
      process.exit(1);
    },
  );
} else if (mode === 'tcp') {
  const [host, port] = args;
  const s = net.connect({ host, port: Number(port) });
  let got = '';
  s.setTimeout(TIMEOUT_MS, () => {
    print({ error: 'timeout' });
    process.exit(0);
  });
  s.on('data', (d) => (got += d));
  s.on('end', () => {
    print({ reply: got });
    process.exit(0);
  });
  s.on('error', (e) => {
    print({ error: e.code ?? e.message });
    process.exit(0);
  });
} else if (mode === 'udp') {
  const [host, port] = args;
  const sock = dgram.createSocket(isIPv6(host) ? 'udp6' : 'udp4');
  sock.on('message', (msg) => {
    print({ reply: msg.toString() });
    process.exit(0);
  });
  sock.on('error', (e) => {
    print({ error: e.code ?? e.message });
    process.exit(0);
  });
  sock.send('query', Number(port), host);
  setTimeout(() => {
    print({ error: 'timeout' });
    process.exit(0);
  }, TIMEOUT_MS);
} else {
  process.stderr.write(`unknown mode ${mode}\n`);
  process.exit(2);
}
