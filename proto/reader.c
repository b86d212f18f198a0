/* reader.c - the frame reader (see reader.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "reader.h"

static void *std_alloc(size_t n, void *ud) { (void)ud; return malloc(n); }
static void std_release(void *p, void *ud) { (void)ud; free(p); }

void frame_reader_init(struct frame_reader *r, uint32_t max_body)
{
    memset(r, 0, sizeof(*r));
    r->max_body = max_body < FRAME_MAX_BODY ? max_body : FRAME_MAX_BODY;
    r->alloc = std_alloc, r->release = std_release;
}

void frame_reader_set_alloc(struct frame_reader *r, void *(*alloc)(size_t, void *),
                            void (*release)(void *, void *), void *ud)
{
    r->alloc = alloc, r->release = release, r->ud = ud;
}

void frame_reader_free(struct frame_reader *r)
{
    if (r->buf)
        r->release(r->buf, r->ud);
    void *(*a)(size_t, void *) = r->alloc;
    void (*f)(void *, void *) = r->release;
    void *ud = r->ud;
    frame_reader_init(r, r->max_body);
    frame_reader_set_alloc(r, a, f, ud);
}

/* The header at the front, if it has arrived and is sane: its frame's total length. */
static size_t frame_len(const struct frame_reader *r)
{
    struct frame_header h;
    if (r->len - r->off < FRAME_HEADER_BYTES || frame_parse_header_any(r->buf + r->off, &h) ||
        h.body_len > r->max_body)
        return 0;
    return FRAME_HEADER_BYTES + (size_t)h.body_len;
}

void *frame_reader_space(struct frame_reader *r, size_t *n)
{
    size_t have = r->len - r->off, total = frame_len(r);
    size_t want = total > have ? total - have : 0;
    want = want > FRAME_READER_CHUNK ? want : FRAME_READER_CHUNK;
    if (r->cap - r->len < want && r->off) { /* the partial frame to the front */
        memmove(r->buf, r->buf + r->off, have);
        r->base += r->off, r->len = have, r->off = 0;
    }
    if (r->cap - r->len < want) {
        size_t cap = r->len + want;
        uint8_t *b = r->alloc(cap, r->ud);
        if (!b)
            return NULL;
        if (r->buf) {
            memcpy(b, r->buf, r->len);
            r->release(r->buf, r->ud);
        }
        r->buf = b, r->cap = cap;
    }
    *n = r->cap - r->len;
    return r->buf + r->len;
}

void frame_reader_wrote(struct frame_reader *r, size_t n)
{
    r->len += n;
}

int frame_reader_feed(struct frame_reader *r, const void *p, size_t n)
{
    while (n) {
        size_t room;
        uint8_t *d = frame_reader_space(r, &room);
        if (!d)
            return -ENOMEM;
        size_t k = room < n ? room : n;
        memcpy(d, p, k);
        frame_reader_wrote(r, k);
        p = (const uint8_t *)p + k, n -= k;
    }
    return 0;
}

int frame_reader_next(struct frame_reader *r, struct frame_header *h, const uint8_t **body)
{
    if (r->err)
        return r->err;
    if (r->off == r->len) { /* empty: start over at the front, and give back a large buffer */
        r->base += r->off, r->off = r->len = 0;
        if (r->cap > FRAME_READER_KEEP) {
            r->release(r->buf, r->ud);
            r->buf = NULL, r->cap = 0;
        }
        return 0;
    }
    size_t have = r->len - r->off;
    if (have < FRAME_HEADER_BYTES)
        return 0;
    int rc = frame_parse_header_any(r->buf + r->off, h);
    if (!rc && h->body_len > r->max_body)
        rc = CAKE_ETOOBIG;
    if (rc) {
        r->bad = *h;
        return r->err = rc;
    }
    if (have - FRAME_HEADER_BYTES < h->body_len)
        return 0;
    *body = r->buf + r->off + FRAME_HEADER_BYTES;
    r->off += FRAME_HEADER_BYTES + (size_t)h->body_len;
    return 1;
}
