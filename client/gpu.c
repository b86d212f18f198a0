/* gpu.c - libcake's GPU path: queries into the paged rings, the device page tables, decode
 * attention straight from the GPU pool - all layers of one sequence, or one layer of a batch
 * (cake.h). Built with CUDA; gpu_stub.c stands in without. */
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
    /* the device page tables (cake_device_tables): int32 tokens[L], the decode query's ring
     * slot of each layer slots[L] (-1: none reserved), then pages[L][max_pages] page
     * indices, then holes[L][kv_heads][2] (cake_device_holes); tab_host is their pinned
     * shadow (what the device holds), refreshed on tab_stream after every call that may
     * change them */
    int32_t *tab_dev, *tab_host;
    cudaStream_t tab_stream;
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
    cudaFree(g->tab_dev);
    cudaFreeHost(g->tab_host);
    if (g->tab_stream)
        cudaStreamDestroy(g->tab_stream);
    free(g);
    s->gpu = NULL;
}

static struct seq_gpu *seq_gpu_of(cake_seq *s)
{
    if (!s->gpu && (s->gpu = calloc(1, sizeof(*s->gpu))) &&
        cudaEventCreateWithFlags(&s->gpu->copied, cudaEventDisableTiming) != cudaSuccess) {
        free(s->gpu);
        s->gpu = NULL;
    }
    return s->gpu;
}

static int grow(cake_seq *s, size_t bytes, size_t ws_bytes)
{
    struct seq_gpu *g = seq_gpu_of(s);
    if (!g)
        return -ENOMEM;
    if (bytes > g->bytes) {
        cudaEventSynchronize(g->copied);
        cudaFree(g->dev), cudaFreeHost(g->host);
        g->dev = g->host = NULL, g->bytes = 0;
        bytes += bytes / 2; /* decode appends pages: leave room */
        if (cudaMalloc((void **)&g->dev, bytes) != cudaSuccess ||
            cudaMallocHost((void **)&g->host, bytes) != cudaSuccess) {
            cudaGetLastError(); /* not sticky: the next launch's check must not see it */
            return -ENOMEM;
        }
        g->bytes = bytes;
    }
    if (ws_bytes > g->ws_bytes) {
        cudaFree(g->ws);
        g->ws = NULL, g->ws_bytes = 0;
        ws_bytes += ws_bytes / 2;
        if (cudaMalloc((void **)&g->ws, ws_bytes) != cudaSuccess) {
            cudaGetLastError();
            return -ENOMEM;
        }
        g->ws_bytes = ws_bytes;
    }
    return 0;
}

/* Every layer's and kv head's hole (Ada-KV: the first slot and count that hold no token;
 * 0, 0 where none) into out [layers][kv_heads][2]; 1 if there is any. */
static int holes_of(const cake_seq *s, int32_t *out)
{
    int any = 0;
    for (uint32_t l = 0; l < s->hdr.layers; l++)
        for (uint32_t g = 0; g < s->hdr.kv_heads; g++) {
            uint32_t first = 0, n = cake_head_holes(s, l, g, &first);
            n = first > INT32_MAX || n > INT32_MAX ? 0 : n;
            out[0] = n ? (int32_t)first : 0, out[1] = (int32_t)n;
            any |= n != 0, out += 2;
        }
    return any;
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
    size_t o_ntok = al(sizeof(void *) * L), o_holes = o_ntok + al(sizeof(uint32_t) * L);
    size_t o_off = o_holes + al(sizeof(int32_t) * 2 * L * d->kv_heads);
    size_t bytes = o_off + sizeof(uint64_t) * L * (size_t)(stride ? stride : 1);
    size_t ws = kern_cuda_attn_workspace(L, d->q_heads, d->head_dim, max_tok);
    int rc = grow(s, bytes, ws);
    if (rc)
        return cake_set_err(c, rc, "cake_decode_attention: out of memory for its buffers");
    struct seq_gpu *g = s->gpu;
    cudaEventSynchronize(g->copied); /* the previous call's upload has read the staging */
    const uint64_t **ptrs = (const uint64_t **)g->host;
    uint32_t *ntok = (uint32_t *)(g->host + o_ntok);
    int32_t *holes = (int32_t *)(g->host + o_holes);
    int any_hole = holes_of(s, holes);
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
                                    (const uint32_t *)(g->dev + o_ntok),
                                    any_hole ? (const int32_t *)(g->dev + o_holes) : NULL,
                                    max_tok, L, d->q_heads,
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

/* The host pool's segments are registered with CUDA one by one (cake.c, host_seg_map), and
 * CUDA refuses a copy whose host range spans two registrations even where the segments lie
 * side by side: a destination in the pool that crosses a segment's end is copied row by row,
 * each row split there. */
int cake_gpu_copy_2d(cake_seq *s, void *dst, size_t dpitch, const void *src, size_t spitch,
                     size_t width, size_t rows, void *stream)
{
    const cake_ctx *c = s->ctx;
    uint8_t *d = dst;
    const uint8_t *from = src;
    size_t span = rows ? (rows - 1) * dpitch + width : 0;
    cudaError_t e = cudaSuccess;
    if (!span || d < c->pool || d >= c->pool + c->pool_bytes || !c->seg_bytes ||
        (size_t)(d - c->pool) / c->seg_bytes == (size_t)(d + span - 1 - c->pool) / c->seg_bytes)
        e = cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyDefault,
                              (cudaStream_t)stream);
    else
        for (size_t r = 0; r < rows && e == cudaSuccess; r++)
            for (size_t at = 0; at < width && e == cudaSuccess;) {
                size_t off = (size_t)(d + r * dpitch + at - c->pool);
                size_t room = c->seg_bytes - off % c->seg_bytes, k = width - at;
                k = k < room ? k : room;
                e = cudaMemcpyAsync(d + r * dpitch + at, from + r * spitch + at, k,
                                    cudaMemcpyDefault, (cudaStream_t)stream);
                at += k;
            }
    return e == cudaSuccess ? 0 : cake_set_err(s->ctx, -EIO, "copy: %s", cudaGetErrorString(e));
}

