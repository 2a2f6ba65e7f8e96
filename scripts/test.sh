#!/usr/bin/env bash
# The test command (`npm test`): type-check, lint, build, then every test file with
# node's test runner. Node 20 does not expand globs itself, hence find.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real parts, not mocks: the ZooKeeper backend is tested against Debian's ZooKeeper.
if [ ! -f /usr/share/java/zookeeper.jar ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing zookeeper (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zookeeper >/dev/null
  else
    echo "npm test needs ZooKeeper: run as root (it installs Debian's zookeeper package) or apt-get install zookeeper" >&2
    exit 1
  fi
fi
# Multi-host tests make hosts out of network namespaces; the unit tests use systemd-analyze;
# transparent mode's redirect is tested with real nftables and iptables (inside namespaces), its
# wire with tcpdump, its unmodified clients run as nobody with setpriv, its DNS also queried with dig.
missing=""
command -v ip >/dev/null || missing="$missing iproute2"
command -v systemd-analyze >/dev/null || missing="$missing systemd"
command -v nft >/dev/null || missing="$missing nftables"
command -v iptables >/dev/null || missing="$missing iptables"
command -v tcpdump >/dev/null || missing="$missing tcpdump"
command -v setpriv >/dev/null || missing="$missing util-linux"
command -v dig >/dev/null || missing="$missing dnsutils"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ]; then
  echo "== installing$missing (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
echo "== typecheck"; npx tsc --noEmit
echo "== lint"; npx eslint .
# The end-to-end tests spawn bin/knit.mjs, which runs dist/ when it is current: build it from these sources.
echo "== build"; npm run --silent build
mapfile -t files < <(find src test -name '*.test.ts' | sort)
echo "== tests (${#files[@]} files)"
exec node --import tsx --test --test-concurrency=2 --test-timeout=900000 "${files[@]}"
