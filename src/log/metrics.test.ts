import { test } from 'node:test';
import assert from 'node:assert/strict';
import { collectDefaultMetrics, register as globalRegistry, Registry } from 'prom-client';
import { Metrics, DEFAULT_BUCKETS } from './metrics.js';

/** Every line of an exposition that is not a comment or blank: `name{labels} value`. */
const SAMPLE = /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+|\+Inf|-Inf|Nan)$/;

test('render() is what prom-client renders (await registry.metrics()), synchronously', async () => {
  const m = new Metrics({ processMetrics: false });
  m.inc('knit_a_total', 'A counter', { service: 'api', reason: 'quote " backslash \\ newline \n end' });
  m.inc('knit_a_total', 'A counter', { service: 'web', reason: 'x' }, 3);
  m.inc('knit_plain_total', 'No labels');
  m.set('knit_open', 'A gauge\nwith a newline in its help', { side: 'client' }, 7);
  m.set('knit_open', 'A gauge', { side: 'server' }, 0.5);
  m.observe('knit_handshake_seconds', 'A histogram', { peer: 'b' }, 0.003);
  m.observe('knit_handshake_seconds', 'A histogram', { peer: 'b' }, 0.2);
  m.observe('knit_handshake_seconds', 'A histogram', { peer: 'c' }, 60);
  m.observe('knit_unlabelled_seconds', 'A histogram without labels', {}, 1, [0.5, 1, 2]);
  const text = m.render();
  assert.equal(typeof text, 'string');
  assert.equal(text, await m.registry.metrics());
  for (const line of text.split('\n').filter((l) => l && !l.startsWith('#'))) assert.match(line, SAMPLE);
});

test('labels are listed alphabetically whatever order the call site writes them in (the fleet test greps that order)', () => {
  const m = new Metrics({ processMetrics: false });
  m.inc('knit_inbound_connections_total', 'Decisions', { service: 'api', source: 'web', decision: 'allow', rule: 'intention web -> api (allow)' });
  assert.match(m.render(), /knit_inbound_connections_total\{decision="allow",rule="intention web -> api \(allow\)",service="api",source="web"\} 1/);
  assert.equal(m.get('knit_inbound_connections_total', { rule: 'intention web -> api (allow)', decision: 'allow', source: 'web', service: 'api' }), 1);
});

test('a family keeps the label names of its first use: missing labels are empty, extra ones dropped, nothing throws', () => {
  const m = new Metrics({ processMetrics: false });
  m.inc('knit_x_total', 'X', { service: 'api', reason: 'tls' });
  m.inc('knit_x_total', 'X', { service: 'api' });
  m.inc('knit_x_total', 'X', { service: 'api', reason: 'tls', extra: 'dropped' });
  assert.equal(m.get('knit_x_total', { service: 'api', reason: 'tls' }), 2);
  assert.equal(m.get('knit_x_total', { service: 'api' }), 1);
  assert.equal(m.get('knit_x_total', { service: 'api', reason: '' }), 1);
  assert.match(m.render(), /^knit_x_total\{reason="",service="api"\} 1$/m);
  assert.doesNotMatch(m.render(), /extra/);
  m.set('knit_g', 'G', {}, 1);
  m.set('knit_g', 'G', { later: 'x' }, 2);
  assert.equal(m.get('knit_g'), 2);
});

test('get(): counters, gauges, histogram counts; 0 for what was never counted', () => {
  const m = new Metrics({ processMetrics: false });
  assert.equal(m.get('knit_never_total'), 0);
  m.inc('knit_c_total', 'C', { a: '1' }, 2);
  m.inc('knit_c_total', 'C', { a: '1' });
  m.inc('knit_c_total', 'C', { a: '1' }, 0);
  assert.equal(m.get('knit_c_total', { a: '1' }), 3);
  assert.equal(m.get('knit_c_total', { a: '2' }), 0);
  m.set('knit_g', 'G', { a: '1' }, 5);
  m.set('knit_g', 'G', { a: '1' }, 4);
  assert.equal(m.get('knit_g', { a: '1' }), 4);
  m.observe('knit_h_seconds', 'H', { a: '1' }, 0.1);
  m.observe('knit_h_seconds', 'H', { a: '1' }, 0.3);
  assert.equal(m.get('knit_h_seconds', { a: '1' }), 2);
});

