#!/usr/bin/env bash
# Starts the relay on built-in defaults: UDP [::]:4433 (dual-stack), metrics on
# http://127.0.0.1:9090/metrics, one worker per core. On first run it creates a
# development PKI and an example policy in ./pki (agent "alice" may reach service "web",
# served by connector "web-1"). Extra arguments go to ztna-relay (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release -p ztna-relay -p ztna-agent -p ztna-connector
exec target/release/ztna-relay "$@"
