// The benchmark's application, the same for every path: a 64-byte HTTP
// response on the port given as argv[2], and a 64 MiB one on /bulk (bulk
// transfer on one connection). The bulk body is made once, at the first
// /bulk request, so the keep-alive figures see an app without it.
import http from 'node:http';

const body = Buffer.alloc(64, 'k');
const BULK_BYTES = 64 * 1024 * 1024;
let bulk;
http.createServer((req, res) => {
  if (req.url === '/bulk') {
    bulk ??= Buffer.alloc(BULK_BYTES, 'b');
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': bulk.length });
    res.end(bulk);
    return;
  }
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
  res.end(body);
}).listen(Number(process.argv[2]), '127.0.0.1', () => console.log('ready'));
