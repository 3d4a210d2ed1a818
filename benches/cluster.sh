#!/usr/bin/env bash
# Cluster-mode benchmark: ingest with delivery on the PostgreSQL backend, one node and then
# two, against a PostgreSQL server on this machine (started here in a temp dir, default
# settings apart from max_connections = 200: fsync and synchronous_commit on), a fresh
# database per run. Each run is the
# delivery bench's throughput mode (64 connections, ~1 KiB events, closed loop, a real
# receiver in the bench process), which also measures a bare hyper server with a reqwest
# client in the same process, as the reference to quote ratios against.
#
#   bash benches/cluster.sh [SECONDS] [DESTINATIONS] [WORKERS]
#                               # default 10 s per run, 1 destination, workers one per CPU
#
# With DESTINATIONS > 1 the events are spread over that many subscriptions (one event type
# each), whose leases spread over the nodes: every node then delivers, and every node's
# publishes make work for destinations another node holds.
#
# WORKERS sets each node's runtime worker threads (TOKIO_WORKER_THREADS). By default every
# node has one per CPU, so two nodes on this machine run twice the threads of one on the
# same cores, beside the database and the load; WORKERS=1 on a 2-CPU machine gives each of
# two nodes its share of the machine instead.
#
# Not part of `cargo test`. Needs PostgreSQL's server programs (apt-get install postgresql).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${1:-10}"
DESTINATIONS="${2:-1}"
WORKERS=()
if [ -n "${3:-}" ]; then WORKERS=(--node-workers "$3"); fi

bin=""
for d in $(command -v initdb >/dev/null 2>&1 && dirname "$(command -v initdb)") /usr/lib/postgresql/*/bin; do
  if [ -x "$d/initdb" ]; then bin="$d"; fi
done
if [ -z "$bin" ]; then
  echo "PostgreSQL server programs not found (apt-get install postgresql)" >&2
  exit 1
fi
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
work="$(mktemp -d /tmp/dispatchd-cluster-bench-XXXXXX)"
[ "$(id -u)" = 0 ] && chown postgres "$work"
port=$(( 20000 + RANDOM % 20000 ))
cleanup() {
  as_pg "$bin/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
as_pg "$bin/initdb" -D "$work/data" -U dispatchd --auth=trust -E UTF8 >/dev/null
as_pg "$bin/pg_ctl" -D "$work/data" -o "-p $port -c listen_addresses=127.0.0.1 -k $work -c max_connections=200" \
  -l "$work/server.log" -w start >/dev/null
pg_major=$("$bin/postgres" --version | awk '{print $3}' | cut -d. -f1)
echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (default settings but max_connections 200; fsync on)"

cargo build --release --bench delivery >/dev/null 2>&1 || cargo build --release --bench delivery
for nodes in 1 2; do
  db="bench_${nodes}_nodes"
  as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U dispatchd -d postgres -qc "CREATE DATABASE $db" >/dev/null
  echo
  echo "=============== $nodes node(s) ==============="
  psql_q() { as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U dispatchd -d "$db" -Atqc "$1"; }
  # Each run starts from a checkpoint, so the server's next one (due after ~1 GiB of WAL)
  # does not fall in the second run's window only.
  psql_q "CHECKPOINT" >/dev/null
  lsn0=$(psql_q "SELECT pg_current_wal_lsn()")
  # WAL flushes: pg_stat_wal.wal_sync on PostgreSQL 14 to 17, pg_stat_io from 18 on.
  if [ "$pg_major" -ge 18 ]; then
    syncs_sql="SELECT coalesce(sum(fsyncs), 0)::bigint FROM pg_stat_io WHERE object = 'wal'"
  elif [ "$pg_major" -ge 14 ]; then
    syncs_sql="SELECT wal_sync FROM pg_stat_wal"
  else
    syncs_sql=""
  fi
  syncs0=0
  if [ -n "$syncs_sql" ]; then syncs0=$(psql_q "$syncs_sql" || echo 0); fi
  cargo bench --bench delivery -- throughput --connections 64 --seconds "$SECONDS_PER_RUN" --destinations "$DESTINATIONS" "${WORKERS[@]}" \
    --postgres-url "postgres://dispatchd@127.0.0.1:$port/$db" --nodes "$nodes"
  # What the database wrote for it: WAL per event (published and delivered) and table sizes.
  events=$(psql_q "SELECT count(*) FROM events")
  wal=$(psql_q "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0')::bigint")
  flushes="WAL flushes not counted before PostgreSQL 14"
  if [ -n "$syncs_sql" ]; then
    syncs=$(( $(psql_q "$syncs_sql" || echo "$syncs0") - syncs0 ))
    flushes="$syncs WAL flushes ($((syncs * 1000 / (events > 0 ? events : 1))) per 1000 events)"
  fi
  echo "postgresql: $events events, WAL $((wal / 1048576)) MiB, $((wal / (events > 0 ? events : 1))) bytes per event," \
    "$flushes; database $(psql_q "SELECT pg_size_pretty(pg_database_size(current_database()))")"
  # Dropped, so autovacuum does not work through it during the next run.
  as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U dispatchd -d postgres -qc "DROP DATABASE $db" >/dev/null
done
