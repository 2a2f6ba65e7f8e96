/**
 * Crash probes for knit's HTTP APIs: a few hundred malformed, hostile or
 * merely odd requests written over raw TCP (or TLS), each on its own
 * connection, to prove that no request can take a process down. Used
 * against a router in unit tests and against real `knit dev`, `knit server`
 * and `knit agent` processes end to end.
 *
 * Every probe is built so that it cannot change state on the target: bodies
 * sent to routes that act without reading theirs (reload, tokens, node
 * allowances) are always refused before the handler runs (bad JSON, wrong
 * type, too big), well-formed JSON goes only to routes that need fields it
 * lacks, and routes that act on an empty request (challenge, revoke) only
 * get methods they do not serve.
 */
import net from 'node:net';
import tls from 'node:tls';
import assert from 'node:assert/strict';
import { prng } from './prng.js';

/** Where to probe; `tls` makes it HTTPS (the certificate is not checked), an object adds client options. */
export interface ProbeTarget {
  host: string;
  port: number;
  tls?: boolean | tls.ConnectionOptions;
}

/** What came back, counted by outcome. */
export interface ProbeReport {
  /** Probes sent, one connection each. */
  sent: number;
  /** Probes that got an HTTP status line back. */
  answered: number;
  /**
   * Count per outcome: the final HTTP status (`"400"`), or `closed` (closed
   * with no answer), `reset`, `timeout` (no answer within the socket
   * timeout), `not-http` (bytes that are not HTTP, such as a TLS alert), `error <code>`.
   */
  statuses: Record<string, number>;
  /** Each probe's name and outcome, for a failing assertion to show. */
  outcomes: Array<{ probe: string; outcome: string }>;
}

export interface ProbeOptions {
  /** Connections open at once. Default 8. */
  concurrency?: number;
  /** Socket inactivity timeout per probe, ms. Default 2000. */
  timeoutMs?: number;
}

/** One probe: bytes written in order on a fresh connection. */
export interface Probe {
  name: string;
  chunks: Array<string | Buffer>;
  /** Half-close after writing (the server sees EOF). */
  end?: boolean;
  /** Sent in clear even to a TLS target: probes the TLS layer itself. */
  plain?: boolean;
}

const KiB = 1024;
const MiB = 1024 * KiB;
const HOST = 'Host: knit-probe\r\n';

/** Every route knit serves on some listener, as probes can reach it. */
const PATHS = ['/v1/health', '/v1/state', '/metrics', '/v1/services', '/v1/ca/roots', '/v1/intentions', '/v1/intentions/apply', '/v1/intentions/check', '/v1/agent/reload', '/v1/agent/enrol', '/v1/agent/renew', '/v1/agent/sign', '/v1/agent/challenge', '/v1/agent/rejoin', '/v1/tokens', '/v1/nodes', '/v1/nodes/knit-probe', '/v1/nodes/knit-probe/revoke', '/v1/agent/check/pass/knit-probe', '/'];
/** Routes that take a body, for body probes that are always refused before any handler runs. */
const BODY_ROUTES: Array<[string, string]> = [['POST', '/v1/intentions/apply'], ['PUT', '/v1/intentions'], ['POST', '/v1/agent/enrol'], ['POST', '/v1/agent/reload'], ['POST', '/v1/tokens'], ['PUT', '/v1/agent/check/pass/knit-probe'], ['POST', '/v1/agent/rejoin'], ['PUT', '/v1/nodes/knit-probe'], ['POST', '/v1/knit-probe']];
/** Routes where well-formed JSON without the required fields is refused: safe for shape probes. */
const SHAPE_ROUTES: Array<[string, string]> = [['POST', '/v1/intentions/apply'], ['PUT', '/v1/intentions'], ['POST', '/v1/agent/enrol'], ['POST', '/v1/agent/rejoin']];

function request(method: string, target: string, headers: string[] = [], body?: string | Buffer): Array<string | Buffer> {
  const head = `${method} ${target} HTTP/1.1\r\n${HOST}${headers.map((h) => `${h}\r\n`).join('')}`;
  if (body === undefined) return [`${head}\r\n`];
  return [`${head}content-length: ${Buffer.byteLength(body)}\r\n\r\n`, body];
}

