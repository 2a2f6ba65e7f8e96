// The "api" service: answers on 127.0.0.1:9001 (reached by peers only through the mesh).
import http from 'node:http';
const port = Number(process.env.API_PORT ?? 9001);
http
  .createServer((req, res) => {
    if (req.url === '/health') return res.end('ok');
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ service: 'api', message: 'hello from api', pid: process.pid }));
  })
  // A port already taken is one line naming it, not a stack trace.
  .on('error', (e) => {
    console.error(e.code === 'EADDRINUSE' ? `api: port ${port} on 127.0.0.1 is already in use (another npm run hello?); stop what holds it or set API_PORT` : `api: ${e.message}`);
    process.exit(1);
  })
  .listen(port, '127.0.0.1', () => console.log(`api listening on 127.0.0.1:${port}`));
