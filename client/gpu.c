/* gpu.c - libcake's GPU path: queries into the paged rings and decode attention straight
 * from the GPU pool (cake.h). Built with CUDA; gpu_stub.c stands in without. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "priv.h"

#include "kern.h"
#include "kern_cuda.h"

/* A sequence's buffers for cake_decode_attention: the page tables of every layer packed in
 * pinned memory ([L] pointers, [L] token counts, [L][stride] offsets), their device copy,
 * and the kernel's split-K workspace. `copied` marks the upload of the last call, so the
 * next call does not overwrite the staging while the copy may still read it. */
struct seq_gpu {
    uint8_t *host, *dev;
    size_t bytes;
    float *ws;
    size_t ws_bytes;
    cudaEvent_t copied;
};

static size_t al(size_t x) { return (x + 255) & ~(size_t)255; }

void cake_gpu_seq_release(cake_seq *s)
{
    struct seq_gpu *g = s->gpu;
    if (!g)
        return;
    if (g->copied)
        cudaEventDestroy(g->copied);
    cudaFree(g->dev); /* waits for the device: no kernel of ours reads them after this */
    cudaFree(g->ws);
    cudaFreeHost(g->host);
    free(g);
    s->gpu = NULL;
}

static int grow(cake_seq *s, size_t bytes, size_t ws_bytes)
{
    struct seq_gpu *g = s->gpu;
    if (!g) {
        if (!(g = calloc(1, sizeof(*g))))
            return -ENOMEM;
        s->gpu = g;
        if (cudaEventCreateWithFlags(&g->copied, cudaEventDisableTiming) != cudaSuccess)
            return -EIO;
    }
    if (bytes > g->bytes) {
        cudaEventSynchronize(g->copied);
        cudaFree(g->dev), cudaFreeHost(g->host);
        g->dev = g->host = NULL, g->bytes = 0;
        bytes += bytes / 2; /* decode appends pages: leave room */
        if (cudaMalloc((void **)&g->dev, bytes) != cudaSuccess ||
            cudaMallocHost((void **)&g->host, bytes) != cudaSuccess)
            return -ENOMEM;
        g->bytes = bytes;
    }
    if (ws_bytes > g->ws_bytes) {
        cudaFree(g->ws);
        g->ws = NULL, g->ws_bytes = 0;
        ws_bytes += ws_bytes / 2;
        if (cudaMalloc((void **)&g->ws, ws_bytes) != cudaSuccess)
            return -ENOMEM;
        g->ws_bytes = ws_bytes;
    }
    return 0;
}

