/* frame.c - frame header codec and the bounded unpack allocator. */
#include <protobuf-c/protobuf-c.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "frame.h"

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)v), put16(p + 2, (uint16_t)(v >> 16)); }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)v), put32(p + 4, (uint32_t)(v >> 32)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
static uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

void frame_write_header(uint8_t out[FRAME_HEADER_BYTES], const struct frame_header *h)
{
    put32(out, h->magic);
    put16(out + 4, h->version);
    put16(out + 6, h->type);
    put32(out + 8, h->flags);
    put32(out + 12, h->body_len);
    put64(out + 16, h->request_id);
}

int frame_parse_header_any(const uint8_t in[FRAME_HEADER_BYTES], struct frame_header *h)
{
    h->magic = get32(in);
    h->version = get16(in + 4);
    h->type = get16(in + 6);
    h->flags = get32(in + 8);
    h->body_len = get32(in + 12);
    h->request_id = get64(in + 16);
    if (h->magic != FRAME_MAGIC || h->version != FRAME_VERSION || (h->flags & ~FRAME_FLAGS_KNOWN))
        return CAKE_EPROTO;
    if (h->body_len > FRAME_MAX_BODY)
        return CAKE_ETOOBIG;
    return 0;
}

int frame_parse_header(const uint8_t in[FRAME_HEADER_BYTES], struct frame_header *h)
{
    int rc = frame_parse_header_any(in, h);
    unsigned t = h->type & ~FRAME_REPLY;
    if (!rc && t != MSG_ERROR && (t == 0 || t > MSG_TYPE_MAX))
        return CAKE_EPROTO;
    return rc;
}

const char *frame_type_name(unsigned type)
{
    static const char *const names[] = {
        "?", "hello", "seq_open", "prefill_reserve", "prefill_observe", "prefill_submit",
        "decode_step", "seq_close", "status", "tenants", "sequences", "seq_info", "metrics",
        "set_quota", "ping", "map", "positions", "park",
    };
    _Static_assert(sizeof names / sizeof names[0] == MSG_TYPE_MAX + 1, "a name per type");
    type &= ~FRAME_REPLY;
    if (type == MSG_ERROR)
        return "error";
    return type <= MSG_TYPE_MAX ? names[type] : "?";
}

/* Each block carries its size in front so frees can be accounted. */
static void *bounded_alloc(void *ud, size_t size)
{
    struct frame_alloc *st = ud;
    if (size > st->limit - st->used || size > st->limit)
        return NULL;
    size_t *p = malloc(size + sizeof(size_t) * 2);
    if (!p)
        return NULL;
    p[0] = size;
    st->used += size;
    return p + 2;
}

static void bounded_free(void *ud, void *ptr)
{
    struct frame_alloc *st = ud;
    if (!ptr)
        return;
    size_t *p = (size_t *)ptr - 2;
    st->used -= p[0];
    free(p);
}

void frame_alloc_init(struct frame_alloc *st, size_t limit, void *allocator_out)
{
    st->used = 0, st->limit = limit;
    ProtobufCAllocator *a = allocator_out;
    a->alloc = bounded_alloc;
    a->free = bounded_free;
    a->allocator_data = st;
}
