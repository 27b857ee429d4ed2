#!/bin/bash
# Server CPU per call of two coffre builds, rounds interleaved: a fresh
# server (release, deploy/coffre.bench.toml), `coffre bench --phase get`
# (16 clients: health phase, seeding, GetRecord phase), and the server's
# own CPU time (utime + stime from /proc) divided by the calls it served.
# Less noisy than req/s when the load generator shares the cores.
#
#   bash benches/cpu_ab.sh /path/to/coffre-A /path/to/coffre-B [ROUNDS] [SECONDS]
set -euo pipefail
source "$(dirname "$0")/support/server.sh"
A=${1:?}; B=${2:?}; ROUNDS=${3:-4}; SECS=${4:-6}; RECORDS=2000
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
TCK=$(getconf CLK_TCK)
for r in $(seq 1 "$ROUNDS"); do
  for who in A B; do
    BIN=$A; [ $who = B ] && BIN=$B
    D=$WORK/$who$r
    start_server "$BIN" "$D"
    t0=$(awk '{print $14+$15}' /proc/$PID/stat)
    COFFRE_TOKEN_FILE=$D/token "$BIN" --json --addr "$ADDR" bench --clients 16 --seconds "$SECS" \
      --records $RECORDS --phase get 2>/dev/null > "$D/bench.json"
    t1=$(awk '{print $14+$15}' /proc/$PID/stat)
    kill $PID; wait $PID 2>/dev/null || true
    python3 - "$D/bench.json" "$((t1 - t0))" "$TCK" "$SECS" "$RECORDS" "$who" "$r" <<'PY' | tee -a "$WORK/$who.txt"
import json, sys
d = json.load(open(sys.argv[1])); ticks, tck, secs, recs = (int(x) for x in sys.argv[2:6])
r = {p["phase"]: p for p in d["phases"]}
calls = (r["health_check"]["req_per_s"] + r["get_record"]["req_per_s"]) * secs + recs
print("%s %s %.1f %.0f %.0f" % (sys.argv[6], sys.argv[7], ticks / tck * 1e6 / calls,
      r["health_check"]["req_per_s"], r["get_record"]["req_per_s"]))
PY
  done
done
echo "columns: build round server-cpu-us/call health/s get/s"
for who in A B; do
  python3 -c "import statistics,sys; v=[float(l.split()[2]) for l in open('$WORK/$who.txt')]; print('$who median server CPU per call: %.1f us (of %d rounds)' % (statistics.median(v), len(v)))"
done
