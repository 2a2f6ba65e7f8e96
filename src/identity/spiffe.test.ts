import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseSpiffeId, serviceId, agentId, trustDomainId, serviceNameOf } from './spiffe.js';
import { isKnitError } from '../errors.js';

test('parses service, agent and trust-domain IDs', () => {
  const s = parseSpiffeId('spiffe://abc.knit/ns/default/svc/web');
  assert.equal(s.trustDomain, 'abc.knit');
  assert.deepEqual(s.what, { kind: 'service', namespace: 'default', service: 'web' });
  assert.equal(serviceNameOf(s), 'web');
  assert.deepEqual(parseSpiffeId('spiffe://abc.knit/agent/node-1').what, { kind: 'agent', node: 'node-1' });
  assert.equal(parseSpiffeId('spiffe://abc.knit').path, '');
  assert.deepEqual(parseSpiffeId('spiffe://abc.knit/x/y').what, { kind: 'other' });
  assert.equal(serviceId('td.knit', 'api').uri, 'spiffe://td.knit/ns/default/svc/api');
  assert.equal(agentId('td.knit', 'n1').uri, 'spiffe://td.knit/agent/n1');
  assert.equal(trustDomainId('td.knit').uri, 'spiffe://td.knit');
});

const invalid: Array<[string, RegExp]> = [
  ['http://abc/ns/a/svc/b', /must start with "spiffe:\/\/"/],
  ['SPIFFE://abc/ns/a', /must start with/],
  ['spiffe://', /trust domain is empty/],
  ['spiffe:///ns/a', /trust domain is empty/],
  ['spiffe://ABC/ns', /lowercase/],
  ['spiffe://abc:8080/ns', /port/],
  ['spiffe://user@abc/ns', /userinfo/],
  ['spiffe://abc/ns/', /must not end with/],
  ['spiffe://abc//ns', /empty/],
  ['spiffe://abc/ns/./x', /"\." or "\.\."/],
  ['spiffe://abc/ns/../x', /"\." or "\.\."/],
  ['spiffe://abc/ns%2Fx', /percent/],
  ['spiffe://abc/ns?x=1', /query/],
  ['spiffe://abc/ns#f', /fragment/],
  ['spiffe://abc/n s', /may only contain/],
  ['spiffe://' + 'a'.repeat(256), /255 bytes/],
  ['spiffe://abc/' + 'a/'.repeat(1100) + 'a', /2048 bytes/],
];

for (const [input, why] of invalid) {
  test(`rejects ${input.slice(0, 40)}`, () => {
    assert.throws(() => parseSpiffeId(input), (e: unknown) => isKnitError(e, 'KNIT_ERR_SPIFFE_ID') && why.test(e.message));
  });
}

test('service names are validated as path segments', () => {
  assert.throws(() => serviceId('td', 'we/b'), /service name/);
  assert.throws(() => agentId('td', ''), /node name is empty/);
});
