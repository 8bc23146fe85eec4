#!/usr/bin/env bash
# Start Debian's PostgreSQL on 127.0.0.1 and create the test role and database (idempotent).
# The grid-search tests read EFFNET_TEST_POSTGRES_URL and skip, saying why, when it is unset or refused.
set -euo pipefail
version=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -n 1)
if [ -z "$version" ]; then
  echo "postgres.sh: no PostgreSQL cluster (apt-get install postgresql)" >&2
  exit 1
fi
if ! pg_lsclusters -h | grep -q "^$version main .* online"; then
  pg_ctlcluster "$version" main start -- -o "-c listen_addresses=127.0.0.1" >/dev/null \
    || pg_ctlcluster "$version" main start
fi
psql_() { su postgres -c "psql -q -v ON_ERROR_STOP=1 -d postgres -tAc \"$1\""; }
[ "$(psql_ "SELECT 1 FROM pg_roles WHERE rolname='effnet'")" = 1 ] \
  || psql_ "CREATE ROLE effnet LOGIN PASSWORD 'effnet' CREATEDB"
[ "$(psql_ "SELECT 1 FROM pg_database WHERE datname='effnet_test'")" = 1 ] \
  || psql_ "CREATE DATABASE effnet_test OWNER effnet"