/* ---- device page tables ---------------------------------------------------- */

/* The CUDA device of the sequence's GPU pool made current; the previous one in *prev. */
static int on_device(const cake_seq *s, int *prev)
{
    cudaGetDevice(prev);
    return cudaSetDevice(s->ctx->gpus[s->gpu_index].gpu.device) == cudaSuccess ? 0 : -EIO;
}

/* Layer l's count and page indices from the descriptor into the shadow (tokens at t, the
 * page row at row); the pages that differ from what the device holds are [*lo, *hi).
 * CAKE_EPROTO where the descriptor disagrees with the pool (the count then -1: the
 * kernels give that layer NaN rather than read outside the pool). */
static int shadow_layer(const cake_seq *s, uint32_t l, int32_t *t, int32_t *row, uint32_t *lo,
                        uint32_t *hi)
{
    uint32_t pages = seq_npages(s, l), tokens = seq_layer(s, l)->tokens;
    const volatile uint64_t *src = seq_pages(s, l);
    uint64_t pb = s->hdr.page_bytes;
    int rc = (uint64_t)tokens > (uint64_t)pages * s->tpp ? CAKE_EPROTO : 0;
    *lo = pages, *hi = 0;
    for (uint32_t i = 0; i < pages; i++) {
        uint64_t off = src[i];
        int32_t idx = off % pb || off >= s->kv_bytes || s->kv_bytes - off < pb ||
                              off / pb > INT32_MAX ? -1 : (int32_t)(off / pb);
        rc = idx < 0 ? CAKE_EPROTO : rc;
        if (row[i] != idx) {
            row[i] = idx;
            *lo = i < *lo ? i : *lo, *hi = i + 1;
        }
    }
    *t = rc ? -1 : (int32_t)tokens;
    return rc;
}

/* Copies what changed of s's tables to the device on its table stream (not waited for). */
static int tables_push(cake_seq *s, int full)
{
    struct seq_gpu *g = s->gpu;
    uint32_t L = s->hdr.layers, mp = s->hdr.max_pages;
    int rc = 0;
    cudaError_t e = cudaSuccess;
    for (uint32_t l = 0; l < L; l++) {
        uint32_t lo, hi;
        int32_t *row = g->tab_host + 2 * (size_t)L + (size_t)l * mp;
        int r = shadow_layer(s, l, &g->tab_host[l], row, &lo, &hi);
        uint32_t slot = cake_decode_slot(s, l);
        g->tab_host[L + l] = slot < s->hdr.window ? (int32_t)slot : -1;
        rc = rc ? rc : r;
        if (full)
            lo = 0, hi = mp;
        if (lo < hi && e == cudaSuccess)
            e = cudaMemcpyAsync(g->tab_dev + 2 * (size_t)L + (size_t)l * mp + lo, row + lo,
                                sizeof(int32_t) * (hi - lo), cudaMemcpyHostToDevice, g->tab_stream);
    }
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(g->tab_dev, g->tab_host, sizeof(int32_t) * 2 * L,
                            cudaMemcpyHostToDevice, g->tab_stream); /* counts and slots */
    size_t o_holes = (size_t)L * (2 + (size_t)mp), nh = (size_t)L * s->hdr.kv_heads * 2;
    int32_t *hs = g->tab_host + o_holes + nh; /* the holes now, beside what the device holds */
    holes_of(s, hs);
    if (e == cudaSuccess && (full || memcmp(hs, hs - nh, sizeof(int32_t) * nh))) {
        memcpy(hs - nh, hs, sizeof(int32_t) * nh);
        e = cudaMemcpyAsync(g->tab_dev + o_holes, hs - nh, sizeof(int32_t) * nh,
                            cudaMemcpyHostToDevice, g->tab_stream);
    }
    if (e != cudaSuccess)
        return cake_set_err(s->ctx, -EIO, "device page tables: %s", cudaGetErrorString(e));
    return rc ? cake_set_err(s->ctx, rc, "a layer's page table disagrees with the GPU pool") : 0;
}

