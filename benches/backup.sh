#!/bin/bash
# Backup and restore at scale (release build): fills a server with N
# ten-field records (`coffre bench --fill`, each with its PutRecord event),
# then measures, in one run on one machine:
#   - GetRecord p50/p99 idle, then while `coffre backup` runs (16 clients);
#   - how long writes were held for the cut (the server's log);
#   - peak RSS of the server during the backup and of the backup CLI;
#   - backup time, file size, bytes per record;
#   - `coffre backup verify` and `coffre restore` time, rate and peak RSS.
#
#   cargo build --release
#   bash benches/backup.sh [RECORDS] [WORKDIR]
# The work directory must be on a disk with room for about 4 KiB per record.
# REUSE=1 keeps a filled WORKDIR from an earlier run (no fill); ONLINE=1
# stops after the backup (no verify, no restore).
set -euo pipefail
N=${1:-1000000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COFFRE_BIN:-$ROOT/target/release/coffre}
WORK=${2:-/var/tmp/coffre-backup-bench}
if [ "${REUSE:-0}" != 1 ]; then rm -rf "$WORK"; fi
mkdir -p "$WORK"; rm -rf "$WORK/restored" "$WORK/b.backup" "$WORK/backup.done"
trap 'kill $CPID 2>/dev/null || true' EXIT
PASS="violet anchor 8812 meadow crane"
sed -e "s#coffre-bench-data#$WORK/data#" -e "s#keys/bench-master.key#$WORK/master.key#" \
    -e 's#127.0.0.1:50051#127.0.0.1:0#' "$ROOT/deploy/coffre.bench.toml" > "$WORK/c.toml"
sed -e "s#$WORK/data#$WORK/restored#" "$WORK/c.toml" > "$WORK/r.toml"

start() {
  COFFRE_BOOTSTRAP_ADMIN_PASSWORD="$PASS" COFFRE_LOG=info "$BIN" serve --config "$WORK/c.toml" \
    > "$WORK/out.log" 2>> "$WORK/err.log" &
  CPID=$!
  for _ in $(seq 100); do grep -q "http://" "$WORK/out.log" 2>/dev/null && break; sleep 0.1; done
  ADDR=$(grep -o "http://[0-9.:]*" "$WORK/out.log" | head -1)
  echo "$PASS" | COFFRE_TOKEN_FILE=$WORK/token "$BIN" --addr "$ADDR" login > /dev/null
}
c() { COFFRE_TOKEN_FILE=$WORK/token "$BIN" --addr "$ADDR" "$@"; }
p99() { python3 -c 'import json,sys
d=json.loads(sys.stdin.read()); r={p["phase"]:p for p in d["phases"]}
print("%.2f %.2f" % (r["get_record"]["p50_ms"], r["get_record"]["p99_ms"]))'; }

FILLED=$([ -d "$WORK/data" ] && echo yes || echo no)
start
if [ "$FILLED" = no ]; then
  echo "== fill: $N records"
  T0=$(date +%s.%N)
  c bench --fill "$N" --clients 32 2>&1 | tail -1
  FILL=$(python3 -c "print('%.0f' % ($(date +%s.%N) - $T0))")
  echo "fill: ${FILL} s; data dir $(du -sh "$WORK/data" | cut -f1)"
fi

echo "== GetRecord idle"
IDLE=$(c --json bench --clients 16 --seconds 5 --records 1000 2>/dev/null | p99)
echo "idle p50/p99 ms: $IDLE"

echo "server RSS before the backup: $(( $(awk '/VmRSS/{print $2}' /proc/$CPID/status) / 1024 )) MiB"
echo "== backup while serving"
( peak=0; while kill -0 $CPID 2>/dev/null && [ ! -e "$WORK/backup.done" ]; do
    r=$(awk '/VmRSS/{print $2}' /proc/$CPID/status); [ "$r" -gt "$peak" ] && peak=$r
    echo $peak > "$WORK/server.rss"; sleep 0.2; done ) &
T0=$(date +%s.%N)
/usr/bin/time -f "%e %M" -o "$WORK/backup.time" \
  env COFFRE_TOKEN_FILE=$WORK/token "$BIN" --addr "$ADDR" --json backup --out "$WORK/b.backup" \
  > "$WORK/backup.json" &
BPID=$!
sleep 1
DURING=$(c --json bench --clients 16 --seconds 5 --records 1000 2>/dev/null | p99)
STILL=$(kill -0 $BPID 2>/dev/null && echo yes || echo no)
wait $BPID
touch "$WORK/backup.done"; sleep 0.3
read BSECS BRSS < "$WORK/backup.time"
BYTES=$(stat -c %s "$WORK/b.backup")
HELD=$(grep -o 'held_us=[0-9]*' "$WORK/err.log" | tail -1 | cut -d= -f2)
echo "during p50/p99 ms: $DURING (backup still running when the GetRecord phase ended: $STILL)"
echo "backup: ${BSECS} s, ${BYTES} bytes, writes held ${HELD} us"
echo "rss: server peak during backup $(( $(cat "$WORK/server.rss") / 1024 )) MiB, backup CLI $((BRSS / 1024)) MiB"
kill $CPID; wait $CPID 2>/dev/null || true
[ "${ONLINE:-0}" = 1 ] && exit 0

echo "== backup verify (offline)"
/usr/bin/time -f "%e %M" -o "$WORK/verify.time" "$BIN" --json backup verify --config "$WORK/c.toml" \
  "$WORK/b.backup" > "$WORK/verify.json"
read VSECS VRSS < "$WORK/verify.time"
RECS=$(python3 -c "import json; print(json.load(open('$WORK/verify.json'))['records'])")
EVENTS=$(python3 -c "import json; print(json.load(open('$WORK/verify.json'))['events'])")
echo "file: $((BYTES / RECS)) bytes per record ($RECS records, $EVENTS audit events in it)"
echo "verify: ${VSECS} s, $(python3 -c "print('%.0f' % ($RECS / $VSECS))") records/s, RSS $((VRSS / 1024)) MiB ($RECS records)"

echo "== restore (offline, into an empty directory)"
/usr/bin/time -f "%e %M" -o "$WORK/restore.time" "$BIN" --json restore --config "$WORK/r.toml" \
  --from "$WORK/b.backup" > "$WORK/restore.json"
read RSECS RRSS < "$WORK/restore.time"
echo "restore: ${RSECS} s (verify + write), $(python3 -c "print('%.0f' % ($RECS / $RSECS))") records/s, RSS $((RRSS / 1024)) MiB; restored dir $(du -sh "$WORK/restored" | cut -f1)"
echo "machine: $(nproc) vCPU, $(awk '/MemTotal/{print int($2/1024/1024)}' /proc/meminfo) GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
