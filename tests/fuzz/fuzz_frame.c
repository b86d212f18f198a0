/* Fuzz target for the control-plane decoder: the frame header, then the body as every
 * message type caked unpacks, through the same bounded allocator. Built as a libFuzzer
 * binary with -DCAKE_FUZZ=ON (clang); its corpus is replayed as an ordinary test. */
#include <stddef.h>
#include <stdint.h>

#include "cake.pb-c.h"
#include "frame.h"

#define TRY(kind)                                                                          \
    do {                                                                                   \
        struct frame_alloc fa;                                                             \
        ProtobufCAllocator al;                                                             \
        frame_alloc_init(&fa, len * 8 + 65536, &al);                                       \
        ProtobufCMessage *m = (ProtobufCMessage *)cake__##kind##__unpack(&al, len, body);  \
        if (m)                                                                             \
            protobuf_c_message_free_unpacked(m, &al);                                      \
        if (fa.used != 0)                                                                  \
            __builtin_trap(); /* the allocator's books must balance */                     \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < FRAME_HEADER_BYTES)
        return 0;
    struct frame_header h;
    if (frame_parse_header(data, &h) == 0 && h.body_len > FRAME_MAX_BODY)
        __builtin_trap(); /* a header that passed must respect the cap */
    const uint8_t *body = data + FRAME_HEADER_BYTES;
    size_t len = size - FRAME_HEADER_BYTES;
    TRY(hello);
    TRY(seq_open);
    TRY(layer_ref);
    TRY(prefill_submit);
    TRY(decode_step);
    TRY(seq_ref);
    TRY(set_quota);
    TRY(error);
    TRY(hello_reply);
    TRY(seq_info);
    return 0;
}
