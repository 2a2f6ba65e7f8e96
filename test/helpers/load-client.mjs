// A steady client for fault tests: GETs `url` every `everyMs`, alternating a
// kept-alive connection and a new one, and prints one line per request:
// `<epoch ms> <1|0> <ms> <status or error>`. Runs until killed.
import http from 'node:http';

const [url, everyMs = '25'] = process.argv.slice(2);
const keepAlive = new http.Agent({ keepAlive: true, maxSockets: 2 });
let i = 0;
function one() {
  const t0 = Date.now();
  const agent = i++ % 2 === 0 ? keepAlive : false;
  const done = (ok, what) => {
    process.stdout.write(`${t0} ${ok ? 1 : 0} ${Date.now() - t0} ${what}\n`);
    setTimeout(one, Number(everyMs));
  };
  const req = http.get(url, { agent, timeout: 10_000 }, (res) => {
    let body = '';
    res.on('data', (c) => (body += c));
    res.on('end', () => done(res.statusCode === 200 && body.includes('hello from api'), res.statusCode));
    res.on('error', (e) => done(false, e.code ?? e.message));
  });
  req.on('timeout', () => req.destroy(Object.assign(new Error('timeout'), { code: 'TIMEOUT' })));
  req.on('error', (e) => done(false, e.code ?? e.message));
}
one();