int cake_gpu_tables_refresh(cake_seq *const *seqs, size_t n)
{
    int rc = 0;
    for (size_t i = 0; i < n; i++) /* every copy queued, then every stream waited for */
        if (seqs[i]->gpu && seqs[i]->gpu->tab_dev) {
            int r = tables_push(seqs[i], 0);
            rc = rc ? rc : r;
        }
    for (size_t i = 0; i < n; i++)
        if (seqs[i]->gpu && seqs[i]->gpu->tab_dev &&
            cudaStreamSynchronize(seqs[i]->gpu->tab_stream) != cudaSuccess && !rc)
            rc = cake_set_err(seqs[i]->ctx, -EIO, "device page tables: %s",
                              cudaGetErrorString(cudaGetLastError()));
    return rc;
}

int cake_device_tables(cake_seq *s, const int32_t **tokens, const int32_t **pages,
                       uint32_t *max_pages)
{
    cake_ctx *c = s->ctx;
    if (s->hdr.placement != SHM_PLACE_GPU)
        return cake_set_err(c, CAKE_EINVAL, "device page tables are for GPU sequences");
    struct seq_gpu *g = seq_gpu_of(s);
    if (!g)
        return cake_set_err(c, -ENOMEM, "out of memory");
    if (!g->tab_dev) {
        size_t n = (size_t)s->hdr.layers * (2 + (size_t)s->hdr.max_pages + 2 * s->hdr.kv_heads);
        int prev, rc = on_device(s, &prev);
        if (!rc && (cudaStreamCreateWithFlags(&g->tab_stream, cudaStreamNonBlocking) != cudaSuccess ||
                    cudaMalloc((void **)&g->tab_dev, sizeof(int32_t) * n) != cudaSuccess ||
                    /* the shadow has a second copy of the holes: what they are now */
                    cudaMallocHost((void **)&g->tab_host, sizeof(int32_t) * (n + 2ull * s->hdr.layers *
                                                                             s->hdr.kv_heads)) !=
                        cudaSuccess))
            rc = -ENOMEM;
        cudaGetLastError();
        cudaSetDevice(prev);
        if (rc) {
            cudaFree(g->tab_dev), cudaFreeHost(g->tab_host);
            g->tab_dev = g->tab_host = NULL;
            return cake_set_err(c, rc, "device page tables: no device memory for them");
        }
        memset(g->tab_host, 0xff, sizeof(int32_t) * n); /* pages past a layer's end: -1 */
        if ((rc = tables_push(s, 1)) || (rc = cake_gpu_tables_refresh(&s, 1)))
            return rc;
    }
    if (tokens)
        *tokens = g->tab_dev;
    if (pages)
        *pages = g->tab_dev + 2 * (size_t)s->hdr.layers;
    if (max_pages)
        *max_pages = s->hdr.max_pages;
    return 0;
}

int cake_device_holes(cake_seq *s, const int32_t **holes)
{
    const int32_t *pages;
    uint32_t mp;
    int rc = cake_device_tables(s, NULL, &pages, &mp);
    if (!rc)
        *holes = pages + (size_t)s->hdr.layers * mp;
    return rc;
}

/* ---- one layer of a batch ---------------------------------------------------- */

