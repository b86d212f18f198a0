/* Frame header codec and the bounded unpack allocator. */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "cake.pb-c.h"
#include "cake/cake.h"
#include "frame.h"
#include "testutil.h"

Test(frame, header_round_trip)
{
    tu_seed();
    for (int i = 0; i < 1000; i++) {
        struct frame_header h = {FRAME_MAGIC, FRAME_VERSION, (uint16_t)(1 + tu_below(MSG_TYPE_MAX)),
                                 tu_below(2), tu_below(FRAME_MAX_BODY + 1), tu_next()}, g;
        if (tu_below(2))
            h.type |= FRAME_REPLY;
        uint8_t b[FRAME_HEADER_BYTES];
        frame_write_header(b, &h);
        cr_assert_eq(frame_parse_header(b, &g), 0);
        cr_assert_eq(memcmp(&h, &g, sizeof h), 0);
    }
}

Test(frame, rejects_bad_headers)
{
    struct frame_header h = {FRAME_MAGIC, FRAME_VERSION, MSG_PING, 0, 0, 1}, g;
    uint8_t b[FRAME_HEADER_BYTES];
    struct frame_header bad[] = {
        {0x12345678, FRAME_VERSION, MSG_PING, 0, 0, 1},        /* magic */
        {FRAME_MAGIC, 2, MSG_PING, 0, 0, 1},                  /* header version */
        {FRAME_MAGIC, FRAME_VERSION, MSG_PING, 0x10, 0, 1},   /* unknown flag */
        {FRAME_MAGIC, FRAME_VERSION, 0, 0, 0, 1},             /* type 0 */
        {FRAME_MAGIC, FRAME_VERSION, MSG_TYPE_MAX + 1, 0, 0, 1},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        frame_write_header(b, &bad[i]);
        cr_assert_eq(frame_parse_header(b, &g), CAKE_EPROTO, "case %zu", i);
    }
    h.body_len = FRAME_MAX_BODY + 1;
    frame_write_header(b, &h);
    cr_assert_eq(frame_parse_header(b, &g), CAKE_ETOOBIG);
    /* little-endian on the wire whatever the host */
    h.body_len = 0x01020304;
    frame_write_header(b, &h);
    cr_assert_eq(b[12], 4);
    cr_assert_eq(b[15], 1);
}

Test(frame, bounded_allocator_refuses_and_balances)
{
    Cake__DecodeStep m = CAKE__DECODE_STEP__INIT;
    uint64_t ids[1000];
    for (int i = 0; i < 1000; i++)
        ids[i] = (uint64_t)i << 40;
    m.n_seq_ids = 1000, m.seq_ids = ids;
    uint8_t buf[16384];
    size_t n = cake__decode_step__pack(&m, buf);
    struct frame_alloc fa;
    ProtobufCAllocator al;
    frame_alloc_init(&fa, 64, &al); /* far too small for 1000 ids */
    cr_assert_null(cake__decode_step__unpack(&al, n, buf));
    cr_assert_eq(fa.used, 0, "a refused unpack must free what it took");
    frame_alloc_init(&fa, n * 8 + 65536, &al);
    Cake__DecodeStep *u = cake__decode_step__unpack(&al, n, buf);
    cr_assert_not_null(u);
    cr_assert_eq(u->n_seq_ids, 1000);
    cr_assert_eq(u->seq_ids[999], ids[999]);
    cr_assert_gt(fa.used, 0);
    cake__decode_step__free_unpacked(u, &al);
    cr_assert_eq(fa.used, 0);
}

Test(frame, error_names)
{
    cr_assert_str_eq(cake_strerror(0), "success");
    cr_assert(strstr(cake_strerror(CAKE_EOOM), "memory"));
    cr_assert_str_eq(cake_strerror(-ENOENT), strerror(ENOENT));
    cr_assert_str_eq(cake_strerror(-99999), "unknown error");
    cr_assert_str_eq(frame_type_name(MSG_DECODE_STEP | FRAME_REPLY), "decode_step");
}
