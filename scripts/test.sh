#!/usr/bin/env bash
# The test command (`npm test`): type-check, lint, then every test file with
# node's test runner. Node 20 does not expand globs itself, hence find.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== typecheck"; npx tsc --noEmit
echo "== lint"; npx eslint .
mapfile -t files < <(find src test -name '*.test.ts' | sort)
echo "== tests (${#files[@]} files)"
exec node --import tsx --test --test-concurrency=2 --test-timeout=180000 "${files[@]}"