struct cake_batch {
    cake_ctx *ctx;
    cake_seq **seqs;
    uint32_t n, layers, capacity; /* capacity: the most tokens a sequence's pages hold */
    int device;
    struct kern_cuda_paged pk;
    const int32_t **ptrs;         /* device [layers][4][n]: page rows, counts, ring slots,
                                   * holes ([kv_heads][2]) */
    uint8_t **rings;              /* device [layers][n][q_heads][ring_parts]: where the rows of
                                   * each head's ring part begin (rings never move) */
    uint32_t ring_parts, ring_rows; /* parts a head's ring spans, rows in each part */
    float *ws;
    size_t ws_bytes;
};

int cake_batch_create(cake_ctx *c, cake_seq *const *seqs, size_t n, cake_batch **out)
{
    *out = NULL;
    if (!n || n > UINT32_MAX / 2)
        return cake_set_err(c, CAKE_EINVAL, "a batch holds 1 or more sequences");
    const cake_seq *s0 = seqs[0];
    const struct shm_desc *d0 = &s0->hdr;
    uint32_t cap_pages = 0;
    for (size_t i = 0; i < n; i++) {
        const struct shm_desc *d = &seqs[i]->hdr;
        if (seqs[i]->ctx != c || d->placement != SHM_PLACE_GPU ||
            seqs[i]->gpu_index != s0->gpu_index)
            return cake_set_err(c, CAKE_EINVAL, "a batch is of this context's GPU sequences "
                                                "on one GPU (sequence %zu is not)", i);
        if (d->layers != d0->layers || d->q_heads != d0->q_heads || d->kv_heads != d0->kv_heads ||
            d->head_dim != d0->head_dim || d->dtype != d0->dtype ||
            d->tokens_per_page != d0->tokens_per_page || d->page_bytes != d0->page_bytes ||
            d->window != d0->window ||
            seqs[i]->v_offset != s0->v_offset)
            return cake_set_err(c, CAKE_EINVAL, "sequence %zu's layout differs from the first's", i);
        cap_pages = d->max_pages > cap_pages ? d->max_pages : cap_pages;
    }
    cake_batch *b = calloc(1, sizeof(*b));
    if (!b || !(b->seqs = malloc(sizeof(*b->seqs) * n))) {
        free(b);
        return cake_set_err(c, -ENOMEM, "out of memory");
    }
    memcpy(b->seqs, seqs, sizeof(*seqs) * n);
    b->ctx = c, b->n = (uint32_t)n, b->layers = d0->layers;
    b->capacity = cap_pages * s0->tpp;
    b->device = c->gpus[s0->gpu_index].gpu.device;
    b->pk = (struct kern_cuda_paged){
        .dtype = (int)d0->dtype, .q_heads = d0->q_heads, .kv_heads = d0->kv_heads,
        .head_dim = d0->head_dim, .tokens_per_page = s0->tpp, .max_pages = cap_pages,
        .base = s0->kv_base, .page_bytes = d0->page_bytes,
        .pool_pages = s0->kv_bytes / d0->page_bytes, .v_offset_bytes = s0->v_offset,
    };
    uint32_t L = b->layers, H = d0->q_heads, w = d0->window;
    b->ring_parts = s0->ring.pages_per_head;
    b->ring_rows = b->ring_parts == 1 ? w : s0->ring.rows_per_page;
    size_t np = (size_t)L * 4 * n, nr = (size_t)L * n * H * b->ring_parts;
    const int32_t **host = malloc(sizeof(*host) * np);
    uint8_t **rings = malloc(sizeof(*rings) * nr);
    int rc = host && rings ? 0 : cake_set_err(c, -ENOMEM, "out of memory");
    for (size_t i = 0; i < n && !rc; i++) {
        const int32_t *tok, *pg;
        uint32_t mp;
        if ((rc = cake_device_tables(seqs[i], &tok, &pg, &mp)))
            break;
        for (uint32_t l = 0; l < L; l++) {
            host[((size_t)l * 4) * n + i] = pg + (size_t)l * mp;
            host[((size_t)l * 4 + 1) * n + i] = tok + l;
            host[((size_t)l * 4 + 2) * n + i] = tok + L + l; /* the ring slot */
            host[((size_t)l * 4 + 3) * n + i] = pg + (size_t)L * mp + (size_t)l * d0->kv_heads * 2;
            for (uint32_t h = 0; h < H && !rc; h++)
                for (uint32_t j = 0; j < b->ring_parts && !rc; j++) {
                    uint8_t *row = cake_ring_row(seqs[i], l, h, j * b->ring_rows);
                    rings[(((size_t)l * n + i) * H + h) * b->ring_parts + j] = row;
                    if (!row)
                        rc = cake_set_err(c, CAKE_EPROTO, "sequence %zu's layer %u query ring "
                                                          "is outside this process's mapping", i, l);
                }
        }
    }
    int prev;
    cudaGetDevice(&prev);
    b->ws_bytes = kern_cuda_paged_decode_workspace(b->n, d0->q_heads, d0->head_dim, b->capacity);
    if (!rc && (cudaSetDevice(b->device) != cudaSuccess ||
                cudaMalloc((void **)&b->ptrs, sizeof(*host) * np) != cudaSuccess ||
                cudaMemcpy(b->ptrs, host, sizeof(*host) * np, cudaMemcpyHostToDevice) != cudaSuccess ||
                cudaMalloc((void **)&b->rings, sizeof(*rings) * nr) != cudaSuccess ||
                cudaMemcpy(b->rings, rings, sizeof(*rings) * nr, cudaMemcpyHostToDevice) != cudaSuccess ||
                cudaMalloc((void **)&b->ws, b->ws_bytes) != cudaSuccess)) {
        cudaGetLastError(); /* not sticky: the next launch's check must not see it */
        rc = cake_set_err(c, -ENOMEM, "a batch: no device memory for its tables and workspace");
    }
    cudaSetDevice(prev);
    free(host);
    free(rings);
    if (rc) {
        cake_batch_destroy(b);
        return rc;
    }
    *out = b;
    return 0;
}

