/* reader.h - the frame reader caked and libcake share: bytes go in as they arrive, in any
 * pieces (frame_reader_space + frame_reader_wrote after a read, or frame_reader_feed), and
 * whole frames come out (frame_reader_next), as hiredis' reader does for RESP. The partial-
 * read state (how much of a header or body has arrived, what is buffered ahead) lives here
 * and nowhere else.
 *
 * It checks what every frame must satisfy (magic, version, known flags, the body cap, which
 * the caller may lower, e.g. before HELLO) and nothing else: message types are the
 * caller's to judge. An error is sticky: the stream cannot be resynchronised. Memory: at
 * most one frame plus one read ahead, released when a large frame has been taken. */
#ifndef CAKE_READER_H
#define CAKE_READER_H

#include <stddef.h>
#include <stdint.h>

#include "frame.h"

#define FRAME_READER_CHUNK 4096u     /* bytes a read asks for beyond the frame in hand */
#define FRAME_READER_KEEP (64u << 10) /* a larger buffer is freed once it empties */

struct frame_reader {
    uint8_t *buf;            /* buffered bytes are [off, len) */
    size_t off, len, cap;
    uint64_t base;           /* stream offset of buf[0] */
    uint32_t max_body;       /* longer bodies are refused (CAKE_ETOOBIG); <= FRAME_MAX_BODY */
    int err;                 /* sticky: 0, CAKE_EPROTO, CAKE_ETOOBIG */
    struct frame_header bad; /* the header that caused err */
    /* the buffer's memory (frame_reader_set_alloc); malloc and free unless set */
    void *(*alloc)(size_t, void *);
    void (*release)(void *, void *);
    void *ud;
};

void frame_reader_init(struct frame_reader *r, uint32_t max_body);
/* Takes the buffer's memory from alloc/release (libcake: the context's allocator). Before
 * the first byte. */
void frame_reader_set_alloc(struct frame_reader *r, void *(*alloc)(size_t, void *),
                            void (*release)(void *, void *), void *ud);
void frame_reader_free(struct frame_reader *r); /* then it is as after init (same cap) */

/* Where the next read may write: at least *n free bytes (all of the frame in hand that has
 * not arrived, or FRAME_READER_CHUNK). NULL when out of memory. */
void *frame_reader_space(struct frame_reader *r, size_t *n);
/* n bytes were written at frame_reader_space's pointer. */
void frame_reader_wrote(struct frame_reader *r, size_t n);
/* Copies n bytes in. 0 or -ENOMEM. */
int frame_reader_feed(struct frame_reader *r, const void *p, size_t n);

/* The next whole frame: 1 with its header in *h and its body at *body (h->body_len bytes,
 * valid until the next call on r), 0 when more bytes are needed, or the sticky error
 * (CAKE_EPROTO: bad magic, version or flags; CAKE_ETOOBIG: a body over max_body), the
 * refused header in r->bad. */
int frame_reader_next(struct frame_reader *r, struct frame_header *h, const uint8_t **body);

/* Stream offset of the next byte frame_reader_next will look at (bytes taken so far), and
 * of the end of what has arrived. */
static inline uint64_t frame_reader_pos(const struct frame_reader *r) { return r->base + r->off; }
static inline uint64_t frame_reader_end(const struct frame_reader *r) { return r->base + r->len; }
/* Bytes arrived and not yet taken as a frame (nonzero: a frame is partly in). */
static inline size_t frame_reader_pending(const struct frame_reader *r) { return r->len - r->off; }

#endif
