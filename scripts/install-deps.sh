#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian 12 machine: cmake and clang
# (quiche builds BoringSSL; bindgen needs libclang; clang and libbpf-dev build the eBPF
# programs) and promtool (Debian's `prometheus`).
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v clang >/dev/null || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v promtool >/dev/null || need+=(prometheus)
command -v g++ >/dev/null || need+=(g++)
command -v curl >/dev/null || need+=(curl)
command -v ethtool >/dev/null || need+=(ethtool)
command -v trafgen >/dev/null || need+=(netsniff-ng)
# The relay's eBPF programs (C, built by relay/build.rs) need libbpf's headers; bpftool and
# nftables are used by the lab tests.
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v bpftool >/dev/null || need+=(bpftool)
command -v nft >/dev/null || need+=(nftables)
# The lab tests: namespaces and veths, a Python web server behind the connector.
command -v ip >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
# `ztna-bench direct-stream` measures one TCP stream with iperf3.
command -v iperf3 >/dev/null || need+=(iperf3)

if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install the Rust toolchain (rustup, stable >= 1.95)" >&2
    exit 1
fi
