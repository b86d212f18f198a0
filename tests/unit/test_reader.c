/* The frame reader (proto/reader.h): whatever pieces the bytes come in, the same frames come
 * out in order with their stream offsets; errors are sticky and caught at the header; the
 * body cap holds before the body arrives; a large frame's buffer is given back; a custom
 * allocator's books balance. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "reader.h"
#include "testutil.h"

struct frames {
    uint8_t *bytes;
    size_t len;
    size_t n, *start;          /* frame i begins at start[i] */
    struct frame_header *h;
};

/* n random frames (any type, unknown ones included; bodies up to max_body) end to end */
static struct frames make_frames(size_t n, uint32_t max_body)
{
    struct frames f = {0};
    f.n = n;
    f.start = malloc(sizeof(size_t) * n);
    f.h = malloc(sizeof(*f.h) * n);
    for (size_t i = 0; i < n; i++) {
        uint32_t len = tu_below(4) ? tu_below(300) : tu_below(max_body + 1);
        struct frame_header h = {FRAME_MAGIC, FRAME_VERSION, (uint16_t)tu_below(65536),
                                 tu_below(2) ? FRAME_FLAG_FDS : 0, len, tu_next()};
        f.bytes = realloc(f.bytes, f.len + FRAME_HEADER_BYTES + len);
        f.start[i] = f.len, f.h[i] = h;
        frame_write_header(f.bytes + f.len, &h);
        for (uint32_t k = 0; k < len; k++)
            f.bytes[f.len + FRAME_HEADER_BYTES + k] = (uint8_t)tu_next();
        f.len += FRAME_HEADER_BYTES + len;
    }
    return f;
}

static void free_frames(struct frames *f)
{
    free(f->bytes), free(f->start), free(f->h);
}

/* Feeds f in random pieces (one byte at a time when tiny), through space/wrote or feed,
 * taking frames as they complete; every frame must match. */
static void replay(const struct frames *f, int tiny, int use_feed)
{
    struct frame_reader r;
    frame_reader_init(&r, FRAME_MAX_BODY);
    size_t in = 0, got = 0;
    while (got < f->n) {
        struct frame_header h;
        const uint8_t *body;
        uint64_t at = frame_reader_pos(&r);
        int rc = frame_reader_next(&r, &h, &body);
        cr_assert_geq(rc, 0, "error %d at frame %zu", rc, got);
        if (rc == 1) {
            cr_assert_eq(at, f->start[got], "frame %zu at %llu, sent at %zu", got,
                         (unsigned long long)at, f->start[got]);
            cr_assert_eq(memcmp(&h, &f->h[got], sizeof h), 0, "frame %zu's header", got);
            cr_assert_eq(memcmp(body, f->bytes + f->start[got] + FRAME_HEADER_BYTES, h.body_len), 0,
                         "frame %zu's body", got);
            got++;
            continue;
        }
        cr_assert_lt(in, f->len, "bytes all in, frame %zu of %zu not out", got, f->n);
        size_t k = tiny ? 1 : 1 + tu_below(9000);
        k = k < f->len - in ? k : f->len - in;
        if (use_feed) {
            cr_assert_eq(frame_reader_feed(&r, f->bytes + in, k), 0);
        } else {
            size_t room;
            uint8_t *p = frame_reader_space(&r, &room);
            cr_assert_not_null(p);
            cr_assert_geq(room, FRAME_READER_CHUNK);
            k = k < room ? k : room;
            memcpy(p, f->bytes + in, k);
            frame_reader_wrote(&r, k);
        }
        in += k;
    }
    cr_assert_eq(in, f->len);
    cr_assert_eq(frame_reader_pending(&r), 0);
    frame_reader_free(&r);
}

Test(reader, frames_come_out_whole_whatever_the_pieces)
{
    tu_seed();
    for (int round = 0; round < 20; round++) {
        struct frames f = make_frames(1 + tu_below(40), round % 4 ? 20000 : FRAME_MAX_BODY);
        replay(&f, 0, round % 2);
        free_frames(&f);
    }
    struct frames f = make_frames(30, 200); /* byte by byte */
    replay(&f, 1, 0);
    replay(&f, 1, 1);
    free_frames(&f);
}

