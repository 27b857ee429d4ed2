#!/bin/bash
# A/B of two coffre builds on the same machine, rounds interleaved (A, B,
# A, B, ...), each round `benches/rounds.sh 1 SECONDS` (a fresh server, 16
# clients, health then GetRecord then PutRecord); prints each round and the
# medians per build.
#
#   bash benches/ab.sh /path/to/coffre-A /path/to/coffre-B [ROUNDS] [SECONDS]
set -euo pipefail
A=${1:?coffre binary A}; B=${2:?coffre binary B}
ROUNDS=${3:-4}; SECS=${4:-6}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  for who in A B; do
    bin=$A; [ $who = B ] && bin=$B
    line=$(NULLSERVER=/nonexistent COFFRE_BIN=$bin bash "$HERE/rounds.sh" 1 "$SECS" | grep "coffre round" | sed 's/.*: //')
    echo "$line" >> "$OUT/$who"
    echo "round $r $who: $line"
  done
done
echo "columns: health/s get/s put/s get/health put/health"
for who in A B; do
  python3 - "$OUT/$who" "$who" <<'PY'
import statistics, sys
rows=[list(map(float,l.split())) for l in open(sys.argv[1]) if l.strip()]
m=lambda i: statistics.median(r[i] for r in rows)
print("%s median of %d: health %.0f/s, GetRecord %.0f/s (%.2f x health), PutRecord %.0f/s (%.2f x health)" % (sys.argv[2], len(rows), m(0), m(1), m(3), m(2), m(4)))
PY
done
