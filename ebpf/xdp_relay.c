/* XDP program for the relay's interfaces: filters and steers traffic to the relay port and
 * forwards DATA frames of mirrored sessions without leaving the driver.
 *
 * For each UDP packet to the relay port (IPv4 or IPv6, no VLAN tag):
 *   malformed lengths, IP fragments            -> drop
 *   QUIC Initial from a blocklisted address     -> drop (the handshake rate limiter's list)
 *   DATA frame of a session in `sessions`:
 *       source is neither bound side            -> drop
 *       otherwise rewrite addresses and ports, fix checksums incrementally, find the next
 *       hop with bpf_fib_lookup and send it out (XDP_TX or redirect); anything this path
 *       cannot do (IPv4<->IPv6, no route or neighbour yet) falls through to user space
 *   DATA frame of an unknown session            -> drop (while every session is mirrored)
 *   anything else                               -> to the owning worker's CPU (CPU map)
 * Everything else on the interface is passed untouched. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ztna_maps.h"
#include "steering.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
/* Forwarded packets leave with the hop limit a fresh socket send would use. */
#define ZTNA_TTL 64
#define HEAD_LEN (6 + ZTNA_MAX_DCID_LEN)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ztna_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* the relay sets the real size at load time */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ztna_session_key);
	__type(value, struct ztna_session);
} sessions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ztna_block_key);
	__type(value, __u64);
} blocklist SEC(".maps");

/* worker index -> CPU it is pinned to (ZTNA_NO_CPU: do not steer) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ZTNA_MAX_WORKERS);
	__type(key, __u32);
	__type(value, __u32);
} worker_cpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_CPUMAP);
	__uint(max_entries, 256); /* the relay sets the number of possible CPUs */
	__type(key, __u32);
	__type(value, struct bpf_cpumap_val);
} cpus SEC(".maps");

/* Interfaces XDP may redirect forwarded frames to (the relay's XDP interfaces). */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct bpf_devmap_val);
} tx_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZTNA_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &which);
	if (v)
		*v += 1;
}

static __always_inline int drop(__u32 why)
{
	count(why);
	return XDP_DROP;
}

/* One packet's parsed view. */
struct pkt {
	struct udphdr *udp;
	__u8 *payload;
	__u32 payload_len;
	__u8 family; /* 4 or 6 */
	__u8 src[16] __attribute__((aligned(8))); /* compared as two __u64 */
	__be16 sport;
};

static __always_inline void map_v4(__u8 out[16], __be32 a)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &a, 4);
}

static __always_inline int same_addr(const __u8 a[16], const __u8 b[16])
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline void ipv4_csum(struct iphdr *ip)
{
	__u32 sum = 0;
	__u16 *w = (__u16 *)ip;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += w[i];
	ip->check = ~csum_fold(sum);
}

/* The UDP checksum after the address/port words `from` became `to` (RFC 1624). */
static __always_inline __u16 udp_csum_update(__u16 check, __be32 *from, __be32 *to, __u32 size)
{
	__s64 diff = bpf_csum_diff(from, size, to, size, (__u16)~check);
	__u16 c = ~csum_fold((__u64)diff);
	return c ? c : 0xffff; /* 0 would mean "no checksum" */
}

/* Forwards a DATA frame of session `s` from side `from_side`. Returns an XDP action, or -1
 * to let user space forward it. */
