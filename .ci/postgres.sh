#!/usr/bin/env bash
# Installs (Debian's package) and starts a throw-away PostgreSQL on 127.0.0.1 for the team-mode tests.
# Prints the SQLAlchemy URL on its last line. Idempotent: reuses a running cluster.
set -euo pipefail
PORT="${EDITOPS_PG_PORT:-55432}"
DATA="${EDITOPS_PG_DATA:-/tmp/editops-pg}"
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL is not installed and this user cannot apt-get install it" >&2; exit 1
  fi
fi
BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)")
RUNAS=""; [ "$(id -u)" = 0 ] && RUNAS="runuser -u postgres --"
if ! $RUNAS "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  rm -rf "$DATA"; mkdir -p "$DATA"; [ -n "$RUNAS" ] && chown postgres "$DATA"
  $RUNAS "$BIN/initdb" -D "$DATA" -U postgres --auth=trust >/dev/null
  $RUNAS "$BIN/pg_ctl" -D "$DATA" -o "-p $PORT -k /tmp -c listen_addresses=127.0.0.1" -l "$DATA/log" -w start >/dev/null
fi
for db in editops_test; do
  $RUNAS "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 \
    || $RUNAS "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$db"
done
echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT/editops_test"
