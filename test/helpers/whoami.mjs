// A test application: answers every HTTP request with its name and the
// address the connection came from (so a test sees whether it arrived
// through the local agent or straight from the caller). Prints "listening".
import http from 'node:http';

const name = process.env.NAME ?? 'app';
const port = Number(process.env.PORT ?? 8080);
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'text/plain');
  // Listening on both families: an IPv4 peer shows as ::ffff:a.b.c.d, reported as a.b.c.d.
  res.end(`${name} saw ${req.socket.remoteAddress?.replace(/^::ffff:(?=\d+\.)/, '')}\n`);
});
server.keepAliveTimeout = 600_000;
server.listen(port, process.env.HOST ?? '::', () => console.log('listening'));
