import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseRegistryUrl } from './registry-url.js';

test('registry URLs parse into typed values', () => {
  assert.deepEqual(parseRegistryUrl('embedded:'), { kind: 'embedded' });
  assert.deepEqual(parseRegistryUrl('zk://10.0.0.5:2181,10.0.0.6:2181/knit'), { kind: 'zookeeper', servers: '10.0.0.5:2181,10.0.0.6:2181', root: '/knit', sessionTimeoutMs: 10_000 });
  assert.deepEqual(parseRegistryUrl('zk://zk:2181?session_timeout=2s'), { kind: 'zookeeper', servers: 'zk:2181', root: '/knit', sessionTimeoutMs: 2000 });
  assert.deepEqual(parseRegistryUrl('zk://zk:2181/a/b/'), { kind: 'zookeeper', servers: 'zk:2181', root: '/a/b', sessionTimeoutMs: 10_000 });
  assert.deepEqual(parseRegistryUrl('consul://127.0.0.1:8500?dc=dc1'), { kind: 'consul', address: '127.0.0.1:8500', datacenter: 'dc1' });
});

test('bad registry URLs name what is wrong', () => {
  assert.throws(() => parseRegistryUrl('etcd://x:1'), /expected embedded:/);
  assert.throws(() => parseRegistryUrl('zk://zk/knit'), /"zk" is not host:port/);
  assert.throws(() => parseRegistryUrl('zk://zk:2181/kn it'), /must be \/segments/);
  assert.throws(() => parseRegistryUrl('zk://zk:2181?session_timeout=1h'), /from 400ms to 60s/);
  assert.throws(() => parseRegistryUrl('zk://zk:2181?foo=1'), /unknown parameter "foo"/);
});
