// The "web" service: on 127.0.0.1:8080, calls api through its mesh upstream on 127.0.0.1:9191.
import http from 'node:http';
const port = Number(process.env.WEB_PORT ?? 8080);
const upstream = process.env.API_UPSTREAM ?? 'http://127.0.0.1:9191/';
// A keep-alive agent: one mesh connection carries many requests.
const agent = new http.Agent({ keepAlive: true });
http
  .createServer((req, res) => {
    if (req.url === '/health') return res.end('ok');
    const up = http.get(upstream, { agent }, (r) => {
      let body = '';
      r.on('data', (c) => (body += c));
      r.on('end', () => res.end(`web got from api: ${body}\n`));
    });
    up.on('error', (e) => {
      res.statusCode = 502;
      res.end(`web could not reach api through the mesh: ${e.code ?? e.message}\n`);
    });
  })
  // A port already taken is one line naming it, not a stack trace.
  .on('error', (e) => {
    console.error(e.code === 'EADDRINUSE' ? `web: port ${port} on 127.0.0.1 is already in use (another npm run hello?); stop what holds it or set WEB_PORT` : `web: ${e.message}`);
    process.exit(1);
  })
  .listen(port, '127.0.0.1', () => console.log(`web listening on 127.0.0.1:${port}`));
