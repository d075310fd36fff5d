/* Map layouts shared by the relay's eBPF programs and its user-space loader.
 *
 * This file is the single definition: relay/build.rs compiles the programs against it and
 * generates the Rust types from it with bindgen, so the two sides cannot drift apart.
 * Addresses are stored as 16 bytes (IPv4 as ::ffff:a.b.c.d), ports in network byte order. */
#ifndef ZTNA_MAPS_H
#define ZTNA_MAPS_H

#include <linux/types.h>

/* Relay ids (sessions and connection ids): 8 bytes, the first names the worker. */
#define ZTNA_ID_LEN 8
/* DATA frame: [type][8-byte session id][opaque payload] (docs/PROTOCOL.md). */
#define ZTNA_FRAME_DATA 0x01
#define ZTNA_NOT_QUIC_MASK 0xc0
/* QUIC v1 allows connection ids of at most 20 bytes. */
#define ZTNA_MAX_DCID_LEN 20
/* Worker indexes are one byte. */
#define ZTNA_MAX_WORKERS 256
/* A worker with no CPU to steer to (not pinned). */
#define ZTNA_NO_CPU 0xffffffffu

/* config flags */
/* Every session is mirrored into `sessions`: a DATA frame for an unknown id is dropped in
 * XDP. Cleared by the relay if a mirror update ever fails (then user space decides). */
#define ZTNA_CFG_STRICT_SESSIONS 0x01
/* Forward DATA frames of mirrored sessions in XDP (otherwise only steer and filter). */
#define ZTNA_CFG_FORWARD 0x02
/* Redirect relay packets to the owning worker's CPU through the CPU map. */
#define ZTNA_CFG_STEER_CPU 0x04

/* The single entry of the `config` array map. */
struct ztna_config {
	__u16 relay_port; /* network byte order */
	__u8 workers;     /* number of workers (1..255) */
	__u8 flags;       /* ZTNA_CFG_* */
	__u32 pad;
};

struct ztna_endpoint {
	__u8 addr[16];
	__u16 port; /* network byte order */
	__u8 family; /* 4 or 6 */
	__u8 pad[5];
};

/* Key of `sessions`: the session id exactly as it appears in DATA frames. */
struct ztna_session_key {
	__u8 id[ZTNA_ID_LEN];
};

/* Value of `sessions`. The relay writes the endpoints; XDP writes the last two fields. */
struct ztna_session {
	struct ztna_endpoint side[2]; /* 0: agent, 1: connector */
	__u64 last_seen_ns;           /* CLOCK_MONOTONIC of the last frame XDP forwarded */
	__u64 frames;                 /* frames XDP forwarded */
};

/* Key of `blocklist`; the value is a __u64 expiry time (CLOCK_MONOTONIC ns). */
struct ztna_block_key {
	__u8 addr[16];
};

/* Indexes of the per-CPU `counters` arrays, summed by the relay at scrape time. */
enum ztna_counter {
	/* XDP, packets to the relay port */
	ZTNA_XDP_FORWARD_TX = 0,       /* DATA frame forwarded out of the interface it came in on */
	ZTNA_XDP_FORWARD_REDIRECT,     /* DATA frame forwarded out of another interface */
	ZTNA_XDP_STEER_CPU,            /* passed to the stack on the owning worker's CPU */
	ZTNA_XDP_PASS,                 /* passed to the stack on this CPU */
	ZTNA_XDP_PASS_FAMILY,          /* DATA frame between IPv4 and IPv6: user space forwards */
	ZTNA_XDP_PASS_NO_ROUTE,        /* no usable route/neighbour/egress port: user space forwards */
	ZTNA_XDP_PASS_UNMIRRORED,      /* unknown session while not every session is mirrored */
	ZTNA_XDP_DROP_MALFORMED,       /* bad IP/UDP lengths, or unroutable payload */
	ZTNA_XDP_DROP_FRAGMENT,        /* IP fragment to the relay port */
	ZTNA_XDP_DROP_BLOCKED,         /* QUIC Initial from a blocklisted address */
	ZTNA_XDP_DROP_UNKNOWN_SESSION, /* DATA frame for a session that does not exist */
	ZTNA_XDP_DROP_SPOOFED,         /* DATA frame from an address bound to neither side */
	/* SK_REUSEPORT */
	ZTNA_RP_BY_ID,                 /* socket chosen from the worker byte of the id */
	ZTNA_RP_BY_HASH,               /* socket chosen by the hash of a long-header DCID */
	ZTNA_RP_DEFAULT,               /* left to the kernel (stateless or unroutable datagram) */
	ZTNA_RP_NO_SOCKET,             /* the owning worker's socket was missing */
	ZTNA_COUNTER_MAX,
};

#endif
