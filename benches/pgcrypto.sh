#!/bin/bash
# Coffre beside the peer a hospital would pick instead: PostgreSQL with
# pgcrypto, each of ten fields encrypted with pgp_sym_encrypt and read with
# pgp_sym_decrypt, synchronous_commit = on, 16 clients (pgbench), then
# `coffre bench` (16 clients) against a fresh Coffre server, on the same
# machine in the same minutes. Prints both and the ratios.
#
#   cargo build --release
#   bash benches/pgcrypto.sh [SECONDS] [ROWS]
#
# Needs the `postgresql` and `postgresql-contrib` packages (initdb, pg_ctl,
# pgbench, pgcrypto); run as root it starts the cluster as user postgres.
set -euo pipefail
SECS=${1:-10}
ROWS=${2:-20000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${COFFRE_BIN:-$ROOT/target/release/coffre}
PGBIN=${COFFRE_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
WORK=$(mktemp -d /tmp/coffre-pgcrypto.XXXXXX)
chmod 755 "$WORK"
RUN=()
if [ "$(id -u)" = 0 ]; then RUN=(runuser -u postgres --); chown postgres "$WORK"; fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  [ -n "${CPID:-}" ] && kill "$CPID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"${RUN[@]}" "$PGBIN/initdb" -A trust -U postgres -D "$WORK/pg" >/dev/null
"${RUN[@]}" "$PGBIN/pg_ctl" -w -D "$WORK/pg" -l "$WORK/pg.log" \
  -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c synchronous_commit=on -c fsync=on -c max_connections=64" start >/dev/null
PSQL=("$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
"${PSQL[@]}" <<SQL
create extension pgcrypto;
create table patient (id bigserial primary key,
  family_name bytea, given_name bytea, birth_date bytea, sex bytea, address bytea,
  phone bytea, nir bytea, blood_group bytea, physician bytea, notes bytea);
insert into patient (family_name, given_name, birth_date, sex, address, phone, nir, blood_group, physician, notes)
select pgp_sym_encrypt('Durand' || g, 'k'), pgp_sym_encrypt('Marie', 'k'), pgp_sym_encrypt('1985-07-14', 'k'),
       pgp_sym_encrypt('F', 'k'), pgp_sym_encrypt(g || ' rue de la Paix, 75002 Paris', 'k'),
       pgp_sym_encrypt('+33 6 12 34 56 78', 'k'), pgp_sym_encrypt('285077512345678', 'k'),
       pgp_sym_encrypt('A+', 'k'), pgp_sym_encrypt('Dr Martin', 'k'),
       pgp_sym_encrypt('Allergic to penicillin; follow-up in three months.', 'k')
from generate_series(1, $ROWS) g;
SQL
cat > "$WORK/select.sql" <<SQL
\set id random(1, $ROWS)
select pgp_sym_decrypt(family_name, 'k'), pgp_sym_decrypt(given_name, 'k'), pgp_sym_decrypt(birth_date, 'k'),
       pgp_sym_decrypt(sex, 'k'), pgp_sym_decrypt(address, 'k'), pgp_sym_decrypt(phone, 'k'),
       pgp_sym_decrypt(nir, 'k'), pgp_sym_decrypt(blood_group, 'k'), pgp_sym_decrypt(physician, 'k'),
       pgp_sym_decrypt(notes, 'k') from patient where id = :id;
SQL
cat > "$WORK/insert.sql" <<SQL
insert into patient (family_name, given_name, birth_date, sex, address, phone, nir, blood_group, physician, notes)
values (pgp_sym_encrypt('Durand', 'k'), pgp_sym_encrypt('Marie', 'k'), pgp_sym_encrypt('1985-07-14', 'k'),
        pgp_sym_encrypt('F', 'k'), pgp_sym_encrypt('3 rue de la Paix, 75002 Paris', 'k'),
        pgp_sym_encrypt('+33 6 12 34 56 78', 'k'), pgp_sym_encrypt('285077512345678', 'k'),
        pgp_sym_encrypt('A+', 'k'), pgp_sym_encrypt('Dr Martin', 'k'),
        pgp_sym_encrypt('Allergic to penicillin; follow-up in three months.', 'k'));
SQL
chmod 644 "$WORK"/*.sql
pgb() { "$PGBIN/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -c 16 -j 2 -T "$SECS" -f "$1" postgres 2>/dev/null \
  | awk '/^tps/ {print int($3); exit}'; }
PG_SEL=$(pgb "$WORK/select.sql")
PG_INS=$(pgb "$WORK/insert.sql")
"${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null

D=$WORK/coffre; mkdir -p "$D"
sed -e "s#coffre-bench-data#$D/data#" -e "s#keys/bench-master.key#$D/master.key#" \
    -e 's#127.0.0.1:50051#127.0.0.1:0#' "$ROOT/deploy/coffre.bench.toml" > "$D/c.toml"
PASS="violet anchor 8812 meadow crane"
COFFRE_BOOTSTRAP_ADMIN_PASSWORD="$PASS" COFFRE_LOG=error "$BIN" serve --config "$D/c.toml" > "$D/out.log" 2>&1 &
CPID=$!
for _ in $(seq 50); do grep -q "http://" "$D/out.log" 2>/dev/null && break; sleep 0.1; done
ADDR=$(grep -o "http://[0-9.:]*" "$D/out.log" | head -1)
echo "$PASS" | COFFRE_TOKEN_FILE=$D/token "$BIN" --addr "$ADDR" login > /dev/null
read -r C_GET C_PUT < <(COFFRE_TOKEN_FILE=$D/token "$BIN" --json --addr "$ADDR" bench --clients 16 \
  --seconds "$SECS" --records 2000 2>/dev/null | python3 -c 'import json,sys
d={p["phase"]:p for p in json.load(sys.stdin)["phases"]}
print(int(d["get_record"]["req_per_s"]), int(d["put_record"]["req_per_s"]))')

printf '%-44s %10s\n' "16 clients, $SECS s each" "per second"
printf '%-44s %10s\n' "pgcrypto: select, 10 fields decrypted" "$PG_SEL"
printf '%-44s %10s\n' "pgcrypto: insert, 10 fields encrypted" "$PG_INS"
printf '%-44s %10s\n' "Coffre: GetRecord (10 fields, audited)" "$C_GET"
printf '%-44s %10s\n' "Coffre: PutRecord (10 fields, durable)" "$C_PUT"
python3 -c "print('Coffre / pgcrypto: reads %.1fx, writes %.1fx' % ($C_GET/$PG_SEL, $C_PUT/$PG_INS))"
