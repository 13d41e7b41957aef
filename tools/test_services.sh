#!/usr/bin/env bash
# What `make test` needs from the system, then the command it is given:
#   tools/test_services.sh CMD ARGS...
# - Chromium (the report is checked in a real headless browser) and PostgreSQL (several sweep
#   workers share one study through it). Where they are missing and this runs as root with
#   apt-get, they are installed quietly, once; otherwise it stops before the command with one
#   sentence naming what to install, and exits 2, so no test fails or is skipped for a missing
#   system package.
# - PostgreSQL is started on loopback (experiments/sweep/start_postgres.sh, which exports
#   INAT_PG_URL) and stopped afterwards if this script started it. An INAT_PG_URL already set
#   (a server of your own) is used as it is and nothing is started.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "make test: $*" >&2; }
fail() { echo "error: $*" >&2; exit 2; }

have_chromium() {
  [ -n "${INAT_CHROMIUM:-}" ] && [ -x "${INAT_CHROMIUM}" ] && return 0
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  return 1
}
have_postgres() { [ -n "${INAT_PG_URL:-}" ] || command -v pg_ctlcluster >/dev/null 2>&1; }
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

missing=()
have_chromium || missing+=(chromium)
have_postgres || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if ! can_apt; then
    fail "the tests need the system packages ${missing[*]}, which are not installed and cannot be installed here (this needs root and apt-get): install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}), or point INAT_CHROMIUM at a Chromium binary and INAT_PG_URL at a PostgreSQL database you can use, then run make test again."
  fi
  say "installing ${missing[*]} with apt-get (once; about a minute)"
  log=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    rm -f "$log"
    fail "apt-get could not install ${missing[*]} (its last lines are above); install them by hand and run make test again."
  fi
  rm -f "$log"
fi

started_pg=""
stop_pg() {
  if [ -n "$started_pg" ]; then
    pg_ctlcluster $started_pg stop >/dev/null 2>&1 || true
  fi
}
if [ -z "${INAT_PG_URL:-}" ]; then
  [ "$(id -u)" = 0 ] || fail "the sweep test needs a PostgreSQL server and only root can start the system one here: run make test as root, or set INAT_PG_URL=postgresql://USER:PASSWORD@HOST:PORT/DB to a database you can use."
  version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  online_before=$(pg_lsclusters -h 2>/dev/null | awk -v v="$version" '$1==v && $2=="main" {print $4}')
  log=$(mktemp)
  if ! urlline=$(bash experiments/sweep/start_postgres.sh 2>"$log"); then
    tail -n 5 "$log" >&2
    rm -f "$log"
    fail "PostgreSQL could not be started on loopback (its last lines are above)."
  fi
  rm -f "$log"
  eval "$urlline"
  [ "$online_before" = online ] || started_pg="$version main"
  trap stop_pg EXIT
  say "PostgreSQL on loopback for the sweep test (${INAT_PG_URL##*@})${started_pg:+; stopped when the tests end}"
fi
export INAT_PG_URL
"$@"
