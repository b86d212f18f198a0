/* internal.h - what the project's own tools (cachectl, benchmarks) use of libcake beyond
 * the public header: a raw request/reply. Not installed, not exported from libcake.so. */
#ifndef CAKE_INTERNAL_H
#define CAKE_INTERNAL_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

#include "cake/cake.h"

/* Sends one request of `type` with body msg (NULL: empty); on success *body (free with
 * cake_internal_free) holds the reply body of *len bytes. Error replies return their code. */
int cake_internal_rpc(cake_ctx *ctx, uint16_t type, const ProtobufCMessage *msg, uint8_t **body,
                      size_t *len);
void cake_internal_free(cake_ctx *ctx, void *p);
/* An allocator bound to ctx, for unpacking replies. */
ProtobufCAllocator cake_internal_allocator(cake_ctx *ctx);

#endif
