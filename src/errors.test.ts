import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ERROR_CODES, KnitError, ConfigError, wrapError, isKnitError, formatProblem, type KnitErrorCode } from './errors.js';

test('every error code builds a KnitError with its code and retry flag', () => {
  for (const [code, { retryable }] of Object.entries(ERROR_CODES)) {
    const e = new KnitError(code as KnitErrorCode, 'x');
    assert.equal(e.code, code);
    assert.equal(e.retryable, retryable);
    assert.ok(e instanceof Error);
    assert.ok(isKnitError(e, code as KnitErrorCode));
  }
  assert.equal(new KnitError('KNIT_ERR_CAS_CONFLICT', 'x').retryable, true);
  assert.equal(new KnitError('KNIT_ERR_DENIED', 'x').retryable, false);
  assert.equal(new KnitError('KNIT_ERR_REGISTRY_DENIED', 'x').retryable, false);
});

test('wrapError keeps the cause and does not double-wrap', () => {
  const cause = new Error('ECONNREFUSED');
  const e = wrapError('KNIT_ERR_REGISTRY_UNAVAILABLE', 'connect zk', cause);
  assert.equal(e.cause, cause);
  assert.match(e.message, /connect zk: ECONNREFUSED/);
  assert.equal(wrapError('KNIT_ERR_CONFIG', 'again', e), e);
});

test('ConfigError lists every problem as file:line: field: message', () => {
  const e = new ConfigError([
    { file: 'a.json', line: 3, field: 'service.port', message: 'must be 1-65535' },
    { file: 'b.yaml', message: 'syntax error' },
  ]);
  assert.equal(e.code, 'KNIT_ERR_CONFIG');
  assert.equal(e.message, 'a.json:3: service.port: must be 1-65535\nb.yaml: syntax error');
  assert.equal(formatProblem({ file: 'c', field: 'f', message: 'm' }), 'c: f: m');
});
