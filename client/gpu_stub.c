/* gpu_stub.c - libcake's GPU path where CUDA is absent: GPU sequences cannot be opened (no
 * GPU pool is ever mapped); these say so if called. */
#include <errno.h>

#include "priv.h"

void cake_gpu_seq_release(cake_seq *s) { (void)s; }

int cake_gpu_put_rows(cake_seq *s, uint32_t l, const uint8_t *src, size_t head_stride,
                      uint32_t n, uint32_t slot0, void *stream)
{
    (void)l, (void)src, (void)head_stride, (void)n, (void)slot0, (void)stream;
    return cake_set_err(s->ctx, -ENOTSUP, "this libcake was built without CUDA");
}

int cake_decode_attention(cake_seq *s, const void *q, float *out, void *stream)
{
    (void)q, (void)out, (void)stream;
    return cake_set_err(s->ctx, -ENOTSUP, "this libcake was built without CUDA");
}