int cake_decode_attention(cake_seq *s, const void *q, float *out, void *stream)
{
    cake_ctx *c = s->ctx;
    const struct shm_desc *d = &s->hdr; /* geometry as checked at open */
    if (d->placement != SHM_PLACE_GPU)
        return cake_set_err(c, CAKE_EINVAL, "cake_decode_attention needs a GPU sequence");
    uint32_t L = d->layers, max_tok = 0, stride = 0;
    for (uint32_t l = 0; l < L; l++) {
        uint32_t pages = seq_layer(s, l)->pages, tokens = seq_layer(s, l)->tokens;
        if (pages > d->max_pages || (uint64_t)tokens > (uint64_t)pages * d->tokens_per_page)
            return cake_set_err(c, CAKE_EPROTO, "layer %u's page table is inconsistent", l);
        max_tok = tokens > max_tok ? tokens : max_tok;
        stride = pages > stride ? pages : stride;
    }
    size_t o_ntok = al(sizeof(void *) * L), o_off = o_ntok + al(sizeof(uint32_t) * L);
    size_t bytes = o_off + sizeof(uint64_t) * L * (size_t)(stride ? stride : 1);
    size_t ws = kern_cuda_attn_workspace(L, d->q_heads, d->head_dim, max_tok);
    int rc = grow(s, bytes, ws);
    if (rc)
        return cake_set_err(c, rc, "cake_decode_attention: out of memory for its buffers");
    struct seq_gpu *g = s->gpu;
    cudaEventSynchronize(g->copied); /* the previous call's upload has read the staging */
    const uint64_t **ptrs = (const uint64_t **)g->host;
    uint32_t *ntok = (uint32_t *)(g->host + o_ntok);
    for (uint32_t l = 0; l < L; l++) {
        /* read once: another writer of the pool cannot make the counts disagree with what
         * was checked above */
        uint32_t pages = seq_npages(s, l), tokens = seq_layer(s, l)->tokens;
        if (pages > stride || (uint64_t)tokens > (uint64_t)pages * d->tokens_per_page ||
            tokens > max_tok)
            return cake_set_err(c, CAKE_EPROTO, "layer %u's page table changed during the call", l);
        uint64_t *dst = (uint64_t *)(g->host + o_off) + (size_t)l * stride;
        const volatile uint64_t *src = seq_pages(s, l);
        for (uint32_t i = 0; i < pages; i++) {
            dst[i] = src[i];
            if (dst[i] > s->kv_bytes || s->kv_bytes - dst[i] < d->page_bytes)
                return cake_set_err(c, CAKE_EPROTO, "layer %u's page %u is outside the GPU pool", l, i);
        }
        ptrs[l] = (const uint64_t *)(g->dev + o_off) + (size_t)l * stride;
        ntok[l] = tokens;
    }
    cudaStream_t st = (cudaStream_t)stream;
    if (cudaMemcpyAsync(g->dev, g->host, bytes, cudaMemcpyHostToDevice, st) != cudaSuccess ||
        cudaEventRecord(g->copied, st) != cudaSuccess)
        return cake_set_err(c, -EIO, "cake_decode_attention: %s", cudaGetErrorString(cudaGetLastError()));
    rc = kern_cuda_decode_attention((int)d->dtype, s->kv_base, (const uint64_t *const *)g->dev,
                                    (const uint32_t *)(g->dev + o_ntok), max_tok, L, d->q_heads,
                                    d->kv_heads, d->head_dim, d->tokens_per_page, s->v_offset, q,
                                    out, g->ws, g->ws_bytes, st);
    if (rc == -EINVAL)
        return cake_set_err(c, CAKE_EINVAL, "cake_decode_attention supports head_dim 32, 64, 128 "
                                            "or 256 and at most 8 query heads per kv head");
    return rc ? cake_set_err(c, rc, "cake_decode_attention: CUDA launch failed") : 0;
}

int cake_gpu_put_rows(cake_seq *s, uint32_t l, const uint8_t *src, size_t head_stride,
                      uint32_t n, uint32_t slot0, void *stream)
{
    cake_ctx *c = s->ctx;
    const struct shm_ring *g = &s->ring;
    size_t row = s->row_bytes, w = s->hdr.window;
    cudaStream_t st = (cudaStream_t)stream;
    if (!n)
        return 0;
    cudaError_t e = cudaSuccess;
    if (g->pages_per_head == 1) { /* heads_per_page whole heads a page: one strided copy each */
        for (uint32_t h0 = 0; h0 < s->hdr.q_heads && e == cudaSuccess; h0 += g->heads_per_page) {
            uint32_t nh = s->hdr.q_heads - h0 < g->heads_per_page ? s->hdr.q_heads - h0
                                                                   : g->heads_per_page;
            uint8_t *dst = cake_ring_row(s, l, h0, slot0);
            if (!dst)
                return cake_set_err(c, CAKE_EPROTO, "layer %u's query ring is outside this "
                                                    "process's mapping of the GPU pool", l);
            e = cudaMemcpy2DAsync(dst, w * row, src + h0 * head_stride, head_stride, n * row, nh,
                                  cudaMemcpyDefault, st);
        }
    } else { /* a head over several pages: one copy per page it touches */
        for (uint32_t h = 0; h < s->hdr.q_heads && e == cudaSuccess; h++)
            for (uint32_t i = 0; i < n && e == cudaSuccess;) {
                uint32_t slot = slot0 + i, k = g->rows_per_page - slot % g->rows_per_page;
                k = k < n - i ? k : n - i;
                uint8_t *dst = cake_ring_row(s, l, h, slot);
                if (!dst)
                    return cake_set_err(c, CAKE_EPROTO, "layer %u's query ring is outside this "
                                                        "process's mapping of the GPU pool", l);
                e = cudaMemcpyAsync(dst, src + h * head_stride + i * row, k * row,
                                    cudaMemcpyDefault, st);
                i += k;
            }
    }
    return e == cudaSuccess ? 0 : cake_set_err(c, -EIO, "queries: %s", cudaGetErrorString(e));
}
