#!/usr/bin/env bash
# The lab topology: three network namespaces joined by veth pairs, addressed from the
# documentation ranges only.
#
#   <P>-agent                  <P>-relay                        <P>-conn
#   192.0.2.2/24        a1 --- a0  192.0.2.1/24
#   2001:db8:a::2/64           2001:db8:a::1/64
#                                  198.51.100.1/24  c0 --- c1   198.51.100.2/24
#                                  2001:db8:c::1/64             2001:db8:c::2/64
#
# The relay runs in <P>-relay and listens on both sides; agents run in <P>-agent and reach it
# at 192.0.2.1 / [2001:db8:a::1], connectors in <P>-conn at 198.51.100.1 / [2001:db8:c::1].
#
#   deploy/lab/lab.sh up        create (replacing leftovers of the same prefix)
#   deploy/lab/lab.sh down      remove everything of this prefix (idempotent)
#   deploy/lab/lab.sh exec agent|relay|conn CMD...   run a command inside a namespace
#   deploy/lab/lab.sh status
# LAB_PREFIX (default "ztna") names the namespaces, so parallel labs do not collide.
set -euo pipefail
P=${LAB_PREFIX:-ztna}
NS_A="$P-agent" NS_R="$P-relay" NS_C="$P-conn"

down() {
    for ns in "$NS_A" "$NS_R" "$NS_C"; do
        ip netns del "$ns" 2>/dev/null || true
    done
}

up() {
    down
    for ns in "$NS_A" "$NS_R" "$NS_C"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    # Agent side.
    ip link add a1 netns "$NS_A" type veth peer name a0 netns "$NS_R"
    # Connector side.
    ip link add c1 netns "$NS_C" type veth peer name c0 netns "$NS_R"
    ip -n "$NS_A" addr add 192.0.2.2/24 dev a1
    ip -n "$NS_A" addr add 2001:db8:a::2/64 dev a1 nodad
    ip -n "$NS_R" addr add 192.0.2.1/24 dev a0
    ip -n "$NS_R" addr add 2001:db8:a::1/64 dev a0 nodad
    ip -n "$NS_R" addr add 198.51.100.1/24 dev c0
    ip -n "$NS_R" addr add 2001:db8:c::1/64 dev c0 nodad
    ip -n "$NS_C" addr add 198.51.100.2/24 dev c1
    ip -n "$NS_C" addr add 2001:db8:c::2/64 dev c1 nodad
    for pair in "$NS_A a1" "$NS_R a0" "$NS_R c0" "$NS_C c1"; do
        set -- $pair
        ip -n "$1" link set "$2" up
        # Locally built UDP on a veth otherwise leaves checksums to an offload that XDP
        # never sees (the relay's XDP fast path would drop such packets).
        if command -v ethtool >/dev/null; then
            ip netns exec "$1" ethtool -K "$2" tx off >/dev/null 2>&1 || true
        fi
    done
    # XDP_REDIRECT from a0/c0 (the relay's XDP fast path) hands frames to the peer veth's NAPI
    # instance, which a veth has only with GRO on or an XDP program attached: turn GRO on at
    # the far ends (a1, c1). Plain UDP is not coalesced by it (no UDP GRO socket, no forwarding).
    if command -v ethtool >/dev/null; then
        ip netns exec "$NS_A" ethtool -K a1 gro on >/dev/null 2>&1 || true
        ip netns exec "$NS_C" ethtool -K c1 gro on >/dev/null 2>&1 || true
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    exec)
        shift
        case "${1:-}" in
            agent) ns=$NS_A ;;
            relay) ns=$NS_R ;;
            conn) ns=$NS_C ;;
            *) echo "usage: $0 exec agent|relay|conn CMD..." >&2; exit 2 ;;
        esac
        shift
        exec ip netns exec "$ns" "$@"
        ;;
    status)
        for ns in "$NS_A" "$NS_R" "$NS_C"; do
            echo "== $ns"
            ip -n "$ns" -br addr 2>/dev/null || echo "(absent)"
        done
        ;;
    *) echo "usage: $0 up|down|exec agent|relay|conn CMD...|status" >&2; exit 2 ;;
esac