static __always_inline int forward(struct xdp_md *ctx, struct pkt *p, struct ztna_session *s,
				   int from_side, const struct ztna_config *cfg)
{
	/* Fixed offsets (no IPv4 options on this path), checked afresh for the verifier. */
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct ipv6hdr *ip6 = data + sizeof(*eth);
	struct udphdr *udp = p->family == 4 ? (void *)(ip + 1) : (void *)(ip6 + 1);
	if ((void *)(ip6 + 1) > end || (void *)(udp + 1) > end)
		return -1;

	struct ztna_endpoint *dst = &s->side[from_side ^ 1];
	if (dst->family != p->family) {
		count(ZTNA_XDP_PASS_FAMILY);
		return -1;
	}
	struct bpf_fib_lookup fib = {};
	fib.l4_protocol = IPPROTO_UDP;
	fib.ifindex = ctx->ingress_ifindex;
	if (p->family == 4) {
		fib.family = AF_INET;
		fib.tot_len = bpf_ntohs(ip->tot_len);
		__builtin_memcpy(&fib.ipv4_dst, dst->addr + 12, 4);
	} else {
		fib.family = AF_INET6;
		fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
		__builtin_memcpy(fib.ipv6_dst, dst->addr, 16);
	}
	/* A lookup as if forwarding from the ingress interface (the kernel requires forwarding
	 * enabled on it; the relay turns it on for its XDP interfaces). SRC: the kernel picks
	 * the source address a socket send to the same peer would use. */
	long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_SRC);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		count(ZTNA_XDP_PASS_NO_ROUTE);
		return -1;
	}
	__u32 out_if = fib.ifindex;
	int tx = out_if == ctx->ingress_ifindex;
	if (!tx && !bpf_map_lookup_elem(&tx_ports, &out_if)) {
		count(ZTNA_XDP_PASS_NO_ROUTE);
		return -1;
	}

	if (p->family == 4) {
		__be32 from[3] = {ip->saddr, ip->daddr, 0};
		__be32 to[3] = {fib.ipv4_src, 0, 0};
		__builtin_memcpy(&to[1], dst->addr + 12, 4);
		__builtin_memcpy((__u8 *)&from[2], &udp->source, 2);
		__builtin_memcpy((__u8 *)&from[2] + 2, &udp->dest, 2);
		__builtin_memcpy((__u8 *)&to[2], &cfg->relay_port, 2);
		__builtin_memcpy((__u8 *)&to[2] + 2, &dst->port, 2);
		if (udp->check)
			udp->check = udp_csum_update(udp->check, from, to, sizeof(from));
		ip->saddr = to[0];
		ip->daddr = to[1];
		ip->ttl = ZTNA_TTL;
		ipv4_csum(ip);
	} else {
		__be32 from[9], to[9];
		__builtin_memcpy(from, &ip6->saddr, 16);
		__builtin_memcpy(from + 4, &ip6->daddr, 16);
		__builtin_memcpy(to, fib.ipv6_src, 16);
		__builtin_memcpy(to + 4, dst->addr, 16);
		__builtin_memcpy((__u8 *)&from[8], &udp->source, 2);
		__builtin_memcpy((__u8 *)&from[8] + 2, &udp->dest, 2);
		__builtin_memcpy((__u8 *)&to[8], &cfg->relay_port, 2);
		__builtin_memcpy((__u8 *)&to[8] + 2, &dst->port, 2);
		udp->check = udp_csum_update(udp->check, from, to, sizeof(from));
		__builtin_memcpy(&ip6->saddr, to, 16);
		__builtin_memcpy(&ip6->daddr, to + 4, 16);
		ip6->hop_limit = ZTNA_TTL;
	}
	udp->source = cfg->relay_port;
	udp->dest = dst->port;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);

	/* Idle expiry in user space reads this: XDP-forwarded frames never reach it. */
	s->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&s->frames, 1);
	if (tx) {
		count(ZTNA_XDP_FORWARD_TX);
		return XDP_TX;
	}
	count(ZTNA_XDP_FORWARD_REDIRECT);
	return bpf_redirect_map(&tx_ports, out_if, 0);
}

/* Parses Ethernet/IP/UDP. Returns 1 for a packet to the relay port, 0 for anything else
 * (passed untouched), or an XDP_DROP verdict already counted (as a negative number). */
static __always_inline int parse(struct xdp_md *ctx, const struct ztna_config *cfg, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return 0;
	void *l3 = eth + 1;
	__u32 udp_len;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = l3;
		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_UDP)
			return 0;
		__u32 ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip))
			return 0;
		/* A later fragment has no UDP header to look at. */
		if (ip->frag_off & bpf_htons(IP_OFFSET))
			return 0;
		struct udphdr *udp = (void *)ip + ihl;
		if ((void *)(udp + 1) > end || udp->dest != cfg->relay_port)
			return 0;
		if (ip->frag_off & bpf_htons(IP_MF))
			return -ZTNA_XDP_DROP_FRAGMENT - 1;
		__u32 tot = bpf_ntohs(ip->tot_len);
		udp_len = bpf_ntohs(udp->len);
		/* Options are legal but never sent by clients; forward only plain headers. */
		if (ihl != sizeof(*ip) || tot > (__u32)(end - (void *)ip) || udp_len != tot - ihl)
			return -ZTNA_XDP_DROP_MALFORMED - 1;
		p->family = 4;
		p->udp = udp;
		p->sport = udp->source;
		map_v4(p->src, ip->saddr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_UDP)
			return 0;
		struct udphdr *udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > end || udp->dest != cfg->relay_port)
			return 0;
		__u32 plen = bpf_ntohs(ip6->payload_len);
		udp_len = bpf_ntohs(udp->len);
		if (plen > (__u32)(end - (void *)udp) || udp_len != plen)
			return -ZTNA_XDP_DROP_MALFORMED - 1;
		p->family = 6;
		p->udp = udp;
		p->sport = udp->source;
		__builtin_memcpy(p->src, &ip6->saddr, 16);
	} else {
		return 0;
	}
	if (udp_len <= sizeof(struct udphdr))
		return -ZTNA_XDP_DROP_MALFORMED - 1;
	p->payload = (__u8 *)(p->udp + 1);
	p->payload_len = udp_len - sizeof(struct udphdr);
	return 1;
}

