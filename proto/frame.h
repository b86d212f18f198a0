/* frame.h - the control-plane frame: a fixed little-endian header + one protobuf-c body.
 *
 * Shared by caked and libcake. Parsing is separate from logic: frame_parse_header()
 * validates every field of the header before anything is allocated; bodies are unpacked
 * by the caller with a bounded allocator. proto/README.md is the wire document. */
#ifndef CAKE_FRAME_H
#define CAKE_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define FRAME_MAGIC 0x454b4143u /* "CAKE" little-endian */
#define FRAME_VERSION 1u        /* header layout version (the protocol version is agreed at HELLO) */
#define FRAME_HEADER_BYTES 24u
/* Control messages are small; bulk data (K/V, queries, indicators) goes through shared
 * memory. The largest legitimate body is a DECODE_STEP of a few thousand sequence ids
 * or a metrics dump. */
#define FRAME_MAX_BODY (1u << 20)
#define FRAME_MAX_GPUS 8u       /* GPU pools one caked serves (HELLO lists at most these) */
#define FRAME_FLAG_FDS 0x1u     /* an SCM_RIGHTS fd travels with this frame */
#define FRAME_FLAGS_KNOWN FRAME_FLAG_FDS

/* Message types. A reply carries the request's type with FRAME_REPLY set, or MSG_ERROR. */
enum frame_type {
    MSG_HELLO = 1,
    MSG_SEQ_OPEN = 2,
    MSG_PREFILL_RESERVE = 3,
    MSG_PREFILL_OBSERVE = 4,
    MSG_PREFILL_SUBMIT = 5,
    MSG_DECODE_STEP = 6,
    MSG_SEQ_CLOSE = 7,
    MSG_STATUS = 8,
    MSG_TENANTS = 9,
    MSG_SEQUENCES = 10,
    MSG_SEQ_INFO = 11,
    MSG_METRICS = 12,
    MSG_SET_QUOTA = 13,
    MSG_PING = 14,
    MSG_MAP = 15,     /* caked -> engine only: segments gained or lost, ahead of a reply */
    MSG_POSITIONS = 16,
    MSG_PARK = 17,
    MSG_TYPE_MAX = 17,
    MSG_ERROR = 0x7fff,
};
#define FRAME_REPLY 0x8000u

struct frame_header {
    uint32_t magic;
    uint16_t version;
    uint16_t type;
    uint32_t flags;
    uint32_t body_len;
    uint64_t request_id;
};

void frame_write_header(uint8_t out[FRAME_HEADER_BYTES], const struct frame_header *h);

/* Decodes and validates a header. Returns 0, or a negative CAKE_E* code:
 * CAKE_EPROTO (bad magic, version, flags or type), CAKE_ETOOBIG (body over the cap). */
int frame_parse_header(const uint8_t in[FRAME_HEADER_BYTES], struct frame_header *h);
/* The same without judging the type (frame_reader: an unknown type is the receiver's to
 * answer, the stream stays in step). */
int frame_parse_header_any(const uint8_t in[FRAME_HEADER_BYTES], struct frame_header *h);

const char *frame_type_name(unsigned type);

/* A protobuf-c allocator that refuses to hand out more than `limit` bytes in total, so a
 * hostile body cannot make the unpacker allocate without bound. */
struct frame_alloc {
    size_t used;
    size_t limit;
};
/* Returns a ProtobufCAllocator (as void * to keep protobuf-c out of this header) bound
 * to st; valid while st lives. */
void frame_alloc_init(struct frame_alloc *st, size_t limit, void *allocator_out);

#endif