test('observe(): cumulative buckets, +Inf, sum and count; buckets fixed at first use', () => {
  const m = new Metrics({ processMetrics: false });
  for (const v of [0.004, 0.02, 0.02, 3, 11]) m.observe('knit_hs_seconds', 'Handshakes', { side: 'client' }, v);
  const text = m.render();
  const bucket = (le: string) => Number(new RegExp(`^knit_hs_seconds_bucket\\{le="${le.replace('+', '\\+')}",side="client"\\} (\\S+)$`, 'm').exec(text)?.[1]);
  assert.equal(bucket('0.005'), 1);
  assert.equal(bucket('0.025'), 3);
  assert.equal(bucket('2.5'), 3);
  assert.equal(bucket('5'), 4);
  assert.equal(bucket('10'), 4);
  assert.equal(bucket('+Inf'), 5);
  assert.match(text, /^knit_hs_seconds_count\{side="client"\} 5$/m);
  assert.match(text, /^knit_hs_seconds_sum\{side="client"\} 14\.04/m);
  assert.equal(text.match(/^knit_hs_seconds_bucket\{/gm)?.length, DEFAULT_BUCKETS.length + 1);

  m.observe('knit_custom_seconds', 'Custom', {}, 0.7, [0.5, 1]);
  m.observe('knit_custom_seconds', 'Custom', {}, 0.7, [0.1, 0.2, 0.3]);
  assert.deepEqual(m.render().match(/^knit_custom_seconds_bucket\{le="[^"]+"\} \d+$/gm), ['knit_custom_seconds_bucket{le="0.5"} 0', 'knit_custom_seconds_bucket{le="1"} 2', 'knit_custom_seconds_bucket{le="+Inf"} 2']);
});

test('one name used as two kinds is a programming error', () => {
  const m = new Metrics({ processMetrics: false });
  m.inc('knit_dual', 'D');
  assert.throws(() => m.set('knit_dual', 'D', {}, 1), TypeError);
  assert.throws(() => m.observe('knit_dual', 'D', {}, 1), TypeError);
});

test('each instance has its own registry; prom-client\'s global one stays empty (no module-level state)', () => {
  const a = new Metrics();
  const b = new Metrics();
  a.inc('knit_only_a_total', 'A');
  assert.equal(a.get('knit_only_a_total'), 1);
  assert.equal(b.get('knit_only_a_total'), 0);
  assert.doesNotMatch(b.render(), /knit_only_a_total/);
  assert.equal(globalRegistry.getMetricsAsArray().length, 0);
});

test('process metrics by default: resident memory, CPU, event-loop lag, GC, in a text every line of which parses', async () => {
  const m = new Metrics();
  m.inc('knit_y_total', 'Y', { a: 'b' });
  const text = m.render();
  const value = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1]);
  assert.ok(value('process_resident_memory_bytes') > 10_000_000, 'RSS in bytes');
  // prom-client counts CPU from when the collector was made: right after, it may still be 0 (the kernel's tick).
  assert.ok(value('process_cpu_user_seconds_total') >= 0, 'CPU seconds are a number');
  assert.ok(value('nodejs_eventloop_lag_p99_seconds') >= 0);
  assert.match(text, /^# TYPE nodejs_gc_duration_seconds histogram$/m);
  assert.match(text, /^nodejs_version_info\{/m);
  assert.match(text, /^knit_y_total\{a="b"\} 1$/m);
  for (const line of text.split('\n').filter((l) => l && !l.startsWith('#'))) assert.match(line, SAMPLE);
  // Same families and series as prom-client's own (async) rendering; values move between the two calls,
  // and a garbage collection between them may add a GC-kind series, so those are left out.
  const shape = (t: string) => t.split('\n').filter((l) => !/^nodejs_gc_duration_seconds/.test(l)).map((l) => l.replace(/ \S+$/, ''));
  assert.deepEqual(shape(m.render()), shape(await m.registry.metrics()));
  assert.equal(m.contentType, 'text/plain; version=0.0.4; charset=utf-8');
});

test('the process metrics are the families collectDefaultMetrics registers; process CPU counts what was spent', async () => {
  const theirs = new Registry();
  collectDefaultMetrics({ register: theirs });
  const names = (r: { getMetricsAsArray(): Array<{ name: string }> }) => r.getMetricsAsArray().map((x) => x.name).sort();
  const m = new Metrics();
  assert.deepEqual(names(m.registry), names(theirs));
  const valueIn = (text: string, name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1]);
  m.render();
  const t0 = process.cpuUsage();
  for (const end = Date.now() + 120; Date.now() < end; ) Math.sqrt(Math.random());
  const spent = process.cpuUsage(t0);
  const text = m.render();
  const [user, system, total] = ['user_', 'system_', ''].map((k) => valueIn(text, `process_cpu_${k}seconds_total`));
  assert.ok(Math.abs(total! - (user! + system!)) < 1e-9, `total ${total} = user ${user} + system ${system}`);
  assert.ok(total! >= (spent.user + spent.system) / 1e6 - 0.02, `counted ${total} s of CPU, at least the ${(spent.user + spent.system) / 1e6} s spent`);
  assert.ok(valueIn(m.render(), 'process_cpu_seconds_total') >= total!, 'a counter never goes down');
});

test('counters add up across scrapes; label sets never merge, whatever their values hold; a bad increment throws', async () => {
  const m = new Metrics({ processMetrics: false });
  const a = { service: 'a', reason: 'x:y' };
  const b = { service: 'a:x', reason: 'y' };
  for (let i = 0; i < 1000; i++) m.inc('knit_n_total', 'N', i % 2 ? a : b, 2);
  assert.match(await m.registry.metrics(), /^knit_n_total\{reason="x:y",service="a"\} 1000$/m);
  m.inc('knit_n_total', 'N', a, 0.5);
  m.inc('knit_n_total', 'N', { service: '1:a', reason: '' });
  assert.match(m.render(), /^knit_n_total\{reason="x:y",service="a"\} 1000\.5$/m);
  assert.match(m.render(), /^knit_n_total\{reason="y",service="a:x"\} 1000$/m);
  assert.equal(m.get('knit_n_total', { service: '1:a' }), 1);
  assert.equal(m.get('knit_n_total', b), 1000);
  for (const bad of [-1, NaN, Infinity]) assert.throws(() => m.inc('knit_n_total', 'N', a, bad), RangeError);
  assert.equal(m.get('knit_n_total', a), 1000.5, 'a refused increment changes nothing');
});
