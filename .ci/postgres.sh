#!/usr/bin/env bash
# Start or stop a throw-away PostgreSQL server on loopback for the distributed-search tests.
# Usage: .ci/postgres.sh start DIR PORT   (prints the storage URL, postgresql://..., on stdout)
#        .ci/postgres.sh stop DIR
# Installs Debian's postgresql package when no server binaries are present.
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?data dir}; port=${3:-54329}

bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }; done
  return 1
}

if [ "$cmd" = stop ]; then
  bin=$(bindir) || exit 0
  [ -d "$dir/data" ] && runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  exit 0
fi

if ! bin=$(bindir); then
  echo "installing postgresql (Debian package)" >&2
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -q postgresql >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }) >&2
  # The Debian package may start its own cluster on 5432; we use our own on $port.
  bin=$(bindir)
fi
id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
mkdir -p "$dir"
chown postgres "$dir"
runuser -u postgres -- "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
  -o "-h 127.0.0.1 -p $port -k $dir" start >/dev/null
runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres recommender_test
# The documented form (README, docs/distributed.md): recommender maps a bare postgresql:// to the
# installed driver (psycopg2), so the tests exercise what users type.
echo "postgresql://postgres@127.0.0.1:$port/recommender_test"
