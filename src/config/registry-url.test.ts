import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseRegistryUrl, parseZkCredential } from './registry-url.js';

test('registry URLs parse into typed values', () => {
  assert.deepEqual(parseRegistryUrl('embedded:'), { kind: 'embedded' });
  assert.deepEqual(parseRegistryUrl('zk://10.0.0.5:2181,10.0.0.6:2181/knit'), { kind: 'zookeeper', servers: '10.0.0.5:2181,10.0.0.6:2181', root: '/knit', sessionTimeoutMs: 10_000 });
  assert.deepEqual(parseRegistryUrl('zk://zk:2181?session_timeout=2s'), { kind: 'zookeeper', servers: 'zk:2181', root: '/knit', sessionTimeoutMs: 2000 });
  assert.deepEqual(parseRegistryUrl('zk://zk:2181/a/b/'), { kind: 'zookeeper', servers: 'zk:2181', root: '/a/b', sessionTimeoutMs: 10_000 });
  assert.deepEqual(parseRegistryUrl('consul://127.0.0.1:8500?dc=dc1'), { kind: 'consul', address: '127.0.0.1:8500', datacenter: 'dc1' });
});

test('zk URLs name credential files, not secrets', () => {
  assert.deepEqual(parseRegistryUrl('zk://zk:2181/knit?auth=file:/etc/knit/zk.digest'), { kind: 'zookeeper', servers: 'zk:2181', root: '/knit', sessionTimeoutMs: 10_000, authFile: '/etc/knit/zk.digest' });
  assert.deepEqual(parseRegistryUrl('zk://zk:2181/knit?session_timeout=5s&auth=file:///etc/knit/server.digest&agent_auth=file:/etc/knit/agent.digest'), {
    kind: 'zookeeper',
    servers: 'zk:2181',
    root: '/knit',
    sessionTimeoutMs: 5000,
    authFile: '/etc/knit/server.digest',
    agentAuthFile: '/etc/knit/agent.digest',
  });
  assert.deepEqual(parseRegistryUrl('zk://zk:2181/knit?auth=file:/etc/knit/a%20b'), { kind: 'zookeeper', servers: 'zk:2181', root: '/knit', sessionTimeoutMs: 10_000, authFile: '/etc/knit/a b' });
});

test('bad registry URLs name what is wrong', () => {
  assert.throws(() => parseRegistryUrl('etcd://x:1'), /expected embedded:/);
  assert.throws(() => parseRegistryUrl('zk://zk/knit'), /"zk" is not host:port/);
  assert.throws(() => parseRegistryUrl('zk://zk:2181/kn it'), /must be \/segments/);
  assert.throws(() => parseRegistryUrl('zk://zk:2181?session_timeout=1h'), /from 400ms to 60s/);
  assert.throws(() => parseRegistryUrl('zk://zk:2181?foo=1'), /unknown parameter "foo"/);
  for (const v of ['knit:secret', 'file:', 'file:etc/zk.digest', 'file://host/etc/zk.digest', '/etc/zk.digest']) {
    assert.throws(() => parseRegistryUrl(`zk://zk:2181/knit?auth=${v}`), /auth must be file:\/absolute\/path/, v);
  }
  assert.throws(() => parseRegistryUrl('zk://zk:2181/knit?agent_auth=x'), /agent_auth must be file:/);
});

test('credential files hold one line user:password and errors never echo it', () => {
  assert.deepEqual(parseZkCredential('knit-agent:s3cr:et\n', '/f'), { user: 'knit-agent', password: 's3cr:et' });
  assert.deepEqual(parseZkCredential('u:p\r\n', '/f'), { user: 'u', password: 'p' });
  for (const [text, why] of [
    ['', /expected one line user:password/],
    [':nouser', /expected one line user:password/],
    ['nopassword', /expected one line user:password/],
    ['u:\n', /password is empty/],
    ['u:p\nv:q\n', /exactly one line/],
    ['a user:p', /printable ASCII/],
  ] as const) {
    assert.throws(() => parseZkCredential(text, '/etc/knit/zk.digest'), (e: Error) => why.test(e.message) && e.message.includes('/etc/knit/zk.digest') && !(text.length > 3 && e.message.includes(text.trim())), JSON.stringify(text));
  }
});
