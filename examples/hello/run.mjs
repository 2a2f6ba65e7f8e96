// `npm run hello`: starts the two example apps and `knit dev` on their service
// files, then applies the example intentions (default deny, web -> api allowed).
// Ctrl-C stops everything.
import { spawn, execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import net from 'node:net';

const here = dirname(fileURLToPath(import.meta.url));

// Every fixed port this demo needs, checked first: a second `npm run hello`
// gets one line naming the port and what wants it, and starts nothing.
const PORTS = [
  [8080, 'the example app web (examples/hello/web.mjs)'],
  [9001, 'the example app api (examples/hello/api.mjs)'],
  [9191, "web's upstream to api (examples/hello/services/web.json)"],
  [7701, "knit dev's admin API"],
];
const inUse = (port) =>
  new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', (e) => resolve(e.code === 'EADDRINUSE'));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(false)));
  });
for (const [port, what] of PORTS) {
  if (await inUse(port)) {
    console.error(`npm run hello: port ${port} on 127.0.0.1 is already in use; ${what} wants it. Is another npm run hello (or knit dev) running? Stop it first.`);
    process.exit(1);
  }
}
const knit = join(here, '..', '..', 'bin', 'knit.mjs');
const dataDir = join(here, '..', '..', '.knit-dev');
const children = [
  spawn(process.execPath, [join(here, 'api.mjs')], { stdio: 'inherit' }),
  spawn(process.execPath, [join(here, 'web.mjs')], { stdio: 'inherit' }),
];
const dev = spawn(process.execPath, [knit, 'dev', '--config-dir', join(here, 'services'), '--data-dir', dataDir], { stdio: ['ignore', 'pipe', 'inherit'] });
children.push(dev);
let buf = '';
dev.stdout.on('data', (d) => {
  process.stdout.write(d);
  buf += d;
  if (buf.includes('knit dev ready') && !buf.includes('#applied')) {
    buf += '#applied';
    execFileSync(process.execPath, [knit, 'intention', 'apply', '-f', join(here, 'intentions.yaml')], { stdio: 'inherit' });
    console.log('\nTry:  curl http://127.0.0.1:8080/          (web -> api through mTLS)');
    console.log('      node bin/knit.mjs intention check web api');
    console.log('      node bin/knit.mjs intention deny web api   (then curl again)');
    console.log('      node bin/knit.mjs services\n');
  }
});
const stop = () => children.forEach((c) => c.kill('SIGTERM'));
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
dev.on('exit', (code) => {
  stop();
  process.exit(code ?? 1);
});
