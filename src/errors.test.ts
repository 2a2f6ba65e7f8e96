import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { ERROR_CODES, KnitError, ConfigError, wrapError, isKnitError, formatProblem, type KnitErrorCode } from './errors.js';
import { statusOf } from './api/router.js';
import { ROOT } from '../test/helpers/knit.js';

/**
 * What each code means to someone who meets it, written down here apart from
 * ERROR_CODES so that the table is checked against a second opinion, not
 * against itself: whether retrying the same call may help (a client's retry
 * loop, `knit` commands that wait) and the HTTP status an API caller sees
 * (src/api/router.ts). A new code fails the first test until it is added
 * here with both decided.
 */
const EXPECTED: Record<string, { retryable: boolean; status: number; why: string; todo?: string }> = {
  KNIT_ERR_CONFIG: { retryable: false, status: 400, why: 'the file stays wrong until someone edits it' },
  KNIT_ERR_SPIFFE_ID: { retryable: false, status: 400, why: 'a malformed ID stays malformed' },
  KNIT_ERR_CERT: { retryable: false, status: 400, why: 'the same certificate or CSR fails the same check' },
  KNIT_ERR_CA: { retryable: false, status: 400, why: 'the CA refuses the same request again' },
  KNIT_ERR_SIGNATURE: { retryable: false, status: 502, why: 'a forged or stale document does not become signed; the registry (upstream) holds it' },
  KNIT_ERR_CAS_CONFLICT: { retryable: true, status: 409, why: 're-read and write again: the other writer is done' },
  KNIT_ERR_SERVER_UNAVAILABLE: { retryable: true, status: 503, why: 'the control plane may be back' },
  KNIT_ERR_REGISTRY_UNAVAILABLE: { retryable: true, status: 503, why: 'the registry may be back' },
  KNIT_ERR_REGISTRY_DENIED: { retryable: false, status: 502, why: 'the same credential is refused again; the fault is between knit and its registry' },
  KNIT_ERR_NOT_FOUND: { retryable: false, status: 404, why: 'it does not exist' },
  KNIT_ERR_DENIED: { retryable: false, status: 403, why: 'the intention denies it until someone changes it' },
  KNIT_ERR_NO_ENDPOINT: { retryable: true, status: 503, why: 'an instance may become healthy' },
  KNIT_ERR_TIMEOUT: { retryable: true, status: 504, why: 'the next attempt may be faster' },
  KNIT_ERR_BAD_REQUEST: { retryable: false, status: 400, why: 'the same request is as malformed' },
  KNIT_ERR_UNAUTHORIZED: { retryable: false, status: 403, why: 'the same credential is refused again' },
  KNIT_ERR_LISTEN: { retryable: false, status: 500, why: 'a startup failure (the port is taken): it never reaches a caller of the API' },
  KNIT_ERR_CLOSED: {
    retryable: false,
    status: 503,
    why: 'this object is gone, but a request that meets a process shutting down may go elsewhere',
  },
};

test('every error code has a retry flag and an HTTP status that match what it means', () => {
  assert.deepEqual(Object.keys(ERROR_CODES).sort(), Object.keys(EXPECTED).sort(), 'ERROR_CODES and this test list the same codes');
  for (const [code, want] of Object.entries(EXPECTED)) {
    const e = new KnitError(code as KnitErrorCode, 'x');
    assert.equal(e.code, code);
    assert.equal(e.retryable, want.retryable, `${code} retryable: ${want.why}`);
    if (!want.todo) assert.equal(statusOf(e), want.status, `${code} answers HTTP ${want.status}: ${want.why}`);
    assert.ok(e instanceof Error);
    assert.ok(isKnitError(e, code as KnitErrorCode));
    assert.ok(!isKnitError(e, code === 'KNIT_ERR_CONFIG' ? 'KNIT_ERR_CERT' : 'KNIT_ERR_CONFIG'));
  }
  // Wrapping keeps the meaning: a wrapped socket error is as retryable as its code says.
  assert.equal(wrapError('KNIT_ERR_TIMEOUT', 'dial', new Error('ETIMEDOUT')).retryable, true);
  assert.equal(statusOf(new Error('a bug')), 500, 'anything not a KnitError is a 500');
});

for (const [code, want] of Object.entries(EXPECTED).filter(([, w]) => w.todo)) {
  test(`${code} answers HTTP ${want.status}: ${want.why}`, { todo: want.todo }, () => {
    assert.equal(statusOf(new KnitError(code as KnitErrorCode, 'x')), want.status);
  });
}

/** Every .ts file under src/ that is not a test, with its text. */
async function sources(): Promise<Array<{ file: string; text: string }>> {
  const out: Array<{ file: string; text: string }> = [];
  const walk = async (dir: string): Promise<void> => {
    for (const d of await readdir(dir, { withFileTypes: true })) {
      const p = join(dir, d.name);
      if (d.isDirectory()) await walk(p);
      else if (d.name.endsWith('.ts') && !d.name.endsWith('.test.ts') && d.name !== 'contract-suite.ts') out.push({ file: relative(ROOT, p), text: await readFile(p, 'utf8') });
    }
  };
  await walk(join(ROOT, 'src'));
  return out;
}

test('every error code is raised somewhere in knit, or at least answered with its own HTTP status', async () => {
  const files = await sources();
  const unused: string[] = [];
  for (const code of Object.keys(ERROR_CODES)) {
    // Raised (new KnitError, wrapError, a typed status) anywhere but in the two tables themselves.
    const raisedIn = files.filter((f) => f.file !== join('src', 'errors.ts') && f.text.replace(/const STATUS[\s\S]*?\n};/, '').includes(`'${code}'`));
    if (raisedIn.length) continue;
    if (statusOf(new KnitError(code as KnitErrorCode, 'x')) !== 500) continue;
    unused.push(code);
  }
  assert.deepEqual(unused, [], 'codes nothing raises and the API does not map: remove them, or use them');
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
