# Sourced by the bench scripts: `start_server BIN DIR` starts a fresh
# release server on deploy/coffre.bench.toml with its data in DIR, logs in
# as admin (token in DIR/token) and sets PID and ADDR.
PASS="violet anchor 8812 meadow crane"
start_server() {
  local bin=$1 dir=$2 root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  mkdir -p "$dir"
  sed -e "s#coffre-bench-data#$dir/data#" -e "s#keys/bench-master.key#$dir/master.key#" \
      -e 's#127.0.0.1:50051#127.0.0.1:0#' "$root/deploy/coffre.bench.toml" > "$dir/c.toml"
  COFFRE_BOOTSTRAP_ADMIN_PASSWORD="$PASS" COFFRE_LOG=error "$bin" serve --config "$dir/c.toml" \
    > "$dir/out.log" 2> "$dir/err.log" &
  PID=$!
  for _ in $(seq 50); do grep -q "http://" "$dir/out.log" 2>/dev/null && break; sleep 0.1; done
  ADDR=$(grep -o "http://[0-9.:]*" "$dir/out.log" | head -1)
  echo "$PASS" | COFFRE_TOKEN_FILE=$dir/token "$bin" --addr "$ADDR" login > /dev/null
}
