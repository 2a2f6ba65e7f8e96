// The floor: the least a Node program does to carry traffic the way knit
// does, written as a Node developer would write it first, with none of
// knit's work (no identity checks beyond the TLS chain, no intentions, no
// flows, metrics or logs, no limits or timeouts). `npm run bench -- --floor`
// runs it as two more paths, so that knit's figures can be read against
// what Node itself costs on this machine:
//
//   node floor.mjs tcp LISTEN_PORT APP_PORT
//       a TCP proxy: each connection piped to the app (the floor of
//       `knit dev`'s same-host path)
//   node floor.mjs h2-server LISTEN_PORT APP_PORT CERT_DIR
//   node floor.mjs h2-client LISTEN_PORT SERVER_PORT APP_PORT CERT_DIR
//       an HBONE-shaped pair: the client takes plain TCP and opens one
//       HTTP/2 CONNECT stream per connection over one mutual-TLS session
//       (TLS 1.3, ALPN h2, the same windows and frame size as knit); the
//       server dials the app per stream (the floor of two `knit agent`s)
//
// CERT_DIR holds the benchmark's CA and leaves (paths.ts makeCerts).
// Prints "ready" once listening. Not knit code, and not a test.
import fs from 'node:fs';
import http2 from 'node:http2';
import net from 'node:net';
import { join } from 'node:path';

const [mode, ...args] = process.argv.slice(2);
// A clean exit on SIGTERM, so that --cpu-prof writes its profile.
process.on('SIGTERM', () => process.exit(0));
const SETTINGS = { initialWindowSize: 4 << 20, maxFrameSize: 256 << 10, maxConcurrentStreams: 100 };
const CONNECTION_WINDOW = 32 << 20;
const app = (port) => net.connect({ host: '127.0.0.1', port, noDelay: true });
const ready = (server) => server.on('listening', () => console.log('ready'));

/** Pipes both ways; either side failing tears down the other. */
function join2(a, b) {
  a.on('error', () => b.destroy());
  b.on('error', () => a.destroy());
  a.pipe(b);
  b.pipe(a);
}

function tlsFiles(dir, who) {
  return { key: fs.readFileSync(join(dir, `${who}.key`)), cert: fs.readFileSync(join(dir, `${who}.crt`)), ca: fs.readFileSync(join(dir, 'ca.pem')) };
}

if (mode === 'tcp') {
  const [listen, appPort] = args.map(Number);
  ready(net.createServer({ noDelay: true }, (c) => join2(c, app(appPort))).listen(listen, '127.0.0.1'));
} else if (mode === 'h2-server') {
  const [listen, appPort] = args.slice(0, 2).map(Number);
  const server = http2.createSecureServer({ ...tlsFiles(args[2], 'server'), requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3', settings: SETTINGS });
  server.on('session', (s) => s.on('connect', () => s.setLocalWindowSize(CONNECTION_WINDOW)));
  server.on('stream', (stream) => {
    const u = app(appPort);
    u.on('connect', () => {
      stream.respond({ ':status': 200 });
      join2(stream, u);
    });
    u.on('error', () => !stream.destroyed && stream.close(http2.constants.NGHTTP2_CONNECT_ERROR));
  });
  ready(server.listen(listen, '127.0.0.1'));
} else if (mode === 'h2-client') {
  const [listen, serverPort, appPort] = args.slice(0, 3).map(Number);
  const files = tlsFiles(args[3], 'client');
  let session;
  const current = () => {
    if (session && !session.closed && !session.destroyed) return session;
    // The server's SVID has a URI SAN only: the chain is verified, the host name is not (knit checks the SPIFFE ID instead).
    session = http2.connect(`https://127.0.0.1:${serverPort}`, { ...files, minVersion: 'TLSv1.3', checkServerIdentity: () => undefined, settings: SETTINGS });
    session.on('error', () => undefined);
    session.on('connect', (s) => s.setLocalWindowSize(CONNECTION_WINDOW));
    return session;
  };
  ready(net.createServer({ noDelay: true }, (c) => {
    const stream = current().request({ ':method': 'CONNECT', ':authority': `127.0.0.1:${appPort}` });
    join2(c, stream);
  }).listen(listen, '127.0.0.1'));
} else {
  console.error('usage: node floor.mjs tcp|h2-server|h2-client ...');
  process.exit(2);
}