void cake_batch_destroy(cake_batch *b)
{
    if (!b)
        return;
    cudaFree(b->ptrs); /* waits for the device */
    cudaFree(b->rings);
    cudaFree(b->ws);
    free(b->seqs);
    free(b);
}

int cake_batch_attention(cake_batch *b, uint32_t layer, const void *q, void *out,
                         uint32_t max_tokens, void *stream)
{
    cake_ctx *c = b->ctx;
    if (layer >= b->layers)
        return cake_set_err(c, CAKE_EINVAL, "layer %u of %u", layer, b->layers);
    if (!max_tokens) /* the counts now (the next call's may differ: not for a graph) */
        for (uint32_t i = 0; i < b->n; i++) {
            uint32_t t = cake_layer_tokens(b->seqs[i], layer);
            max_tokens = t > max_tokens ? t : max_tokens;
        }
    if (max_tokens > b->capacity)
        return cake_set_err(c, CAKE_EINVAL, "max_tokens %u exceeds what the sequences' pages "
                                            "hold (%u)", max_tokens, b->capacity);
    const int32_t *const *pg = b->ptrs + (size_t)layer * 4 * b->n;
    int rc = kern_cuda_paged_decode(&b->pk, pg, pg + b->n, pg + 3 * b->n, b->n,
                                    max_tokens ? max_tokens : 1, q,
                                    out, b->ws, b->ws_bytes, stream);
    if (rc == -EINVAL)
        return cake_set_err(c, CAKE_EINVAL, "batched decode attention supports head_dim 32, 64, "
                                            "128 or 256 and at most 8 query heads per kv head");
    return rc ? cake_set_err(c, rc, "batched decode attention: CUDA launch failed") : 0;
}

int cake_batch_append(cake_batch *b, uint32_t layer, const void *k, const void *v, void *stream)
{
    if (layer >= b->layers)
        return cake_set_err(b->ctx, CAKE_EINVAL, "layer %u of %u", layer, b->layers);
    const int32_t *const *pg = b->ptrs + (size_t)layer * 4 * b->n;
    int rc = kern_cuda_paged_append(&b->pk, pg, pg + b->n, b->n, k, v, stream);
    return rc ? cake_set_err(b->ctx, rc, "batched K/V append: CUDA launch failed") : 0;
}

int cake_batch_put_decode_query(cake_batch *b, uint32_t layer, const void *q, void *stream)
{
    if (layer >= b->layers || !q)
        return cake_set_err(b->ctx, CAKE_EINVAL, "layer %u of %u, or no queries", layer, b->layers);
    const cake_seq *s0 = b->seqs[0];
    const int32_t *const *slots = b->ptrs + ((size_t)layer * 4 + 2) * b->n;
    int rc = kern_cuda_ring_put(b->rings + (size_t)layer * b->n * s0->hdr.q_heads * b->ring_parts,
                                slots, b->n, s0->hdr.q_heads, b->ring_parts, b->ring_rows,
                                s0->hdr.window, (uint32_t)s0->row_bytes, q, stream);
    return rc ? cake_set_err(b->ctx, rc, "batched decode queries: CUDA launch failed") : 0;
}
