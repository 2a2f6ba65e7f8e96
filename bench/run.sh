#!/usr/bin/env bash
# Data-plane benchmark: knit's mTLS pair against a direct connection and an
# HAProxy mTLS pair, in the same run, reported as ratios. Not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v haproxy >/dev/null || ! command -v wrk >/dev/null; then
  if [ "$(id -u)" != 0 ]; then echo "bench needs haproxy and wrk (apt-get install haproxy wrk)" >&2; exit 1; fi
  apt-get update -qq && apt-get install -y -qq haproxy wrk >/dev/null
fi
exec node --import tsx bench/dataplane.ts "$@"
