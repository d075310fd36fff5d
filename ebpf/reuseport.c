/* SK_REUSEPORT program for the relay's worker sockets: delivers each datagram to the socket
 * of the worker that owns it (the rule of proto/src/steering.rs, in steering.h), so user
 * space rarely has to hand a datagram from one worker to another. Datagrams no worker owns
 * (stateless frames, garbage) are left to the kernel's default hash. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "ztna_maps.h"
#include "steering.h"

#define UDP_HEADER_LEN 8
#define HEAD_LEN (6 + ZTNA_MAX_DCID_LEN)

/* worker index -> that worker's socket */
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, ZTNA_MAX_WORKERS);
	__type(key, __u32);
	__type(value, __u32);
} sockets SEC(".maps");

/* The worker count (one entry). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ztna_config);
} rp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZTNA_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} rp_counters SEC(".maps");

static __always_inline int pass(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&rp_counters, &which);
	if (v)
		*v += 1;
	return SK_PASS;
}

SEC("sk_reuseport")
int ztna_reuseport(struct sk_reuseport_md *md)
{
	__u32 zero = 0;
	struct ztna_config *cfg = bpf_map_lookup_elem(&rp_config, &zero);
	if (!cfg || md->len <= UDP_HEADER_LEN)
		return pass(ZTNA_RP_DEFAULT);
	__u32 len = md->len - UDP_HEADER_LEN;
	__u8 head[HEAD_LEN] = {};
	__u32 head_len = len < HEAD_LEN ? len : HEAD_LEN;
	/* Offsets count from the UDP header; the payload may not be linear, so copy. Short
	 * datagrams byte by byte: the verifier wants a constant length per call. */
	if (head_len == HEAD_LEN) {
		if (bpf_skb_load_bytes(md, UDP_HEADER_LEN, head, HEAD_LEN))
			return pass(ZTNA_RP_DEFAULT);
	} else {
		for (__u32 i = 0; i < HEAD_LEN; i++) {
			if (i >= head_len)
				break;
			if (bpf_skb_load_bytes(md, UDP_HEADER_LEN + i, &head[i], 1))
				return pass(ZTNA_RP_DEFAULT);
		}
	}
	int owner = ztna_owner(head, head_len, len, cfg->workers);
	if (owner < 0)
		return pass(ZTNA_RP_DEFAULT);
	__u32 key = owner;
	if (bpf_sk_select_reuseport(md, &sockets, &key, 0))
		return pass(ZTNA_RP_NO_SOCKET);
	return pass(head[0] & 0x80 ? ZTNA_RP_BY_HASH : ZTNA_RP_BY_ID);
}

char _license[] SEC("license") = "GPL";
