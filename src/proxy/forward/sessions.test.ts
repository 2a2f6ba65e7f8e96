import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SessionCache } from './sessions.js';

const proof = { peer: 'spiffe://t/ns/default/svc/api', notAfter: 10_000 };

test('a take is a snapshot: later forget/clear do not change what a dial resumes with', () => {
  const c = new SessionCache(() => 0);
  c.put('e:1', 0, Buffer.from('t1'), proof);
  const taken = c.take('e:1');
  c.forget('e:1');
  c.clear();
  assert.equal(taken.resume?.ticket.toString(), 't1');
  assert.equal(taken.resume?.peer, proof.peer);
  assert.equal(c.size, 0);
});

test('a ticket from a dial begun before a renewal is not stored', () => {
  const c = new SessionCache(() => 0);
  const { generation } = c.take('e:1');
  c.clear();
  c.put('e:1', generation, Buffer.from('old'), proof);
  assert.equal(c.has('e:1'), false);
  c.put('e:1', c.take('e:1').generation, Buffer.from('new'), proof);
  assert.equal(c.take('e:1').resume?.ticket.toString(), 'new');
});

test('tickets past the proven leaf expiry are not offered; retain drops departed endpoints', () => {
  let now = 0;
  const c = new SessionCache(() => now);
  c.put('a:1', 0, Buffer.from('a'), proof);
  c.put('b:1', 0, Buffer.from('b'), proof);
  c.retain(new Set(['a:1']));
  assert.equal(c.has('b:1'), false);
  now = 10_000;
  assert.equal(c.take('a:1').resume, undefined);
  assert.equal(c.size, 0);
});
