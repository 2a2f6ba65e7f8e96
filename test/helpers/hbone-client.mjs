// A hand-made HBONE client for fault and attack tests: presents the given
// certificate, asks for `service` by SNI, sends one CONNECT stream with
// `authority` and prints the status and the knit-reason header as JSON.
// argv: host port service namespace trustDomain authority certFile keyFile caFile
import tls from 'node:tls';
import http2 from 'node:http2';
import { readFileSync } from 'node:fs';

const [host, port, service, namespace, td, authority, certFile, keyFile, caFile] = process.argv.slice(2);
const socket = tls.connect({
  host, port: Number(port), servername: `${service}.${namespace}.svc.${td}`, ALPNProtocols: ['h2'],
  cert: readFileSync(certFile), key: readFileSync(keyFile), ca: readFileSync(caFile), checkServerIdentity: () => undefined,
});
const done = (out) => {
  process.stdout.write(`${JSON.stringify(out)}\n`);
  process.exit(0);
};
socket.on('error', (e) => done({ error: e.code ?? e.message }));
socket.once('secureConnect', () => {
  const session = http2.connect(`https://${host}:${port}`, { createConnection: () => socket });
  session.on('error', (e) => done({ error: e.code ?? e.message }));
  const stream = session.request({ ':method': 'CONNECT', ':authority': authority });
  stream.on('response', (h) => done({ status: h[':status'], reason: h['knit-reason'] ?? '' }));
  stream.on('error', (e) => done({ error: e.code ?? e.message }));
});
setTimeout(() => done({ error: 'timeout' }), 10_000).unref();