SEC("xdp")
int ztna_xdp(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct ztna_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !cfg->relay_port)
		return XDP_PASS;
	struct pkt p = {};
	int r = parse(ctx, cfg, &p);
	if (r == 0)
		return XDP_PASS;
	if (r < 0)
		return drop(-r - 1);

	/* The first bytes, enough for the steering rule; payload_len >= 1 here. */
	__u8 head[HEAD_LEN] = {};
	__u32 head_len = p.payload_len < HEAD_LEN ? p.payload_len : HEAD_LEN;
	__u32 off = (__u32)((void *)p.payload - (void *)(long)ctx->data);
	/* The verifier wants a constant length per call: short payloads byte by byte. */
	if (head_len == HEAD_LEN) {
		if (bpf_xdp_load_bytes(ctx, off, head, HEAD_LEN))
			return drop(ZTNA_XDP_DROP_MALFORMED);
	} else {
		for (__u32 i = 0; i < HEAD_LEN; i++) {
			if (i >= head_len)
				break;
			if (bpf_xdp_load_bytes(ctx, off + i, &head[i], 1))
				return drop(ZTNA_XDP_DROP_MALFORMED);
		}
	}
	__u8 first = head[0];

	/* QUIC Initial (long header, type 0) from an address the rate limiter blocked. */
	if ((first & 0xb0) == 0x80) {
		__u64 *until = bpf_map_lookup_elem(&blocklist, p.src);
		if (until && *until > bpf_ktime_get_ns())
			return drop(ZTNA_XDP_DROP_BLOCKED);
	}

	if (first == ZTNA_FRAME_DATA) {
		if (p.payload_len < 1 + ZTNA_ID_LEN)
			return drop(ZTNA_XDP_DROP_MALFORMED);
		struct ztna_session_key key;
		__builtin_memcpy(key.id, head + 1, ZTNA_ID_LEN);
		struct ztna_session *s = bpf_map_lookup_elem(&sessions, &key);
		if (!s) {
			if (cfg->flags & ZTNA_CFG_STRICT_SESSIONS)
				return drop(ZTNA_XDP_DROP_UNKNOWN_SESSION);
			count(ZTNA_XDP_PASS_UNMIRRORED);
			goto steer;
		}
		int side;
		if (p.sport == s->side[0].port && same_addr(p.src, s->side[0].addr))
			side = 0;
		else if (p.sport == s->side[1].port && same_addr(p.src, s->side[1].addr))
			side = 1;
		else
			return drop(ZTNA_XDP_DROP_SPOOFED);
		if (cfg->flags & ZTNA_CFG_FORWARD) {
			int act = forward(ctx, &p, s, side, cfg);
			if (act >= 0)
				return act;
		}
	}

steer:;
	int owner = ztna_owner(head, head_len, p.payload_len, cfg->workers);
	if (owner == ZTNA_OWNER_MALFORMED && (first & ZTNA_NOT_QUIC_MASK) != 0)
		return drop(ZTNA_XDP_DROP_MALFORMED);
	if (owner >= 0 && (cfg->flags & ZTNA_CFG_STEER_CPU)) {
		__u32 w = owner;
		__u32 *cpu = bpf_map_lookup_elem(&worker_cpu, &w);
		if (cpu && *cpu != ZTNA_NO_CPU && *cpu != bpf_get_smp_processor_id()) {
			count(ZTNA_XDP_STEER_CPU);
			return bpf_redirect_map(&cpus, *cpu, XDP_PASS);
		}
	}
	count(ZTNA_XDP_PASS);
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
