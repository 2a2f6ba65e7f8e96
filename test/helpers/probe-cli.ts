/**
 * Runs the crash probes against host:port from wherever it is started (the
 * fleet tests start it inside a host's network namespace, where an agent's
 * admin API listens on loopback), then proves the target still serves.
 * argv: host port [tls]; prints the report's counts as one JSON line.
 */
import { assertServing, crashProbe } from './probes.js';

const [host, port, tls] = process.argv.slice(2);
const target = { host: host!, port: Number(port), tls: tls === 'tls' };
const r = await crashProbe(target);
await assertServing(target);
process.stdout.write(`${JSON.stringify({ sent: r.sent, answered: r.answered, statuses: r.statuses })}\n`);
