#!/usr/bin/env bash
# Runs every test: installs prerequisites, builds the binaries the end-to-end tests
# start, then the whole workspace's tests (unit, property, in-process and multi-process).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --workspace --bins
cargo test --workspace "$@"
