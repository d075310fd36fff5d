#!/usr/bin/env bash
# Runs every cargo-fuzz target of ztna-proto (proto/fuzz) for FUZZ_SECONDS each.
# cargo fuzz needs nightly-only flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain use them.
# Usage: scripts/fuzz.sh [target...]   (default: all targets)
set -euo pipefail

seconds="${FUZZ_SECONDS:-30}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(control_message message_reader nat_test relay_frame steering_owner tunnel_framing)
fi

export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${seconds}s" >&2
    cargo fuzz run --fuzz-dir proto/fuzz "$target" -- -max_total_time="$seconds"
done
echo "all fuzz targets passed" >&2
