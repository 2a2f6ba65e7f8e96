#!/usr/bin/env bash
# Data-plane benchmark (`npm run bench [-- --quick]`): direct, an HAProxy
# mTLS pair, two `knit agent`s and `knit dev`, side by side in one run,
# reported as ratios (bench/dataplane.ts). Not a test. Installs haproxy and
# wrk when missing (needs root); ZooKeeper is installed by the test helper.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v haproxy >/dev/null || ! command -v wrk >/dev/null; then
  if [ "$(id -u)" != 0 ]; then echo "bench needs haproxy and wrk: run as root, or apt-get install haproxy wrk" >&2; exit 1; fi
  echo "== installing haproxy and wrk (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy wrk >/dev/null
fi
command -v taskset >/dev/null || { echo "bench needs taskset (util-linux) to pin processes to CPUs" >&2; exit 1; }
exec node --import tsx bench/dataplane.ts "$@"
