#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the shared-study test (Debian/Ubuntu, as
# root: the server itself runs as the `postgres` user), create role and database `inat`, and
# print the line to export. Idempotent: a running cluster, role or database is reused.
#   eval "$(experiments/sweep/start_postgres.sh)"   # sets INAT_PG_URL
# Set INSTALL=1 to apt-get install the `postgresql` package when it is missing.
set -euo pipefail
PORT=${PGPORT:-5432}
NAME=${PG_NAME:-inat}      # role, password and database
log() { echo "$*" >&2; }

if ! command -v pg_ctlcluster >/dev/null; then
  if [ "${INSTALL:-0}" = 1 ]; then
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
  else
    log "PostgreSQL is not installed: apt-get install postgresql (or run with INSTALL=1)"; exit 1
  fi
fi
VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VERSION main"; then
  pg_createcluster "$VERSION" main --port "$PORT" >&2
fi
PORT=$(pg_lsclusters -h | awk -v v="$VERSION" '$1==v && $2=="main" {print $3}')
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1==v && $2=="main" {print $4}' | grep -q online; then
  pg_ctlcluster "$VERSION" main start >&2
fi
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p "$PORT" && break; sleep 1; done
pg_isready -h 127.0.0.1 -p "$PORT" >&2

as_postgres() { runuser -u postgres -- "$@"; }
as_postgres psql -q -p "$PORT" -v ON_ERROR_STOP=1 -c \
  "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$NAME') THEN
     CREATE ROLE $NAME LOGIN PASSWORD '$NAME'; END IF; END \$\$;" >&2
if ! as_postgres psql -p "$PORT" -tAc "SELECT 1 FROM pg_database WHERE datname = '$NAME'" | grep -q 1; then
  as_postgres createdb -p "$PORT" -O "$NAME" "$NAME" >&2
fi
echo "export INAT_PG_URL=postgresql://$NAME:$NAME@127.0.0.1:$PORT/$NAME"
