#!/usr/bin/env bash
# Installs knit on a VM or bare-metal host in one command, as root:
#
#   scripts/install.sh server [--registry zk://h1:2181,h2:2181/knit] [--listen 0.0.0.0:7700] [--advertise cp.example.com]
#   scripts/install.sh agent  --server https://cp:7700 --registry zk://h1:2181/knit --token knit.xxxx [--node NAME]
#
# Lays out: a `knit` system user; the compiled code in /usr/local/lib/knit and
# /usr/local/bin/knit; /etc/knit/{server,agent}.yaml (kept if present);
# /etc/knit/services.d; /etc/knit/join.token (0600); /var/lib/knit (0700);
# the systemd unit, enabled and started when systemd runs.
# KNIT_INSTALL_ROOT=DIR lays everything out under DIR instead of / (no user,
# no systemctl): for packaging and for the tests.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "install.sh: $*" >&2; exit 1; }

role=${1:-}; shift || true
[ "$role" = server ] || [ "$role" = agent ] || usage
registry="" server="" token="" node="" listen="0.0.0.0:7700" advertise=""
while [ $# -gt 0 ]; do
  case "$1" in
    --registry) registry=$2; shift 2 ;;
    --server) server=$2; shift 2 ;;
    --token) token=$2; shift 2 ;;
    --node) node=$2; shift 2 ;;
    --listen) listen=$2; shift 2 ;;
    --advertise) advertise=$2; shift 2 ;;
    -h|--help) usage ;;
    *) die "unknown option $1" ;;
  esac
done

root=${KNIT_INSTALL_ROOT:-}
[ -n "$root" ] || [ "$(id -u)" = 0 ] || die "run as root (or set KNIT_INSTALL_ROOT for a staged install)"
command -v node >/dev/null || die "Node.js 20 or newer is required (apt-get install nodejs, or NodeSource)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' || die "Node.js 20 or newer is required, found $(node --version)"
if [ "$role" = agent ]; then
  [ -n "$server" ] || die "an agent needs --server https://<control plane>:7700"
  [ -n "$registry" ] || die "an agent needs --registry zk://host:2181/knit"
  case "$server" in https://*) ;; *) die "--server must be an https:// URL" ;; esac
fi
[ -n "$registry" ] || registry="embedded:"

src=$(cd "$(dirname "$0")/.." && pwd)
lib="$root/usr/local/lib/knit"
etc="$root/etc/knit"
state="$root/var/lib/knit"
units="$root/etc/systemd/system"

# The code: compiled JavaScript and production dependencies only, so that
# the installed knit runs dist/ with no TypeScript loader. TypeScript is a
# devDependency: build in a scratch copy of the checkout (npm ci installs
# everything and its `prepare` runs `npm run build`), prune the dev
# dependencies, then install bin/, dist/ and node_modules/. The checkout is
# left as it was: no root-owned dist/ or node_modules/ in a user's clone.
# npm ci also compiles the native addon transparent capture needs
# (binding.gyp: node-gyp, so python3, make and a C++ compiler); only its
# build/Release/original_dst.node is installed, not node-gyp's objects.
# The checkout's own build/ is left out of the copy: it may have been built
# for another Node.
# node-gyp builds against the running Node's own headers when they are
# there (official tarballs, NodeSource, Debian's libnode-dev) rather than
# downloading them from nodejs.org: the install then works offline and
# matches the Node that runs knit. An npm config that names one is kept.
if [ -z "${npm_config_nodedir:-}" ] && ! npm config get nodedir 2>/dev/null | grep -q '^/'; then
  nodedir=$(cd "$(dirname "$(readlink -f "$(command -v node)")")/.." && pwd)
  if [ -f "$nodedir/include/node/common.gypi" ]; then export npm_config_nodedir=$nodedir; fi
fi
stage=$(mktemp -d "${TMPDIR:-/tmp}/knit-install.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tar -C "$src" --exclude=node_modules --exclude=.git --exclude=.knit-dev --exclude=dist --exclude=./build -cf - . | tar -C "$stage" --no-same-owner -xf -
if ! (cd "$stage" && npm ci --no-audit --no-fund --loglevel=error && npm prune --omit=dev --no-audit --no-fund --loglevel=error) >"$stage/.install.log" 2>&1; then
  cat "$stage/.install.log" >&2
  die "building knit failed (npm ci, its native addon (needs python3, make, g++) and npm run build, in a copy of $src)"
fi
[ -f "$stage/dist/cli/main.js" ] || die "npm ci did not build dist/ (package.json's prepare script)"
[ -f "$stage/build/Release/original_dst.node" ] || die "npm ci did not build build/Release/original_dst.node (node-gyp, from binding.gyp)"
rm -f "$stage/dist/.tsbuildinfo"
# Swapped in whole, so that a reinstall leaves no file of an older layout behind (src/ before dist/ existed).
mkdir -p "$(dirname "$lib")" "$root/usr/local/bin"
rm -rf "$lib.new" "$lib.old"
mkdir "$lib.new"
tar -C "$stage" -cf - bin dist build/Release/original_dst.node node_modules package.json package-lock.json README.md | tar -C "$lib.new" --no-same-owner -xf -
if [ -e "$lib" ]; then mv "$lib" "$lib.old"; fi
mv "$lib.new" "$lib"
rm -rf "$lib.old"
ln -sfn /usr/local/lib/knit/bin/knit.mjs "$root/usr/local/bin/knit"

if [ -z "$root" ] && ! id knit >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/knit --shell /usr/sbin/nologin --user-group knit
fi
own() { [ -n "$root" ] || chown "$@"; }

install -d -m 0755 "$etc" "$etc/services.d"
install -d -m 0700 "$state"
own knit:knit "$state"

if [ "$role" = server ]; then
  cfg="$etc/server.yaml"
  if [ ! -f "$cfg" ]; then
    {
      echo "# knit server configuration (see README: Running a fleet)"
      echo "data_dir: /var/lib/knit"
      echo "registry: $registry"
      echo "listen: $listen"
      [ -n "$advertise" ] && echo "advertise: [$advertise]"
      echo "default_intention: deny"
    } > "$cfg"
  fi
else
  cfg="$etc/agent.yaml"
  if [ ! -f "$cfg" ]; then
    {
      echo "# knit agent configuration (see README: Running a fleet)"
      [ -n "$node" ] && echo "node: $node"
      echo "data_dir: /var/lib/knit"
      echo "registry: $registry"
      echo "server: $server"
      echo "join_token_file: /etc/knit/join.token"
      echo "services_dir: /etc/knit/services.d"
    } > "$cfg"
  fi
  if [ -n "$token" ]; then
    (umask 077 && printf '%s\n' "$token" > "$etc/join.token")
    own knit:knit "$etc/join.token"
  fi
fi
chmod 0644 "$cfg"

install -d -m 0755 "$units"
install -m 0644 "$src/systemd/knit-$role.service" "$units/knit-$role.service"

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now "knit-$role.service"
  echo "knit $role installed and started: systemctl status knit-$role; journalctl -u knit-$role"
else
  echo "knit $role installed under ${root:-/}; start it with: systemctl daemon-reload && systemctl enable --now knit-$role"
fi
