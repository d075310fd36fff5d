/* The steering rule of proto/src/steering.rs, for eBPF: which worker owns a datagram.
 *   relay DATA frame, QUIC short header: byte 1 (the id's worker byte);
 *   QUIC long header: FNV-1a (32-bit) of the DCID modulo the worker count;
 *   other relay frames: any worker (stateless). */
#ifndef ZTNA_STEERING_H
#define ZTNA_STEERING_H

#include "ztna_maps.h"

#define ZTNA_OWNER_ANY (-1)
#define ZTNA_OWNER_MALFORMED (-2)

#define ZTNA_FNV_BASIS 0x811c9dc5u
#define ZTNA_FNV_PRIME 0x01000193u

/* Owner of a datagram whose first bytes are head[0..head_len) (head_len: bytes available,
 * at most 6 + ZTNA_MAX_DCID_LEN) and whose whole length is len. */
static __always_inline int ztna_owner(const __u8 *head, __u32 head_len, __u32 len, __u8 workers)
{
	if (len < 1 || head_len < 1)
		return ZTNA_OWNER_MALFORMED;
	__u8 first = head[0];
	int by_byte1 = ZTNA_OWNER_MALFORMED;
	if (head_len >= 2 && len > ZTNA_ID_LEN && head[1] < workers)
		by_byte1 = head[1];
	if ((first & ZTNA_NOT_QUIC_MASK) == 0)
		return first == ZTNA_FRAME_DATA ? by_byte1 : ZTNA_OWNER_ANY;
	if ((first & 0x80) == 0)
		return by_byte1;
	if (head_len < 6)
		return ZTNA_OWNER_MALFORMED;
	__u32 dcid_len = head[5];
	if (dcid_len > ZTNA_MAX_DCID_LEN || 6 + dcid_len > head_len)
		return ZTNA_OWNER_MALFORMED;
	__u32 h = ZTNA_FNV_BASIS;
	for (int i = 0; i < ZTNA_MAX_DCID_LEN; i++) {
		if (i >= dcid_len)
			break;
		h ^= head[6 + i];
		h *= ZTNA_FNV_PRIME;
	}
	return workers ? (int)(h % workers) : 0;
}

#endif