Test(reader, bad_headers_are_sticky_errors)
{
    struct frame_header bad[] = {
        {0x12345678, FRAME_VERSION, MSG_PING, 0, 0, 1},        /* magic */
        {FRAME_MAGIC, 2, MSG_PING, 0, 0, 1},                  /* header version */
        {FRAME_MAGIC, FRAME_VERSION, MSG_PING, 0x10, 0, 1},   /* unknown flag */
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        struct frame_reader r;
        frame_reader_init(&r, FRAME_MAX_BODY);
        uint8_t b[FRAME_HEADER_BYTES];
        struct frame_header good = {FRAME_MAGIC, FRAME_VERSION, MSG_PING, 0, 0, 7}, h;
        const uint8_t *body;
        frame_write_header(b, &good);
        cr_assert_eq(frame_reader_feed(&r, b, sizeof b), 0);
        cr_assert_eq(frame_reader_next(&r, &h, &body), 1);
        frame_write_header(b, &bad[i]);
        cr_assert_eq(frame_reader_feed(&r, b, sizeof b), 0);
        cr_assert_eq(frame_reader_next(&r, &h, &body), CAKE_EPROTO, "case %zu", i);
        cr_assert_eq(r.bad.request_id, 1);
        frame_write_header(b, &good); /* nothing after it is believed */
        cr_assert_eq(frame_reader_feed(&r, b, sizeof b), 0);
        cr_assert_eq(frame_reader_next(&r, &h, &body), CAKE_EPROTO);
        frame_reader_free(&r);
    }
}

Test(reader, the_body_cap_holds_before_the_body_arrives)
{
    struct frame_reader r;
    frame_reader_init(&r, 4096); /* as caked before HELLO */
    uint8_t b[FRAME_HEADER_BYTES];
    struct frame_header h = {FRAME_MAGIC, FRAME_VERSION, MSG_HELLO, 0, 4097, 3}, g;
    const uint8_t *body;
    frame_write_header(b, &h);
    cr_assert_eq(frame_reader_feed(&r, b, sizeof b), 0);
    cr_assert_eq(frame_reader_next(&r, &g, &body), CAKE_ETOOBIG);
    cr_assert_eq(r.bad.body_len, 4097);
    size_t room;
    cr_assert_not_null(frame_reader_space(&r, &room));
    cr_assert_leq(room, 2 * FRAME_READER_CHUNK, "room asked for a body that was refused");
    frame_reader_free(&r);
    /* over the frame cap itself, whatever the reader's cap */
    frame_reader_init(&r, UINT32_MAX);
    h.body_len = FRAME_MAX_BODY + 1;
    frame_write_header(b, &h);
    cr_assert_eq(frame_reader_feed(&r, b, sizeof b), 0);
    cr_assert_eq(frame_reader_next(&r, &g, &body), CAKE_ETOOBIG);
    frame_reader_free(&r);
}

static size_t live_bytes;
static void *counting_alloc(size_t n, void *ud)
{
    (void)ud;
    size_t *p = malloc(n + sizeof(size_t));
    *p = n, live_bytes += n;
    return p + 1;
}
static void counting_release(void *p, void *ud)
{
    (void)ud;
    size_t *q = (size_t *)p - 1;
    live_bytes -= *q;
    free(q);
}

Test(reader, a_large_frame_s_buffer_is_given_back)
{
    tu_seed();
    struct frame_reader r;
    frame_reader_init(&r, FRAME_MAX_BODY);
    frame_reader_set_alloc(&r, counting_alloc, counting_release, NULL);
    struct frames f = make_frames(1, FRAME_MAX_BODY);
    f.h[0].body_len = FRAME_MAX_BODY; /* the largest there is */
    f.bytes = realloc(f.bytes, FRAME_HEADER_BYTES + FRAME_MAX_BODY);
    frame_write_header(f.bytes, &f.h[0]);
    f.len = FRAME_HEADER_BYTES + FRAME_MAX_BODY;
    cr_assert_eq(frame_reader_feed(&r, f.bytes, f.len), 0);
    struct frame_header h;
    const uint8_t *body;
    cr_assert_eq(frame_reader_next(&r, &h, &body), 1);
    cr_assert_gt(live_bytes, FRAME_MAX_BODY);
    cr_assert_eq(frame_reader_next(&r, &h, &body), 0);
    cr_assert_eq(live_bytes, 0, "%zu bytes kept after the large frame was taken", live_bytes);
    cr_assert_eq(frame_reader_feed(&r, f.bytes, 100), 0);
    cr_assert_gt(live_bytes, 0);
    frame_reader_free(&r);
    cr_assert_eq(live_bytes, 0);
    free_frames(&f);
}
