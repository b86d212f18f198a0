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

int cake_gpu_copy_2d(cake_seq *s, void *dst, size_t dpitch, const void *src, size_t spitch,
                     size_t width, size_t rows, void *stream)
{
    (void)dst, (void)dpitch, (void)src, (void)spitch, (void)width, (void)rows, (void)stream;
    return cake_set_err(s->ctx, -ENOTSUP, "this libcake was built without CUDA");
}

int cake_decode_attention(cake_seq *s, const void *q, float *out, void *stream)
{
    (void)q, (void)out, (void)stream;
    return cake_set_err(s->ctx, -ENOTSUP, "this libcake was built without CUDA");
}

int cake_gpu_tables_refresh(cake_seq *const *seqs, size_t n)
{
    (void)seqs, (void)n;
    return 0; /* no sequence has device tables */
}

int cake_device_tables(cake_seq *s, const int32_t **tokens, const int32_t **pages,
                       uint32_t *max_pages)
{
    (void)tokens, (void)pages, (void)max_pages;
    return cake_set_err(s->ctx, -ENOTSUP, "this libcake was built without CUDA");
}

int cake_device_holes(cake_seq *s, const int32_t **holes)
{
    (void)holes;
    return cake_set_err(s->ctx, -ENOTSUP, "this libcake was built without CUDA");
}

int cake_batch_create(cake_ctx *c, cake_seq *const *seqs, size_t n, cake_batch **out)
{
    (void)seqs, (void)n;
    *out = NULL;
    return cake_set_err(c, -ENOTSUP, "this libcake was built without CUDA");
}

int cake_batch_attention(cake_batch *b, uint32_t layer, const void *q, void *out,
                         uint32_t max_tokens, void *stream)
{
    (void)b, (void)layer, (void)q, (void)out, (void)max_tokens, (void)stream;
    return -ENOTSUP; /* never reached: no batch is ever made */
}

void cake_batch_destroy(cake_batch *b) { (void)b; }

int cake_batch_append(cake_batch *b, uint32_t layer, const void *k, const void *v, void *stream)
{
    (void)b, (void)layer, (void)k, (void)v, (void)stream;
    return -ENOTSUP; /* never reached: no batch is ever made */
}

int cake_batch_put_decode_query(cake_batch *b, uint32_t layer, const void *q, void *stream)
{
    (void)b, (void)layer, (void)q, (void)stream;
    return -ENOTSUP; /* never reached: no batch is ever made */
}