/** The probes, in a fixed order. */
export function probes(): Probe[] {
  const out: Probe[] = [];
  const add = (name: string, chunks: Array<string | Buffer>, extra: Partial<Probe> = {}) => out.push({ name, chunks, ...extra });

  // Request targets that once made the router throw before its try, and their relatives.
  for (const t of ['//', '//[', '//a b', '//x:99999', '//x', '///v1/health', '//@', '//[::1]:0/', '//user@host:1/v1/health', '/\\\\x', '//%zz', '/.//..//']) {
    add(`malformed target ${JSON.stringify(t)}`, [`GET ${t} HTTP/1.1\r\n${HOST}\r\n`]);
  }

  // Methods: unknown to HTTP, unknown to the router, or not methods at all.
  for (const m of ['FOO', 'get', 'G\tET', 'GET\0', 'M'.repeat(5000), 'PROPFIND', 'BREW', '', ' ', '\u00e9']) add(`method ${JSON.stringify(m.slice(0, 20))}`, [`${m} /v1/health HTTP/1.1\r\n${HOST}\r\n`]);
  for (const p of PATHS) for (const m of ['PATCH', 'OPTIONS', 'HEAD', 'TRACE', 'DELETE']) add(`${m} ${p}`, request(m, p));
  add('CONNECT', [`CONNECT knit-probe:443 HTTP/1.1\r\n${HOST}\r\n`]);
  add('CONNECT to a path', [`CONNECT // HTTP/1.1\r\n${HOST}\r\n`]);
  add('HTTP/2 preface', ['PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n']);

  // Headers over the 16 KiB limit, and many of them.
  add('one 17 KiB header', request('GET', '/v1/health', [`x-big: ${'a'.repeat(17 * KiB)}`]));
  add('one 64 KiB header', request('GET', '/v1/health', [`x-big: ${'a'.repeat(64 * KiB)}`]));
  add('a 1 MiB header', request('GET', '/v1/health', [`x-big: ${'a'.repeat(MiB)}`]));
  add('200 headers of 100 bytes', request('GET', '/v1/health', Array.from({ length: 200 }, (_, i) => `x-h${i}: ${'b'.repeat(100)}`)));
  add('3000 tiny headers', request('GET', '/v1/health', Array.from({ length: 3000 }, (_, i) => `x${i}: y`)));
  add('20 KiB cookie', request('GET', '/v1/health', [`cookie: ${'c=d; '.repeat(4 * KiB)}`]));
  add('20 KiB bearer token', request('POST', '/v1/tokens', [`authorization: Bearer ${'t'.repeat(20 * KiB)}`], '{nope'));
  add('15 KiB bearer token', request('GET', '/v1/intentions', [`authorization: Bearer ${'t'.repeat(15 * KiB)}`]));
  add('bearer token of binary', request('GET', '/v1/intentions', [`authorization: Bearer \u00ff\u00fe\u0001`]));
  add('a 20 KiB header name', request('GET', '/v1/health', [`${'n'.repeat(20 * KiB)}: v`]));

  // Percent-encoding that does not decode, in every position a path parameter can take.
  const badPct = ['%zz', '%', '%2', '%E0%A4%A', '%C0%AF', '%ED%A0%80', '%FF', '%uFFFF', '%%41', 'a%2Fb%', '%00', '%0D%0A'];
  for (const b of badPct) {
    for (const [m, t] of [['GET', `/v1/${b}`], ['PUT', `/v1/agent/check/pass/${b}`], ['PUT', `/v1/agent/check/${b}/knit-probe`], ['PUT', `/v1/nodes/${b}`], ['GET', `/v1/intentions/check?source=${b}&destination=${b}`], ['GET', `/${b}`], ['POST', `/v1/agent/reload/${b}`]] as const) {
      // Bodies here never parse, so even a route that matched would refuse before its handler.
      add(`${m} ${t}`, m === 'GET' ? request(m, t) : request(m, t, ['content-type: application/json'], '{nope'));
    }
  }

  // Bodies that are not JSON, with and without a content type.
  const notJson = ['{nope', '[', '{"a":', '\u00ff\u00fe\u0000', 'undefined', 'NaN', "{'a':1}", '{"a":1}garbage', '\u0000', '\ufeff{}', ' ', '{"a":"\\uZZZZ"}'];
  for (const [m, p] of BODY_ROUTES) {
    for (const b of notJson) {
      add(`${m} ${p} body ${JSON.stringify(b)}`, request(m, p, ['content-type: application/json'], b));
      add(`${m} ${p} untyped body ${JSON.stringify(b)}`, request(m, p, [], b));
    }
  }
  add('invalid UTF-8 body', request('POST', '/v1/intentions/apply', ['content-type: application/json'], Buffer.from([0x7b, 0xc3, 0x28, 0xa0, 0xa1, 0x7d])));

  // Well-formed JSON of the wrong shape, and hostile shapes, to routes that need fields it lacks.
  const shapes = ['null', '[]', '"x"', '1e999', '-0', 'true', '{}', '{"__proto__":{"intentions":[],"source":"a","destination":"b","action":"allow"}}', '{"constructor":{"prototype":{"polluted":1}}}', '{"intentions":[null]}', '{"intentions":[{"source":{},"destination":[],"action":1}]}', '{"intentions":"all"}', '{"node":"../../etc","csr":"x","token":"y"}', '{"node":"a\\u0000b","csr":"-----BEGIN CERTIFICATE REQUEST-----\\n!!\\n-----END CERTIFICATE REQUEST-----","token":"y"}', `${'['.repeat(200_000)}${']'.repeat(200_000)}`, `{"a":"${'x'.repeat(900 * KiB)}"}`];
  for (const [m, p] of SHAPE_ROUTES) for (const s of shapes) add(`${m} ${p} shape ${JSON.stringify(s.slice(0, 30))}`, request(m, p, ['content-type: application/json'], s));

  // Content types other than JSON.
  const types = ['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/xml', 'application/jsonp', 'application/json-seq', '', ';', 'json', 'application/ json', 'a'.repeat(5000), 'APPLICATION/JSON', 'application/json; charset=utf-16'];
  for (const [m, p] of BODY_ROUTES.slice(0, 5)) for (const t of types) add(`${m} ${p} content-type ${JSON.stringify(t.slice(0, 30))}`, request(m, p, [`content-type: ${t}`], '{nope'));
  add('content-type with a control character', request('POST', '/v1/intentions/apply', ['content-type: application/json\u0001'], '{nope'));

  // Bodies over the 1 MiB cap, declared or not, and framing the parser must refuse.
  for (const [m, p] of BODY_ROUTES.slice(0, 4)) add(`${m} ${p} 2 MiB body`, request(m, p, ['content-type: application/json'], `{"a":"${'x'.repeat(2 * MiB)}"}`));
  add('declared 10^15 bytes, sent 5', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-type: application/json\r\ncontent-length: 1000000000000000\r\n\r\n{nope`]);
  add('declared length beyond 2^64', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-length: 99999999999999999999999\r\n\r\n{}`]);
  add('negative length', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-length: -1\r\n\r\n{}`]);
  add('length "1, 2"', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-length: 1, 2\r\n\r\n{}`]);
  add('two different lengths', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-length: 2\r\ncontent-length: 3\r\n\r\n{}`]);
  add('length and chunked', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n`]);
  const chunked = (name: string, body: string) => add(name, [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n`, body]);
  chunked('chunked 1.5 MiB', `${`${(64 * KiB).toString(16)}\r\n${'x'.repeat(64 * KiB)}\r\n`.repeat(24)}0\r\n\r\n`);
  chunked('chunk size "zz"', 'zz\r\nabc\r\n0\r\n\r\n');
  chunked('chunk size 2^64', 'ffffffffffffffffff\r\nabc\r\n0\r\n\r\n');
  chunked('chunk shorter than its size', '10\r\nabc\r\n0\r\n\r\n');
  chunked('20 KiB chunk extension', `3;${'e'.repeat(20 * KiB)}\r\nabc\r\n0\r\n\r\n`);
  chunked('chunked invalid JSON', '5\r\n{nope\r\n0\r\n\r\n');
  add('transfer-encoding gzip', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}transfer-encoding: gzip\r\n\r\nabc`]);
  add('transfer-encoding gzip, chunked', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}transfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n`]);
  add('expect 100-continue, invalid JSON', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}expect: 100-continue\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n`, '{nope']);
  add('expect 100-continue, wrong type', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}expect: 100-continue\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n`, '{nope']);
  add('expect something else', request('GET', '/v1/health', ['expect: teapot']));

  // Requests cut short: the server sees EOF mid-request.
  for (const [name, bytes] of [
    ['only a method', 'GET'],
    ['request line, no headers', 'GET /v1/health HTTP/1.1\r\n'],
    ['half a header block', `GET /v1/health HTTP/1.1\r\n${HOST}x-a: b`],
    ['half a body', `POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-type: application/json\r\ncontent-length: 100\r\n\r\n{"intentions":`],
    ['half a chunk', `POST /v1/intentions/apply HTTP/1.1\r\n${HOST}transfer-encoding: chunked\r\n\r\n10\r\nabc`],
    ['nothing at all', ''],
  ] as const) add(`truncated: ${name}`, [bytes], { end: true });
  // And two that stall without EOF: answered by the server's timeouts or not at all, but never a crash.
  add('stalled request line', ['GET /v1/heal']);
  add('stalled body', [`POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-type: application/json\r\ncontent-length: 100\r\n\r\n{`]);

  // Bytes that are not HTTP.
  const rand = prng(0x6b6e6974);
  for (const len of [1, 7, 16, 64, 300, 1000, 4096, 16 * KiB, 17 * KiB, 64 * KiB, 5, 33, 128, 999, 2048, 8000, 12_345, 20_000, 40_000, 100_000]) {
    add(`${len} random bytes`, [Buffer.from(Array.from({ length: len }, () => Math.floor(rand() * 256)))], { end: true });
  }
  add('a TLS ClientHello', [Buffer.from('16030100c8010000c40303' + '00'.repeat(32) + '00' + '0002c02f0100', 'hex')], { end: true });
  add('1000 NUL bytes', [Buffer.alloc(1000)], { end: true });
  add('10000 blank lines', ['\r\n'.repeat(10_000)], { end: true });
  add('an SSH banner', ['SSH-2.0-OpenSSH_9.6\r\n'], { end: true });
  add('telnet negotiation', [Buffer.from([0xff, 0xf4, 0xff, 0xfd, 0x06])], { end: true });
  add('a JSON document, no HTTP', ['{"intentions":[]}\r\n\r\n'], { end: true });

  // Absolute-form and asterisk-form targets, and targets that are neither.
  for (const t of ['http://knit-probe/v1/health', 'HTTP://KNIT-PROBE/v1/health', 'https://knit-probe/v1/health', 'http://user:pw@knit-probe/v1/health', 'http://[::1/', 'http://x:99999/', 'http://', 'http://%zz/', 'ftp://knit-probe/', 'file:///etc/passwd', 'javascript:alert(1)', 'x', '?a=b', '#frag', '*', 'knit-probe:443']) {
    add(`target ${JSON.stringify(t)}`, [`GET ${t} HTTP/1.1\r\n${HOST}\r\n`]);
  }
  add('OPTIONS *', [`OPTIONS * HTTP/1.1\r\n${HOST}\r\n`]);
  add('POST * with a body', request('POST', '*', ['content-type: application/json'], '{}'));

  // Long paths and queries, under and over the header limit.
  for (const [name, t] of [
    ['8 KiB path', `/${'a'.repeat(8 * KiB)}`],
    ['15 KiB path', `/${'a'.repeat(15 * KiB)}`],
    ['17 KiB path', `/${'a'.repeat(17 * KiB)}`],
    ['64 KiB path', `/${'a'.repeat(64 * KiB)}`],
    ['1 MiB path', `/${'a'.repeat(MiB)}`],
    ['7000 segments', '/a'.repeat(7000)],
    ['20 KiB of escapes', '/%41'.repeat(5000)],
    ['a 15 KiB parameter', `/v1/agent/check/pass/${'x'.repeat(15 * KiB)}`],
    ['3500 query pairs', `/v1/health?${'a=b&'.repeat(3500)}`],
    ['3000 dot-dot segments', '/..'.repeat(3000)],
  ] as const) add(name, [`GET ${t} HTTP/1.1\r\n${HOST}\r\n`]);

  // Versions, hosts and header syntax the parser may or may not accept.
  for (const [name, bytes] of [
    ['no Host on HTTP/1.1', 'GET /v1/health HTTP/1.1\r\n\r\n'],
    ['two Hosts', `GET /v1/health HTTP/1.1\r\n${HOST}${HOST}\r\n`],
    ['Host of garbage', 'GET /v1/health HTTP/1.1\r\nHost: \u00ff\u0001[]:\r\n\r\n'],
    ['HTTP/1.0', 'GET /v1/health HTTP/1.0\r\n\r\n'],
    ['HTTP/0.9', 'GET /v1/health\r\n\r\n'],
    ['HTTP/9.9', `GET /v1/health HTTP/9.9\r\n${HOST}\r\n`],
    ['lower-case version', `GET /v1/health http/1.1\r\n${HOST}\r\n`],
    ['no version, trailing space', `GET /v1/health \r\n${HOST}\r\n`],
    ['folded header', `GET /v1/health HTTP/1.1\r\n${HOST}x-a: b\r\n  c\r\n\r\n`],
    ['header without a colon', `GET /v1/health HTTP/1.1\r\n${HOST}nocolon\r\n\r\n`],
    ['space before the colon', `GET /v1/health HTTP/1.1\r\n${HOST}x-a : b\r\n\r\n`],
    ['NUL in a header value', `GET /v1/health HTTP/1.1\r\n${HOST}x-a: b\u0000c\r\n\r\n`],
    ['bare LF line ends', 'GET /v1/health HTTP/1.1\nHost: knit-probe\n\n'],
    ['bare CR line ends', 'GET /v1/health HTTP/1.1\rHost: knit-probe\r\r'],
    ['upgrade: websocket', `GET /v1/health HTTP/1.1\r\n${HOST}connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: x\r\nsec-websocket-version: 13\r\n\r\n`],
    ['upgrade: h2c', `GET /v1/health HTTP/1.1\r\n${HOST}connection: upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n`],
    ['a good request, then garbage', `GET /v1/health HTTP/1.1\r\n${HOST}\r\n\u0000\u0001garbage\r\n\r\n`],
    ['50 pipelined requests', `GET /v1/health HTTP/1.1\r\n${HOST}\r\n`.repeat(50)],
    ['pipelined: bad body then good', `POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-length: 5\r\n\r\n{nopeGET /v1/health HTTP/1.1\r\n${HOST}\r\n`],
    ['request smuggling: CL then TE', `POST /v1/intentions/apply HTTP/1.1\r\n${HOST}content-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nX`],
    ['request smuggling: TE with space', `POST /v1/intentions/apply HTTP/1.1\r\n${HOST}transfer-encoding : chunked\r\n\r\n0\r\n\r\n`],
  ] as const) add(name, [bytes]);

  // A partial good request on a slow drip, then EOF.
  add('drip-fed request', ['G', 'E', 'T', ' ', '/', 'v1/health', ' HTTP/1.1\r\n', HOST, '\r\n']);
  return out;
}

/** Probes that only make sense in clear against a TLS port: they test the TLS layer, not HTTP. */
function plainProbes(): Probe[] {
  const rand = prng(0x746c73);
  return [
    { name: 'plain HTTP to a TLS port', chunks: [`GET /v1/health HTTP/1.1\r\n${HOST}\r\n`], plain: true },
    { name: 'garbage before the handshake', chunks: [Buffer.from(Array.from({ length: 512 }, () => Math.floor(rand() * 256)))], plain: true, end: true },
    { name: 'a truncated ClientHello', chunks: [Buffer.from('160301', 'hex')], plain: true, end: true },
    { name: 'a ClientHello of 16 KiB of nothing', chunks: [Buffer.concat([Buffer.from('1603014000', 'hex'), Buffer.alloc(16 * KiB)])], plain: true, end: true },
    { name: 'TLS record of an unknown type', chunks: [Buffer.from('ff0303000501020304ff', 'hex')], plain: true, end: true },
  ];
}

/** The final (non-1xx) status in a response so far, if its status line has arrived. */
function statusIn(got: Buffer): string | undefined {
  let rest = got.toString('latin1');
  for (;;) {
    const m = /^HTTP\/\d(?:\.\d)? (\d{3})[^\r\n]*\r?\n/.exec(rest);
    if (!m) return undefined;
    if (!m[1]!.startsWith('1')) return m[1]!;
    const end = rest.indexOf('\r\n\r\n');
    if (end === -1) return undefined;
    rest = rest.slice(end + 4);
  }
}

function connect(target: ProbeTarget, plain: boolean): net.Socket {
  if (!target.tls || plain) return net.connect(target.port, target.host);
  return tls.connect({ host: target.host, port: target.port, rejectUnauthorized: false, ...(typeof target.tls === 'object' ? target.tls : {}) });
}

/** Sends one probe on a fresh connection; resolves with its outcome, never rejects. */
function runOne(target: ProbeTarget, p: Probe, timeoutMs: number): Promise<string> {
  return new Promise((resolve) => {
    const sock = connect(target, !!p.plain);
    let got = Buffer.alloc(0);
    let done = false;
    const finish = (outcome: string) => {
      if (done) return;
      done = true;
      sock.destroy();
      resolve(outcome);
    };
    sock.setTimeout(timeoutMs, () => finish(statusIn(got) ?? 'timeout'));
    sock.on('data', (d: Buffer) => {
      if (got.length < 64 * KiB) got = Buffer.concat([got, d]);
      const s = statusIn(got);
      if (s) finish(s);
    });
    sock.on('error', (e: NodeJS.ErrnoException) => finish(statusIn(got) ?? (e.code === 'ECONNRESET' || e.code === 'EPIPE' ? 'reset' : `error ${e.code ?? e.message}`)));
    sock.on('close', () => finish(statusIn(got) ?? (got.length ? 'not-http' : 'closed')));
    void (async () => {
      for (const c of p.chunks) {
        if (done) return;
        // Respect backpressure so a 2 MiB body is written as the server reads it, or stops when it hangs up.
        if (!sock.write(c)) await new Promise((r) => { sock.once('drain', r); sock.once('close', r); });
      }
      if (p.end && !done) sock.end();
    })();
  });
}

/**
 * Sends every probe to `target`, each on its own connection with a socket
 * timeout, `concurrency` at a time, and counts what came back. Resolves
 * whatever the answers; it is for the caller to assert the target is still
 * serving (assertServing) and on the statuses it expects.
 */
export async function crashProbe(target: ProbeTarget, opts: ProbeOptions = {}): Promise<ProbeReport> {
  const list = target.tls ? [...probes(), ...plainProbes()] : probes();
  const timeoutMs = opts.timeoutMs ?? 2000;
  const outcomes: Array<{ probe: string; outcome: string }> = new Array(list.length);
  let next = 0;
  const worker = async () => {
    for (let i = next++; i < list.length; i = next++) {
      const p = list[i]!;
      outcomes[i] = { probe: p.name, outcome: await runOne(target, p, timeoutMs) };
    }
  };
  await Promise.all(Array.from({ length: opts.concurrency ?? 8 }, worker));
  const statuses: Record<string, number> = {};
  for (const o of outcomes) statuses[o.outcome] = (statuses[o.outcome] ?? 0) + 1;
  return { sent: list.length, answered: outcomes.filter((o) => /^\d{3}$/.test(o.outcome)).length, statuses, outcomes };
}

/** Asserts that `target` answers a good request (`GET /v1/health` by default) with `status` (default 200). */
export async function assertServing(target: ProbeTarget, opts: { path?: string; status?: number; timeoutMs?: number } = {}): Promise<void> {
  const path = opts.path ?? '/v1/health';
  const outcome = await runOne(target, { name: 'a good request', chunks: [`GET ${path} HTTP/1.1\r\n${HOST}connection: close\r\n\r\n`] }, opts.timeoutMs ?? 5000);
  assert.equal(outcome, String(opts.status ?? 200), `GET ${path} on ${target.host}:${target.port} after the probes`);
}
