#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for CI and local tests of the PostgreSQL store backend.
#
#   .ci/start-postgres.sh DIR PORT    initdb into DIR (once), start the server on 127.0.0.1:PORT,
#                                     wait until it accepts connections, print its URL on stdout
#   .ci/start-postgres.sh stop DIR    stop the server running from DIR
#
# Typical use:
#   export TAILMON_TEST_POSTGRES_URL=$(.ci/start-postgres.sh /tmp/tailmon-pg 55432)
#   TAILMON_REQUIRE_POSTGRES=1 .venv/bin/python -m pytest -q tests/store
#   .ci/start-postgres.sh stop /tmp/tailmon-pg
#
# Only the URL goes to stdout (so $(...) captures it); progress and errors go to stderr.
# PGBIN overrides where initdb/pg_ctl are looked for.
set -euo pipefail

die() { echo "start-postgres: $*" >&2; exit 1; }

find_bin() {
  if [[ -n "${PGBIN:-}" ]]; then
    [[ -x "$PGBIN/pg_ctl" ]] || die "PGBIN=$PGBIN has no pg_ctl"
    echo "$PGBIN"; return
  fi
  # Newest installed major version first; Debian keeps the server binaries off PATH.
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] && { echo "$dir"; return; }
  done
  return 1
}

# initdb refuses to run as root, and the data directory must belong to the server's user:
# as root, everything runs as the `postgres` account that Debian's package creates.
as_pg() {
  if [[ $EUID -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

install_postgres() {
  command -v apt-get >/dev/null || die "no PostgreSQL binaries found and no apt-get to install them"
  [[ $EUID -eq 0 ]] || die "no PostgreSQL binaries found; installing them needs root"
  echo "start-postgres: installing Debian's postgresql package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
}

if [[ "${1:-}" == "stop" ]]; then
  [[ $# -eq 2 ]] || die "usage: $0 stop DIR"
  dir=$(realpath -m "$2")
  bin=$(find_bin) || die "no PostgreSQL binaries found"
  [[ -f "$dir/PG_VERSION" ]] || die "$dir is not a PostgreSQL data directory"
  as_pg "$bin/pg_ctl" -D "$dir" -m fast -w stop >&2
  exit 0
fi

[[ $# -eq 2 ]] || die "usage: $0 DIR PORT | $0 stop DIR"
dir=$(realpath -m "$1")
port=$2
[[ "$port" =~ ^[0-9]+$ && $port -ge 1024 && $port -le 65535 ]] || die "PORT must be a number in 1024..65535, got '$port'"

bin=$(find_bin) || { install_postgres; bin=$(find_bin) || die "postgresql installed but no initdb found"; }

mkdir -p "$dir"
if [[ $EUID -eq 0 ]]; then
  chown postgres: "$dir"
  # The server runs as postgres: every parent directory must let it through.
  as_pg test -w "$dir" || die "user postgres cannot write to $dir (is a parent directory private?)"
fi

if [[ ! -f "$dir/PG_VERSION" ]]; then
  # Trust authentication is acceptable only because the server listens on loopback alone and the
  # cluster holds nothing but test databases.
  log=$(mktemp)
  as_pg "$bin/initdb" -D "$dir" -U postgres --auth-local=trust --auth-host=trust \
    --encoding=UTF8 --locale=C.UTF-8 >"$log" 2>&1 \
    || { cat "$log" >&2; rm -f "$log"; die "initdb failed (log above)"; }
  rm -f "$log"
fi

url="postgresql://postgres@127.0.0.1:$port/postgres"
if as_pg "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
  echo "start-postgres: already running from $dir" >&2
  echo "$url"
  exit 0
fi

# listen_addresses: loopback only. unix_socket_directories='': no socket file to collide with a
# system cluster (tests connect over TCP). fsync and friends off: the data is disposable, and the
# tests create and drop a database per test, which is slow with durable writes.
opts="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='' \
-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -o "$opts" -w -t 60 start >&2 \
  || { tail -n 20 "$dir/server.log" >&2 || true; die "the server did not start (log above)"; }

# pg_ctl -w returns once the postmaster says it is ready; check that TCP connections work too.
for _ in $(seq 1 60); do
  if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres; then
    echo "$url"
    exit 0
  fi
  sleep 0.5
done
die "the server started but does not accept connections on 127.0.0.1:$port (see $dir/server.log)"
