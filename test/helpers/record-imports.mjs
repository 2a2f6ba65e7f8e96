/**
 * Records every ES module a process loads, for tests that check what a
 * command pulls in (test/lazy-load.test.ts):
 *
 *   KNIT_RECORD_IMPORTS=/tmp/out node --import ./test/helpers/record-imports.mjs bin/knit.mjs agent ...
 *
 * appends one resolved URL per line to $KNIT_RECORD_IMPORTS. Run with
 * `--import`, this file registers itself (module.register) as a loader hook;
 * in the hooks thread it is the hook. Its `load` hook sees every module of
 * the import graph (ours, and the entry file of each package) but not the
 * require() calls inside CommonJS packages, which do not pass through hooks
 * on Node 20; for what knit's own code imports that is exact.
 */
import { register } from 'node:module';
import { isMainThread } from 'node:worker_threads';
import { appendFileSync } from 'node:fs';

let out;

/** Hooks thread: where to write, passed by register() below. */
export function initialize(data) {
  out = data.file;
}

/** Records the module, then loads it as the rest of the chain would (tsx's hooks, if any, come after). */
export async function load(url, context, nextLoad) {
  const r = await nextLoad(url, context);
  if (out) appendFileSync(out, `${url}\n`);
  return r;
}

if (isMainThread && process.env.KNIT_RECORD_IMPORTS) {
  register(import.meta.url, { data: { file: process.env.KNIT_RECORD_IMPORTS } });
}
