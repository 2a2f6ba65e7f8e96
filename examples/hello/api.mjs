// The "api" service: answers on 127.0.0.1:9001 (reached by peers only through the mesh).
import http from 'node:http';
const port = Number(process.env.API_PORT ?? 9001);
http
  .createServer((req, res) => {
    if (req.url === '/health') return res.end('ok');
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ service: 'api', message: 'hello from api', pid: process.pid }));
  })
  .listen(port, '127.0.0.1', () => console.log(`api listening on 127.0.0.1:${port}`));
