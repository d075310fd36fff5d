#!/usr/bin/env bash
# The NAT lab: an "internet" (a Linux bridge in <P>-wan) with the relay and a third-party host
# on it, and two home networks behind routers whose NAT behaviour is chosen per side, for
# hole-punching tests. Documentation addresses only, everything inside namespaces of its own.
#
#                    <P>-wan: bridge br0 203.0.113.1/24, 2001:db8:f::1/64, a router too
#        +-------------------+-------------------+-------------------+
#     port ra            port relay          port evil            port rc
#        |                   |                   |                   |
#  [<P>-da rt ~ br]      <P>-relay eth0      <P>-evil eth0       [<P>-dc rt ~ br]
#  (with --delay-ms)     203.0.113.10/24     203.0.113.66/24     (with --delay-ms)
#        |               203.0.113.11/24     2001:db8:f::66/64       |
#        |               2001:db8:f::10/64                           |
#        |               2001:db8:f::11/64                           |
#       wan 203.0.113.2/24, 2001:db8:f::2/64                        wan 203.0.113.3/24, 2001:db8:f::3/64
#  <P>-ra   (--agent-nat TYPE)                               <P>-rc   (--conn-nat TYPE)
#       lan 192.0.2.1/24, 2001:db8:a::1/64                          lan 198.51.100.1/24, 2001:db8:c::1/64
#        |                                                           |
#      eth0 192.0.2.2/24, 2001:db8:a::2/64                         eth0 198.51.100.2/24, 2001:db8:c::2/64
#  <P>-agent                                                  <P>-conn
#
# Hosts route by default via their router, routers and the relay and evil via 203.0.113.1.
#
# Router types (nftables in <P>-ra / <P>-rc):
#   none             publicly routed: the WAN side (wan, relay, evil, the other router) has a
#                    route to the LAN through the router; no NAT, no filter
#   full-cone        masquerade keeping ports, plus a DNAT of UDP to the WAN address (ports
#                    1024-65535) back to the LAN host, same port: anyone reaches a mapping
#   port-restricted  masquerade keeping ports (endpoint-independent mapping); conntrack only
#                    lets in replies from the very address and port (address-and-port filtering)
#   symmetric        masquerade fully-random: a new random port for every destination
# A NATing router drops unsolicited packets from its WAN side (forwarded, except what the
# full-cone DNAT lets in, and addressed to itself): otherwise the first packet of a
# simultaneous open would create a conntrack entry that makes the router remap the host's own
# outbound flow to another port. No LAN behind a NAT is routed from the WAN side.
# IPv6 (--v6) is never NATed and both LANs are always routed; a router of a type other than
# none is a stateful firewall for it (replies in, nothing new from the WAN side).
#
# --delay-ms N (with --delayline PATH, the ztna-delayline binary): each router's WAN veth goes to
# a delay namespace <P>-da / <P>-dc instead of the bridge, whose other veth is the bridge port;
# `up` starts `ztna-delayline --a rt --b br --delay-ms N` there, which copies every frame from
# one interface to the other N ms later, both ways (N ms each way between a router and the
# internet). Its output goes to $LAB_LOG_DIR/<P>-da.log when LAB_LOG_DIR is set.
#
#   deploy/lab/nat.sh up --agent-nat TYPE --conn-nat TYPE [--v6] [--delay-ms N --delayline PATH]
#                                 create (replacing leftovers of the same prefix)
#   deploy/lab/nat.sh down        kill every process in the namespaces and remove them (idempotent)
#   deploy/lab/nat.sh exec agent|conn|relay|ra|rc|wan|evil CMD...   run a command inside a host
#                                 (also da|dc, the delay namespaces)
#   deploy/lab/nat.sh block agent|conn [--except-port P]   at that side's router, drop
#                                 forwarded UDP between WAN and LAN unless it is from or to the
#                                 relay's addresses (no direct peer-to-peer path; the relay path
#                                 stays); with --except-port, UDP of the LAN host's port P passes
#                                 too (a site firewall that lets only a peer-to-peer port out)
#   deploy/lab/nat.sh unblock agent|conn   remove exactly that block
#   deploy/lab/nat.sh status
# LAB_PREFIX (default "nat") names the namespaces <P>-agent, <P>-ra, ..., so parallel labs do
# not collide. Needs root, iproute2, nftables and ethtool.
set -euo pipefail
P=${LAB_PREFIX:-nat}
HOSTS=(agent conn relay ra rc wan evil)
ALL_NS=(agent conn relay ra rc wan evil da dc)
TYPES="none full-cone port-restricted symmetric"
RELAY_V4="203.0.113.10, 203.0.113.11"
RELAY_V6="2001:db8:f::10, 2001:db8:f::11"

