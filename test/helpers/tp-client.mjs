// An unmodified client for the transparent-mode tests, run as an ordinary
// uid inside a test host: it resolves names with the system resolver and
// connects with plain sockets, knowing nothing of the mesh. One JSON line out.
//   get URL          one HTTP GET: {ok, status, body, ms} or {ok:false, err, ms}
//   hold URL         a keep-alive GET, then waits for the connection to end: prints {open, body} then {closed, ms}
//   lookup NAME      the system resolver's answer: {address} or {err}
import http from 'node:http';
import dns from 'node:dns/promises';

const [mode, arg] = process.argv.slice(2);
const t0 = Date.now();
const out = (o) => console.log(JSON.stringify({ ...o, ms: Date.now() - t0 }));

if (mode === 'lookup') {
  dns.lookup(arg, { family: 4 }).then((r) => out({ address: r.address }), (e) => out({ err: e.code ?? e.message }));
} else if (mode === 'get' || mode === 'hold') {
  const agent = new http.Agent({ keepAlive: mode === 'hold' });
  // Names resolve to IPv4 (the virtual IPs are IPv4); an IPv6 literal is dialled as it is.
  const v6 = new URL(arg).hostname.startsWith('[');
  const req = http.get(arg, { agent, timeout: 8000, ...(v6 ? {} : { family: 4 }) }, (res) => {
    let body = '';
    res.on('data', (d) => (body += d));
    res.on('end', () => {
      if (mode === 'get') return out({ ok: true, status: res.statusCode, body: body.trim() });
      out({ open: true, body: body.trim() });
      // A keep-alive agent unrefs its idle sockets: hold the process (and the connection) open until it ends.
      const keep = setInterval(() => undefined, 1000);
      req.socket.once('close', () => {
        clearInterval(keep);
        out({ closed: true });
        process.exit(0);
      });
    });
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', (e) => out({ ok: false, err: e.code ?? e.message }));
} else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}
