#!/bin/bash
# Interleaved rounds of `coffre bench` (16 clients) against nullserver (the
# ceiling: Coffre's proto served from a HashMap) and a fresh Coffre server
# (durable, release build), minutes apart on the same machine; prints each
# round and the medians of the ratios to Health/Check.
#
#   cargo build --release
#   COFFRE_PROTO=$PWD/proto CARGO_TARGET_DIR=/tmp/nulltarget \
#     cargo build --release --locked --manifest-path ../shared/limits/nullserver/Cargo.toml
#   bash benches/rounds.sh [ROUNDS] [SECONDS]
set -euo pipefail
source "$(dirname "$0")/support/server.sh"
ROUNDS=${1:-5}
SECS=${2:-6}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COFFRE_BIN:-$ROOT/target/release/coffre}
NULL=${NULLSERVER:-/tmp/nulltarget/release/nullserver}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ratio() { python3 -c 'import json,sys
d=json.loads(sys.stdin.read()); r={p["phase"]:p for p in d["phases"]}
h=r["health_check"]["req_per_s"]
print("%.0f %.0f %.0f %.3f %.3f" % (h, r["get_record"]["req_per_s"], r["put_record"]["req_per_s"], r["get_record"]["req_per_s"]/h, r["put_record"]["req_per_s"]/h))'; }
: > "$WORK/null.txt"; : > "$WORK/coffre.txt"
for round in $(seq 1 "$ROUNDS"); do
  if [ -x "$NULL" ]; then
    "$NULL" 127.0.0.1:50081 > /dev/null 2>&1 &
    NPID=$!
    sleep 0.5
    COFFRE_TOKEN=cf1.null "$BIN" --json bench --addr http://127.0.0.1:50081 --clients 16 \
      --seconds "$SECS" --records 2000 2>/dev/null | ratio | tee -a "$WORK/null.txt" | sed "s/^/null   round $round: /"
    kill $NPID; wait $NPID 2>/dev/null || true
  fi
  D=$WORK/c$round
  start_server "$BIN" "$D"
  COFFRE_TOKEN_FILE=$D/token "$BIN" --json --addr "$ADDR" bench --clients 16 --seconds "$SECS" \
    --records 2000 2>/dev/null | ratio | tee -a "$WORK/coffre.txt" | sed "s/^/coffre round $round: /"
  kill $PID; wait $PID 2>/dev/null || true
done
echo "columns: health/s get/s put/s get/health put/health"
for who in null coffre; do
  [ -s "$WORK/$who.txt" ] || continue
  python3 - "$WORK/$who.txt" "$who" <<'PY'
import statistics, sys
rows=[list(map(float,l.split())) for l in open(sys.argv[1]) if l.strip()]
med=lambda i: statistics.median(r[i] for r in rows)
print("%-6s median of %d: health %.0f/s, GetRecord %.2f x health, PutRecord %.2f x health" % (sys.argv[2], len(rows), med(0), med(3), med(4)))
PY
done