die() { echo "nat.sh: $*" >&2; exit 2; }
ns() { echo "$P-$1"; }
in_ns() { local n; n=$(ns "$1"); shift; ip netns exec "$n" "$@"; }

usage() {
    sed -n '/^#   deploy/,/^#   deploy\/lab\/nat.sh status/p' "$0" | sed 's/^#   //' >&2
    exit 2
}

down() {
    local n pids
    for h in "${ALL_NS[@]}"; do
        n=$(ns "$h")
        [ -e "/run/netns/$n" ] || continue
        # A namespace lives on while a process is in it (and with it its links).
        pids=$(ip netns pids "$n" 2>/dev/null | grep -vx "$$" || true)
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        ip netns del "$n" 2>/dev/null || true
    done
}

# veth LOCAL_NS LOCAL_DEV PEER_NS PEER_DEV: a veth pair, both ends up, tx checksum offload off
# (locally built UDP on a veth otherwise carries a partial checksum that user-space forwarders
# and XDP do not complete).
veth() {
    ip link add name "$2" netns "$(ns "$1")" type veth peer name "$4" netns "$(ns "$3")"
    for end in "$1 $2" "$3 $4"; do
        set -- $end
        ip -n "$(ns "$1")" link set dev "$2" up
        in_ns "$1" ethtool -K "$2" tx off >/dev/null
    done
}

addr4() { ip -n "$(ns "$1")" addr add "$3" dev "$2"; }
addr6() { ((V6)) || return 0; ip -n "$(ns "$1")" addr add "$3" dev "$2" nodad; }
route4() { local h=$1; shift; ip -n "$(ns "$h")" route replace "$@"; }
route6() { ((V6)) || return 0; local h=$1; shift; ip -n "$(ns "$h")" -6 route replace "$@"; }

# nat_rules TYPE LAN_HOST_V4 WAN_V4: the IPv4 ruleset of a router of TYPE (none: nothing).
nat_rules() {
    local type=$1 host=$2 wan=$3 random="" dnat=""
    [ "$type" = none ] && return 0
    [ "$type" = symmetric ] && random=" fully-random"
    if [ "$type" = full-cone ]; then
        dnat="
    chain prerouting {
        type nat hook prerouting priority dstnat;
        iifname \"wan\" ip daddr $wan udp dport 1024-65535 dnat to $host
    }"
    fi
    cat <<EOF
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "wan" masquerade$random
    }$dnat
}
table ip filter {
    chain forward {
        type filter hook forward priority filter;
        iifname "wan" ct state established,related accept
        iifname "wan" ct status dnat accept
        iifname "wan" drop
    }
    chain input {
        type filter hook input priority filter;
        iifname "wan" ct state new drop
    }
}
EOF
}

# fw6_rules TYPE: the IPv6 ruleset of a router of TYPE: a stateful firewall unless none.
fw6_rules() {
    { [ "$1" = none ] || ! ((V6)); } && return 0
    cat <<EOF
table ip6 filter {
    chain forward {
        type filter hook forward priority filter;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }
    chain input {
        type filter hook input priority filter;
        iifname "wan" meta l4proto ipv6-icmp accept
        iifname "wan" ct state new drop
    }
}
EOF
}

# router SIDE HOST TYPE WAN_V4 WAN_V6 LAN_V4 LAN_V6 HOST_V4 HOST_V6
router() {
    local r="r$1" h=$2 type=$3
    addr4 "$r" wan "$4/24"; addr6 "$r" wan "$5/64"
    addr4 "$r" lan "$6/24"; addr6 "$r" lan "$7/64"
    addr4 "$h" eth0 "$8/24"; addr6 "$h" eth0 "$9/64"
    in_ns "$r" sysctl -qw net.ipv4.ip_forward=1
    ((V6)) && in_ns "$r" sysctl -qw net.ipv6.conf.all.forwarding=1
    route4 "$r" default via 203.0.113.1
    route6 "$r" default via 2001:db8:f::1
    route4 "$h" default via "$6"
    route6 "$h" default via "$7"
    { nat_rules "$type" "$8" "$4"; fw6_rules "$type"; } | in_ns "$r" nft -f -
}

