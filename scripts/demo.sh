#!/usr/bin/env bash
# One-command local demo: relay, connector, a backend and an agent on loopback, and a
# request that travels agent -> relay -> connector -> backend through the end-to-end tunnel.
#   scripts/demo.sh          run, fetch once, then keep everything up until Ctrl-C
#   scripts/demo.sh --once   run, fetch once, stop
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
command -v curl >/dev/null || { echo "demo needs curl" >&2; exit 1; }
cargo build --release -q -p ztna-relay -p ztna-agent -p ztna-connector
bin=target/release
dir=$(mktemp -d /tmp/ztna-demo.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

RELAY_PORT=${RELAY_PORT:-14433}
ADMIN=${ADMIN:-127.0.0.1:19090}
LOCAL_PORT=${LOCAL_PORT:-18080}
BACKEND_PORT=${BACKEND_PORT:-18081}

echo "== PKI and policy in $dir (agent alice may reach web, served by connector web-1)"
"$bin/ztna-relay" pki init --dir "$dir/pki" >/dev/null
mkdir -p "$dir/www" && echo "hello from the private web service behind the connector" > "$dir/www/index.html"

echo "== backend: a private web server on 127.0.0.1:$BACKEND_PORT"
python3 -m http.server "$BACKEND_PORT" --bind 127.0.0.1 --directory "$dir/www" >"$dir/backend.log" 2>&1 &
pids+=($!)

echo "== relay on [::]:$RELAY_PORT, metrics on http://$ADMIN/metrics"
"$bin/ztna-relay" --listen "[::]:$RELAY_PORT" --admin "$ADMIN" --workers 2 --no-pin \
    --cert "$dir/pki/relay.pem" --key "$dir/pki/relay.key" --ca "$dir/pki/ca.pem" \
    --policy "$dir/pki/policy.toml" >"$dir/relay.log" 2>&1 &
pids+=($!)
sleep 0.5

echo "== connector web-1: serves web=127.0.0.1:$BACKEND_PORT"
"$bin/ztna-connector" --relay "127.0.0.1:$RELAY_PORT" --pki-dir "$dir/pki" --name web-1 \
    --service "web=127.0.0.1:$BACKEND_PORT" >"$dir/connector.log" 2>&1 &
pids+=($!)

echo "== agent alice: forwards 127.0.0.1:$LOCAL_PORT to service web"
"$bin/ztna-agent" run --relay "127.0.0.1:$RELAY_PORT" --pki-dir "$dir/pki" --name alice \
    -L "$LOCAL_PORT:web" >"$dir/agent.log" 2>&1 &
pids+=($!)

for _ in $(seq 50); do
    grep -q "TCP forward ready" "$dir/agent.log" 2>/dev/null && grep -q registered "$dir/connector.log" 2>/dev/null && break
    sleep 0.1
done

echo "== curl http://127.0.0.1:$LOCAL_PORT/  (through the tunnel)"
curl -sS --max-time 10 "http://127.0.0.1:$LOCAL_PORT/" || { for f in relay connector agent; do echo "--- $f log"; tail -n 20 "$dir/$f.log"; done; exit 1; }
echo "== relay: $(curl -s "http://$ADMIN/metrics" | grep -E '^ztna_relay_frames_forwarded_total' | awk '{s+=$2} END {print s}') DATA frames forwarded; it never saw the plaintext"
grep "new TCP flow" "$dir/connector.log" | tail -1 | sed 's/^/== connector: /'

if [[ "${1:-}" != "--once" ]]; then
    echo "== running; try: curl http://127.0.0.1:$LOCAL_PORT/   (Ctrl-C stops everything)"
    wait
fi
