// The benchmark's application: a 64-byte HTTP response on the port given as argv[2].
import http from 'node:http';
const body = Buffer.alloc(64, 'k');
http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
  res.end(body);
}).listen(Number(process.argv[2]), '127.0.0.1', () => console.log('ready'));