# wan_routes LAN_V4 LAN_V6 ROUTER_V4 ROUTER_V6 TYPE OTHER_ROUTER: the WAN side's routes to a LAN.
wan_routes() {
    local h
    for h in wan relay evil "$6"; do
        [ "$5" = none ] && route4 "$h" "$1" via "$3"
        route6 "$h" "$2" via "$4"
    done
    return 0
}

# WAN link of a router: straight onto the bridge, or through its delay namespace.
wan_link() {
    local side=$1
    if ((DELAY_MS > 0)); then
        veth "r$side" wan "d$side" rt
        veth "d$side" br wan "r$side"
        # The delay line copies plain frames: no offload on either end of its two veths, so
        # that what enters it is segmented and checksummed, and what it reads is not merged.
        for end in "r$side wan" "d$side rt" "d$side br" "wan r$side"; do
            set -- $end
            in_ns "$1" ethtool -K "$2" tx off rx off gro off gso off tso off >/dev/null
        done
    else
        veth "r$side" wan wan "r$side"
    fi
    ip -n "$(ns wan)" link set dev "r$side" master br0
}

# The delay line of each side in its namespace, in the background (its own session, not tied
# to this script); waits until it says it is forwarding.
start_delay_lines() {
    local side n log keep i pid
    for side in a c; do
        n=$(ns "d$side")
        if [ -n "${LAB_LOG_DIR:-}" ]; then log="$LAB_LOG_DIR/$n.log" keep=1; else log=$(mktemp) keep=0; fi
        ip netns exec "$n" setsid "$DELAYLINE" --a rt --b br --delay-ms "$DELAY_MS" </dev/null >"$log" 2>&1 &
        pid=$!
        for ((i = 0; i < 100; i++)); do
            grep -q "ztna-delayline: forwarding" "$log" && break
            if ! kill -0 "$pid" 2>/dev/null || ((i == 99)); then
                echo "nat.sh: the delay line in $n did not start forwarding:" >&2
                cat "$log" >&2
                ((keep)) || rm -f "$log"
                exit 1
            fi
            sleep 0.05
        done
        # Without LAB_LOG_DIR the log is unlinked at once; the delay line writes on into it.
        ((keep)) || rm -f "$log"
    done
}

up() {
    AGENT_NAT="" CONN_NAT="" V6=0 DELAY_MS=0 DELAYLINE=""
    while (($#)); do
        case "$1" in
            --agent-nat) AGENT_NAT=${2:-}; shift 2 || usage ;;
            --conn-nat) CONN_NAT=${2:-}; shift 2 || usage ;;
            --v6) V6=1; shift ;;
            --delay-ms) DELAY_MS=${2:-}; shift 2 || usage ;;
            --delayline) DELAYLINE=${2:-}; shift 2 || usage ;;
            *) usage ;;
        esac
    done
    for t in "$AGENT_NAT" "$CONN_NAT"; do
        [[ " $TYPES " == *" $t "* && -n "$t" ]] || die "--agent-nat and --conn-nat take one of: $TYPES (got '$t')"
    done
    [[ "$DELAY_MS" =~ ^[0-9]+$ ]] || die "--delay-ms takes a whole number of milliseconds"
    if ((DELAY_MS > 0)); then
        [ -x "$DELAYLINE" ] || die "--delay-ms needs --delayline PATH to the ztna-delayline binary (got '$DELAYLINE')"
    fi
    for tool in ip nft ethtool; do
        command -v "$tool" >/dev/null || die "$tool is missing (scripts/install-deps.sh installs it)"
    done

    down
    local used=("${HOSTS[@]}")
    ((DELAY_MS > 0)) && used+=(da dc)
    for h in "${used[@]}"; do
        ip netns add "$(ns "$h")"
        ip -n "$(ns "$h")" link set lo up
        # No duplicate address detection, also for the link-local addresses that every link
        # gets (set before the links exist): until a router's link-local address has passed
        # DAD (a second), it sends no neighbour solicitation and the first IPv6 packets wait.
        in_ns "$h" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    done
    # The delay namespaces' interfaces carry no address at all (not even a link-local one).
    for h in "${used[@]:${#HOSTS[@]}}"; do
        in_ns "$h" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    done
    # Nothing is left half-built: a failing step removes what was made.
    trap 'down' EXIT

    # The internet: a bridge that is also the router between its hosts.
    # A plain switch: floods multicast (neighbour solicitations) instead of learning who listens.
    ip -n "$(ns wan)" link add br0 type bridge mcast_snooping 0
    ip -n "$(ns wan)" link set br0 up
    addr4 wan br0 203.0.113.1/24; addr6 wan br0 2001:db8:f::1/64
    in_ns wan sysctl -qw net.ipv4.ip_forward=1
    ((V6)) && in_ns wan sysctl -qw net.ipv6.conf.all.forwarding=1
    for h in relay evil; do
        veth "$h" eth0 wan "$h"
        ip -n "$(ns wan)" link set dev "$h" master br0
    done
    addr4 relay eth0 203.0.113.10/24; addr4 relay eth0 203.0.113.11/24
    addr6 relay eth0 2001:db8:f::10/64; addr6 relay eth0 2001:db8:f::11/64
    addr4 evil eth0 203.0.113.66/24; addr6 evil eth0 2001:db8:f::66/64
    for h in relay evil; do
        route4 "$h" default via 203.0.113.1
        route6 "$h" default via 2001:db8:f::1
    done

    # The two home networks.
    wan_link a; wan_link c
    veth ra lan agent eth0
    veth rc lan conn eth0
    router a agent "$AGENT_NAT" 203.0.113.2 2001:db8:f::2 192.0.2.1 2001:db8:a::1 192.0.2.2 2001:db8:a::2
    router c conn "$CONN_NAT" 203.0.113.3 2001:db8:f::3 198.51.100.1 2001:db8:c::1 198.51.100.2 2001:db8:c::2
    wan_routes 192.0.2.0/24 2001:db8:a::/64 203.0.113.2 2001:db8:f::2 "$AGENT_NAT" rc
    wan_routes 198.51.100.0/24 2001:db8:c::/64 203.0.113.3 2001:db8:f::3 "$CONN_NAT" ra

    ((DELAY_MS > 0)) && start_delay_lines
    trap - EXIT
}

