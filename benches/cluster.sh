#!/bin/bash
# One node on sled, one node on PostgreSQL, two nodes on one PostgreSQL:
# GetRecord and PutRecord req/s and p99 with `coffre bench` (16 clients in
# all; with two nodes, 8 on each, summed), in one run on one machine; then
# PostgreSQL statements per GetRecord and per PutRecord (pg_stat_statements,
# a run of each phase alone).
#
#   cargo build --release
#   bash benches/cluster.sh [SECONDS] [ROUNDS]
#
# Needs the `postgresql` and `postgresql-contrib` packages (initdb, pg_ctl,
# psql, pg_stat_statements); as root, PostgreSQL runs as user postgres.
set -euo pipefail
SECS=${1:-6}
ROUNDS=${2:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COFFRE_BIN:-$ROOT/target/release/coffre}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d /tmp/coffre-cluster-bench.XXXXXX)
chmod 755 "$WORK"
RUN=()
[ "$(id -u)" = 0 ] && RUN=(runuser -u postgres --) && chown postgres "$WORK"
PORT=55432
PASS="violet anchor 8812 meadow crane"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"${RUN[@]}" "$PGBIN/initdb" -A trust -U postgres -D "$WORK/pg" >/dev/null
"${RUN[@]}" "$PGBIN/pg_ctl" -w -D "$WORK/pg" -l "$WORK/pg.log" \
  -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c shared_preload_libraries=pg_stat_statements -c max_connections=200" \
  start >/dev/null
PSQL=("$PGBIN/psql" -X -A -t -q -h 127.0.0.1 -p "$PORT" -U postgres)

# config NAME BACKEND [DB]: a config file for a node (roomy budgets).
config() {
  local d=$WORK/$1; mkdir -p "$d"
  sed -e "s#coffre-bench-data#$d/data#" -e "s#keys/bench-master.key#$WORK/master.key#" \
      -e 's#127.0.0.1:50051#127.0.0.1:0#' "$ROOT/deploy/coffre.bench.toml" > "$d/c.toml"
  if [ "$2" = postgres ]; then
    printf '[storage]\nbackend = "postgres"\npostgres_url = "postgres://postgres@127.0.0.1:%s/%s"\npool_size = 16\n' \
      "$PORT" "$3" >> "$d/c.toml"
  fi
  echo "$d/c.toml"
}

# node CONFIG: starts a node (in this shell, so that PIDS keeps it); its
# address in ADDR.
node() {
  local out; out=$(mktemp -p "$WORK")
  COFFRE_BOOTSTRAP_ADMIN_PASSWORD="$PASS" COFFRE_LOG=error "$BIN" serve --config "$1" \
    > "$out" 2>> "$WORK/nodes.err" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q "http://" "$out" 2>/dev/null && break; sleep 0.1; done
  ADDR=$(grep -o "http://[0-9.:]*" "$out" | head -1)
}

# bench ADDR CLIENTS [PHASE RECORDS]: JSON of one `coffre bench`.
bench() {
  local tok; tok=$(mktemp -p "$WORK")
  echo "$PASS" | COFFRE_TOKEN_FILE=$tok "$BIN" --addr "$1" login > /dev/null
  COFFRE_TOKEN_FILE=$tok "$BIN" --json --addr "$1" bench --clients "$2" --seconds "$SECS" \
    --records "${4:-2000}" --phase "${3:-all}" 2>/dev/null | tail -1
}

summary() { python3 -c '
import json, sys
runs = [json.loads(l) for l in sys.stdin if l.strip()]
out = []
for phase in ("get_record", "put_record"):
    ps = [p for r in runs for p in r["phases"] if p["phase"] == phase]
    out.append("%s %.0f/s p99 %.1f ms" % (phase, sum(p["req_per_s"] for p in ps), max(p["p99_ms"] for p in ps)))
print(", ".join(out))'; }

for round in $(seq 1 "$ROUNDS"); do
  node "$(config "sled$round" sled)"; A=$ADDR
  echo "round $round sled, 1 node:       $(bench "$A" 16 | summary)"
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

  "${PSQL[@]}" -c "CREATE DATABASE one$round" postgres
  node "$(config "one$round" postgres "one$round")"; A=$ADDR
  echo "round $round postgres, 1 node:   $(bench "$A" 16 | summary)"
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

  "${PSQL[@]}" -c "CREATE DATABASE two$round" postgres
  C=$(config "two$round" postgres "two$round")
  node "$C"; A=$ADDR; node "$C"; B=$ADDR
  echo "round $round postgres, 2 nodes:  $( (bench "$A" 8 & bench "$B" 8 & wait) | summary)"
  kill "${PIDS[-1]}" "${PIDS[-2]}"; wait 2>/dev/null || true
done

# Statements per call: each phase alone, 4 clients, on a fresh database.
"${PSQL[@]}" -c "CREATE DATABASE stmts" postgres
"${PSQL[@]}" -c "CREATE EXTENSION pg_stat_statements" stmts
node "$(config stmts postgres stmts)"; A=$ADDR
# CPU seconds of every process of a name (the database's share).
cpu() { ps -eo comm,times | awk -v n="$1" '$1 ~ n {s += $2} END {print s + 0}'; }
for phase in get put; do
  "${PSQL[@]}" -c "SELECT pg_stat_statements_reset()" stmts > /dev/null
  pg0=$(cpu '^postgres'); cf0=$(cpu '^coffre')
  # One seeded record: the count is the calls', not the seeding's.
  j=$(bench "$A" 4 "$phase" 1)
  pg1=$(cpu '^postgres'); cf1=$(cpu '^coffre')
  echo "$phase: CPU seconds during the run: postgres $((pg1 - pg0)), coffre node and load generator $((cf1 - cf0))"
  calls=$("${PSQL[@]}" -c "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'stmts' AND query NOT LIKE '%pg_stat_statements%'" stmts)
  echo "$j" | python3 -c '
import json, sys
phase, calls, secs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
r = {p["phase"]: p for p in json.loads(sys.stdin.read())["phases"]}
p = r[phase + "_record"]
n = p["req_per_s"] * secs
print("%s: %.0f calls, %.0f statements (with login, setup and the nodes\x27 once-a-second follow-up): %.1f statements per call" % (phase, n, calls, calls / n))' "$phase" "$calls" "$SECS"
done
nproc | sed 's/^/cores: /'
