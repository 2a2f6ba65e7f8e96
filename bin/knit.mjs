#!/usr/bin/env -S node --max-semi-space-size=4
// The `knit` binary. It runs the compiled CLI in dist/ (made by `npm run
// build`, which `npm ci` runs as `prepare`) when dist/ is at least as new as
// the sources it was built from. Otherwise (a checkout whose src/ changed
// since the last build) it runs src/ through tsx, silently: the dev loop
// needs no build step, and a stale dist/ is never run. An installed knit
// (scripts/install.sh) has dist/ and no src/, and no TypeScript loader: tsx
// is a devDependency, and costs some 30 MB and a few hundred ms per process.
//
// Memory (the first line: `env -S` passes node a flag; `node bin/knit.mjs`
// does without it): V8's young generation may grow to 4 MB per semi-space,
// not Node 20's 16. An agent allocates a few KB per proxied request, nearly
// all of it short-lived: with 16 MB semi-spaces the heap kept ~25 MB more
// resident under load for no throughput (npm run bench: 100 against 75 MB
// per agent after 64 busy connections). Smaller still (2 MB) costs new
// connections: objects of connections still open at a scavenge are copied
// and promoted (GC took ~80 us of CPU per new connection, against ~22 us
// for the same traffic through plain node:http2 with 16 MB), and knit
// carried 2.84x HAProxy's new connections/s with 2 MB, 3.28x with 4 MB.
// Source maps are off for the same reason (~3.5 MB for dist/'s maps): stack
// traces name dist/*.js lines, which tsc keeps close to src/; run with
// NODE_OPTIONS=--enable-source-maps to have src/*.ts lines instead.
import { readdirSync, statSync } from 'node:fs';

const root = new URL('../', import.meta.url);
const compiled = new URL('dist/cli/main.js', root);

/** mtime in ms, or undefined when the path does not exist. */
function mtime(url) {
  try {
    return statSync(url).mtimeMs;
  } catch {
    return undefined;
  }
}

/**
 * The newest mtime among what the build compiles: every file under src/
 * except the tests and the contract suite (tsconfig.build.json's exclude:
 * keep them in step), every directory (deleting or renaming a file changes
 * its directory's mtime), and the two tsconfig files. About 120 stat calls:
 * some 2 ms, against ~300 ms and ~30 MB for starting through tsx.
 */
function newestSource() {
  const src = new URL('src/', root);
  let newest = Math.max(mtime(new URL('tsconfig.json', root)) ?? 0, mtime(new URL('tsconfig.build.json', root)) ?? 0, statSync(src).mtimeMs);
  for (const e of readdirSync(src, { recursive: true, withFileTypes: true })) {
    if (e.isFile() && (e.name.endsWith('.test.ts') || e.name === 'contract-suite.ts')) continue;
    // Gone since readdir (an editor's temporary file): something is changing, so count it as new.
    const t = mtime(`${e.parentPath}/${e.name}`) ?? Infinity;
    if (t > newest) newest = t;
  }
  return newest;
}

/** Whether dist/ holds the current code: built, and not older than any source (no src/: an installed copy). */
function distIsCurrent() {
  // dist/.built's mtime is when its build started (package.json's build script): a source saved during the build counts as newer.
  const built = mtime(new URL('dist/.built', root));
  if (built === undefined || mtime(compiled) === undefined) return false;
  if (mtime(new URL('src/', root)) === undefined) return true;
  return newestSource() <= built;
}

if (distIsCurrent()) {
  await import(compiled.href);
} else if (mtime(new URL('src/', root)) === undefined) {
  console.error(`knit: ${compiled.pathname} is missing and there are no sources to run instead; reinstall knit (scripts/install.sh)`);
  process.exit(1);
} else {
  let register;
  try {
    ({ register } = await import('tsx/esm/api'));
  } catch {
    console.error('knit: dist/ is missing or older than src/, and tsx (a devDependency) is not installed: run npm ci, or npm run build');
    process.exit(1);
  }
  register();
  await import(new URL('src/cli/main.ts', root).href);
}