# block SIDE: a table of its own at that side's router, so unblock removes exactly it.
block() {
    local except=""
    if [ -n "${2:-}" ]; then
        # Forward sees inbound packets after the NAT's reverse translation and outbound ones
        # before it, so the LAN host's own port is what both carry.
        except="
        iifname \"wan\" oifname \"lan\" udp dport $2 accept
        iifname \"lan\" oifname \"wan\" udp sport $2 accept"
    fi
    in_ns "r$1" nft delete table inet ztna_block 2>/dev/null || true
    in_ns "r$1" nft -f - <<EOF
table inet ztna_block {
    set relay4 { type ipv4_addr; elements = { $RELAY_V4 } }
    set relay6 { type ipv6_addr; elements = { $RELAY_V6 } }
    chain forward {
        type filter hook forward priority filter - 10;$except
        iifname "wan" oifname "lan" meta l4proto udp ip saddr != @relay4 drop
        iifname "lan" oifname "wan" meta l4proto udp ip daddr != @relay4 drop
        iifname "wan" oifname "lan" meta l4proto udp ip6 saddr != @relay6 drop
        iifname "lan" oifname "wan" meta l4proto udp ip6 daddr != @relay6 drop
    }
}
EOF
}

side() {
    case "${1:-}" in
        agent) echo a ;;
        conn) echo c ;;
        *) usage ;;
    esac
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    exec)
        shift
        [[ " ${ALL_NS[*]} " == *" ${1:-?} "* ]] || usage
        n=$(ns "$1")
        shift
        exec ip netns exec "$n" "$@"
        ;;
    block)
        s=$(side "${2:-}")
        case "${3:-}" in
            "") block "$s" ;;
            --except-port) [[ "${4:-}" =~ ^[0-9]+$ ]] || usage; block "$s" "$4" ;;
            *) usage ;;
        esac
        ;;
    unblock) s=$(side "${2:-}"); in_ns "r$s" nft delete table inet ztna_block 2>/dev/null || true ;;
    status)
        for h in "${ALL_NS[@]}"; do
            n=$(ns "$h")
            [ -e "/run/netns/$n" ] || { [[ $h == d? ]] || echo "== $n (absent)"; continue; }
            echo "== $n"
            ip -n "$n" -br addr
            case "$h" in
                ra|rc) ip netns exec "$n" nft list ruleset ;;
                da|dc) echo "processes: $(ip netns pids "$n" | tr '\n' ' ')" ;;
            esac
        done
        ;;
    *) usage ;;
esac
