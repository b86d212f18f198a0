/* kern_cuda.h - CAKE's GPU kernels (the .cu files beside it), callable from C.
 *
 * Same contracts as kern.h, on device memory, in bf16 or fp16 (f32 accumulation and
 * statistics: fixed mode's arithmetic). Keys and values are in the pool's page layout: a
 * layer's page p starts at base + page_off[p] (page_off lives on the device). Everything is
 * launched on the caller's stream; nothing synchronizes except where noted. Built only
 * when nvcc is found (CAKE_HAVE_CUDA). */
#ifndef CAKE_KERN_CUDA_H
#define CAKE_KERN_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct kern_cuda_kv {
    int dtype;                 /* KERN_F16 or KERN_BF16 */
    uint32_t kv_heads, head_dim, tokens_per_page, n_tokens;
    uint8_t *base;             /* device */
    const uint64_t *page_off;  /* device, one per page */
    size_t v_offset_bytes;     /* page start -> its V block */
};

/* Workspace bytes kern_cuda_score_layer needs for these sizes. */
size_t kern_cuda_score_workspace(uint32_t kv_heads, uint32_t q_heads, uint32_t n_q, uint32_t n_tokens,
                                 uint32_t n_scored);

/* Window scoring (kern.h's kern_score_layer with KERN_STATS_FP32). q_dev: [q_heads][n_q][d]
 * in the keys' dtype; ind_dev: [kv_heads][n_scored] f32. head_dim must be a multiple of
 * 16 and at most 128; q_heads / kv_heads * n_q at most 256. Synchronizes the stream to
 * return entropy and variance (pass NULL for both to stay asynchronous). Returns 0 or
 * -EINVAL / -EIO (CUDA error, logged). */
int kern_cuda_score_layer(const struct kern_cuda_kv *kv, const void *q_dev, uint32_t q_heads,
                          uint32_t n_q, uint32_t n_scored, float gamma, float *ind_dev,
                          double *entropy, double *variance, void *ws, size_t ws_bytes,
                          void *stream);

/* The same with any of kern.h's poolings (kern_pool: KERN_POOL_AVG, _MAX or _NONE, over
 * [j - radius, j + radius]), each query head's scores pooled, then the group mean, as the
 * reference does (the max, which does not commute with the mean, runs one query head of
 * every group at a time). ws_bytes: kern_cuda_score_pool_workspace. lse_dev (NULL: computed
 * by a first pass over the keys): each window row's log-sum-exp, [q_heads][n_q] f32 on the
 * device (kern.h's kern_score_args.lse): one pass over the keys instead of two. var_only:
 * the indicator is the variance alone (kern.h's kern_score_args.var_only; gamma unused). */
size_t kern_cuda_score_pool_workspace(uint32_t kv_heads, uint32_t q_heads, uint32_t n_q,
                                      uint32_t n_tokens, uint32_t n_scored, int pool);
int kern_cuda_score_layer_pool(const struct kern_cuda_kv *kv, const void *q_dev,
                               const float *lse_dev, uint32_t q_heads, uint32_t n_q,
                               uint32_t n_scored, float gamma, int var_only, int pool,
                               uint32_t radius, float *ind_dev, double *entropy,
                               double *variance, void *ws, size_t ws_bytes, void *stream);
/* The same with the statistics left on the device and nothing waited for: stats_dev[0] the
 * entropy, [1] the variance (the same sums in the same order as the host's; added to what
 * they hold where accumulate), NULL: none. For a caller that must not block (caked's loop). */
int kern_cuda_score_layer_pool_dev(const struct kern_cuda_kv *kv, const void *q_dev,
                                   const float *lse_dev, uint32_t q_heads, uint32_t n_q,
                                   uint32_t n_scored, float gamma, int var_only, int pool,
                                   uint32_t radius, float *ind_dev, double *stats_dev,
                                   int accumulate, void *ws, size_t ws_bytes, void *stream);
/* dst[i] = (first ? 0 : dst[i]) + scale * src[i], i < n. Asynchronous. */
int kern_cuda_accumulate(float *dst, const float *src, size_t n, float scale, int first,
                         void *stream);
/* ind [rows][n]: every column becomes its mean over the rows (one ranking for every kv head:
 * TOVA), the mean taken in double. Asynchronous. */
int kern_cuda_rows_mean(float *ind_dev, uint32_t rows, uint32_t n, void *stream);
/* ind [rows][n] = FLT_MAX for the first `sinks` columns, else the column's index
 * (StreamingLLM: the sinks, then the most recent). Asynchronous. */
int kern_cuda_position_indicator(float *ind_dev, uint32_t rows, uint32_t n, uint32_t sinks,
                                 void *stream);

/* Scoring runs on mma.sync passes with the keys as rows where head_dim is 64 or 128 and the
 * padded window rows fit (score_mma.cu), else on the WMMA passes; nonzero forces the WMMA
 * passes everywhere (for tests and benchmarks that compare the two). Process-wide; returns
 * the previous setting. */
int kern_cuda_score_set_wmma(int on);
/* Both scoring passes (scoring and the one-launch eviction) run on wgmma on a compute
 * capability 9.0 device where their shape fits (head_dim 128, 4 query heads of 32 window rows
 * a kv head), else on mma.sync; zero keeps mma.sync everywhere (the environment's
 * CAKE_WGMMA=0 sets it at start). Process-wide; returns the previous setting. There the
 * passes stage the keys by TMA where the pages allow (kernels/README.md; CAKE_TMA=0 keeps
 * cp.async). */
int kern_cuda_score_set_wgmma(int on);
/* Decode attention (kern_cuda_decode_attention, kern_cuda_paged_decode) runs on the tensor
 * cores (mma.sync) where head_dim is 64 or 128, else on CUDA cores; nonzero forces the CUDA
 * cores everywhere (tests and benchmarks that compare the two). Process-wide; returns the
 * previous setting. */
int kern_cuda_attn_set_simt(int on);
/* The shared-memory carveout (percent of an SM's unified L1 and shared memory) the kernels
 * that fit two big blocks an SM - the scoring passes and the one-launch eviction - ask the
 * driver for from their next launch on (cudaFuncAttributePreferredSharedMemoryCarveout);
 * -1 the driver's own choice; -2 (the default) each kernel's own: 100 for the eviction, the
 * driver's for the scoring passes. Process-wide; returns the previous. For tools/bench-gpu's
 * side by side runs. */
int kern_cuda_set_carveout(int percent);

/* Top-k of each of `rows` score rows of length n (row stride n): positions ascending, ties
 * to the lower position (kern_topk's KERN_ORDER_POSITION). idx_dev: [rows][k]. */
int kern_cuda_topk(const float *score_dev, uint32_t rows, uint32_t n, uint32_t k, uint32_t *idx_dev,
                   void *stream);

/* The same over many blocks per row (rows of thousands of keys would keep a few SMs busy):
 * a launch per step over blocks of 4096 keys, with ws of kern_cuda_topk_workspace(rows, n)
 * bytes; without it (or for short rows) it is kern_cuda_topk. Same result. With the clusters
 * on (below), a compute capability 9.0 device takes rows of up to 256K keys in one launch of
 * a cluster of 8 blocks a row instead (ws unused). */
size_t kern_cuda_topk_workspace(uint32_t rows, uint32_t n);
int kern_cuda_topk_ws(const float *score_dev, uint32_t rows, uint32_t n, uint32_t k,
                      uint32_t *idx_dev, void *ws, size_t ws_bytes, void *stream);
/* Nonzero (the default; the environment's CAKE_TOPK_CLUSTER=0 clears it at start) lets
 * kern_cuda_topk_ws run its clusters. Process-wide; returns the previous setting. */
int kern_cuda_topk_set_cluster(int on);

/* out[r][i] = in[r][keep[r][i]] for rows r < rows, i < k (in: row stride n_in; keep, out: row
 * stride k): a score vector following the tokens a top-k kept. out must not overlap in. */
int kern_cuda_gather_rows_f32(const float *in_dev, uint32_t rows, uint32_t n_in,
                              const uint32_t *keep_dev, uint32_t k, float *out_dev, void *stream);

/* Compaction of every kv head: keep_dev [kv_heads][k] prefix slots (each head its own), then
 * the window [win_start, win_start + win_len). tmp_dev: kv_heads * (k + win_len) rows of K
 * and V (2 * kv_heads * (k + win_len) * head_dim * esize bytes). */
int kern_cuda_compact(const struct kern_cuda_kv *kv, const uint32_t *keep_dev, uint32_t k,
                      uint32_t win_start, uint32_t win_len, void *tmp_dev, void *stream);
/* keep[r][i] = i < n_order ? order[r * order_stride + i] : i for rows r < rows, i < n (keep:
 * row stride n): a decode order (kern_cuda_evict_job.order) as the permutation that puts the
 * prefix back in position order (kern_cuda_compact with k = n). Asynchronous. */
int kern_cuda_order_expand(uint32_t *keep_dev, const uint32_t *order_dev, uint32_t n_order,
                           uint32_t order_stride, uint32_t rows, uint32_t n, void *stream);

/* A cascading stage's compactions, every layer in three launches (top-k, gather, scatter;
 * the per-layer calls above take ~15 a layer): job j is a layer whose kv head g keeps k of
 * its first `old` slots - the top k of ind[g][0..old) (kern_cuda_topk's choice: ties to the
 * lower position, NaN lowest) or, with `slots` set, the ones listed there ([kv_heads][k],
 * below old) - then the window [old, old + win), moved to [k, k + win). The kept tokens go
 * to slots [0, k): in that order (ascending slots for the top k), or, for a top-k job with
 * `fill` set, where the fewest rows move: a kept token below k stays in its slot and the
 * holes below k (the removed slots there, ascending) take the kept tokens from k on
 * (ascending), so slot order no longer follows position order (attention does not care;
 * the caller's positions follow `keep`). keep [kv_heads][k] receives the slot each new
 * slot's token came from, and the indicator follows its tokens (ind [kv_heads][old]
 * becomes [kv_heads][k]; NULL: none, with slots only). tmp: the job's device scratch,
 * kern_cuda_compact_many_tmp bytes. jobs: a device array; max_rows at least every job's
 * k + win (it sizes the grid); k <= old for every job (one above it does nothing). The
 * layout is every job's. With pos set, the original positions of the prefix slots
 * ([kv_heads][pos_stride], device) follow their tokens the same way (pos_init: none written
 * yet, slot i held position i), and with pos_out also land packed there. An order job
 * (k == old, pos set, no slots) puts the prefix back in position order: keep becomes the
 * slots sorted by their positions (each below pos_span, all distinct), and n_sorted[g]
 * receives how many distinct positions below pos_span head g holds (k when sound;
 * otherwise that head moves nothing). A top-k job with keep_given takes keep as its top k
 * (kern_cuda_compact_split, below, fills it). Asynchronous; 0, -EINVAL or -EIO. */
struct kern_cuda_layout {
    int dtype;                  /* KERN_BF16 or KERN_F16 */
    uint32_t kv_heads, head_dim, tokens_per_page;
    uint8_t *base;              /* the pool (device) */
    size_t v_offset_bytes;      /* page start -> its V block */
};
struct kern_cuda_compact_job {
    const uint64_t *page_off;   /* device: the layer's page offsets from base */
    float *ind;                 /* device [kv_heads][old] -> [kv_heads][k], or NULL */
    const uint32_t *slots;      /* device [kv_heads][k], or NULL: the top k of ind */
    uint32_t *keep;             /* device [kv_heads][k]: the kept slots */
    void *tmp;                  /* device: kern_cuda_compact_many_tmp(kv_heads, head_dim, k, win,
                                   order ? pos_span : 0) */
    uint32_t old, k, win;
    int fill;                   /* top-k jobs: fill the holes below k (see above) */
    uint32_t *pos;              /* device [kv_heads][pos_stride] positions, or NULL */
    uint32_t *pos_out;          /* device [kv_heads][k], or NULL: the new positions again,
                                   packed (for one copy to the host) */
    uint32_t pos_stride;
    int pos_init;               /* pos not written yet: slot i holds position i */
    int order;                  /* the prefix sorted by pos (k == old, no slots) */
    uint32_t pos_span;          /* order jobs: every position is below it */
    uint32_t *n_sorted;         /* order jobs: device [kv_heads], the distinct positions */
    int keep_given;             /* top-k jobs: keep already holds each head's top k of ind,
                                   ascending (kern_cuda_compact_split put it there) */
};
size_t kern_cuda_compact_many_tmp(uint32_t kv_heads, uint32_t head_dim, uint32_t k, uint32_t win,
                                  uint32_t pos_span);
int kern_cuda_compact_many(const struct kern_cuda_layout *lay,
                           const struct kern_cuda_compact_job *jobs_dev, uint32_t n_jobs,
                           uint32_t max_rows, void *stream);
/* Before kern_cuda_compact_many, on the host's copy of its jobs (uploaded after this call):
 * the top k of each top-k job (ind set, no slots, not an order job, 0 < k < old) whose rows
 * kern_cuda_topk_ws runs over several blocks without a workspace - a cluster of blocks a row
 * on Hopper, rows of 4K-256K slots - is taken now into its keep, on stream, and the job
 * marked keep_given: kern_cuda_compact_many's first launch, one block a head, would select
 * such a row alone (a prompt's newest layer at 32K: ~110 us on an H100). Returns how many
 * jobs it took, or a negative errno. */
int kern_cuda_compact_split(struct kern_cuda_compact_job *jobs_host, uint32_t n_jobs,
                            uint32_t kv_heads, void *stream);

/* A layer's query ring in pool pages (proto/shm.h's shm_ring: heads_per_page whole heads per
 * page when pages_per_head is 1, else pages_per_head pages of rows_per_page rows per head;
 * page p at base + page_off[p], page_off on the device) gathered into dst [q_heads][n_q]
 * [row_bytes]: row i of head h is the ring's row (first + i) mod w. Asynchronous. */
int kern_cuda_ring_gather(void *dst, const uint8_t *base, const uint64_t *page_off,
                          uint32_t q_heads, uint32_t w, uint32_t row_bytes,
                          uint32_t rows_per_page, uint32_t heads_per_page,
                          uint32_t pages_per_head, uint32_t first, uint32_t n_q, void *stream);
/* One decode query row per (sequence, query head) of a batch into its ring, the slot read
 * on the device (graph capturable): sequence b's head h row goes to
 *   rows[(b * q_heads + h) * parts + slot / part_rows] + (slot % part_rows) * row_bytes
 * with slot = *slots[b] (rows: device pointers to where each part of a head's ring begins;
 * slots: [batch] device pointers). A slot outside [0, w) skips the sequence. q: device
 * [batch][q_heads][row_bytes]. Asynchronous; 0, -EINVAL or -EIO. */
int kern_cuda_ring_put(uint8_t *const *rows, const int32_t *const *slots, uint32_t batch,
                       uint32_t q_heads, uint32_t parts, uint32_t part_rows, uint32_t w,
                       uint32_t row_bytes, const void *q, void *stream);

/* Decode attention for one new token, over many layers in one launch (split-K, flash-
 * decoding style): for layer l and query head h (kv head h / (q_heads / kv_heads)),
 *   out[l][h] = softmax(q[l][h] . K_l^T / sqrt(d)) V_l   over the layer's n_tokens[l] slots,
 * K/V read from the pool's pages of each layer (page_offs[l] is a device pointer to that
 * layer's page offsets; page_offs and n_tokens are device arrays of `layers` entries).
 * q: [layers][q_heads][d] in dtype; out: [layers][q_heads][d] f32. head_dim 128 (or any
 * multiple of 32 up to 256). holes (NULL: none): device [layers][kv_heads][2] int32, the
 * slots (first, count) kv head g of layer l holds no token in (Ada-KV), left out of its
 * softmax. ws: kern_cuda_attn_workspace() bytes. Asynchronous. */
size_t kern_cuda_attn_workspace(uint32_t layers, uint32_t q_heads, uint32_t head_dim, uint32_t max_tokens);
int kern_cuda_decode_attention(int dtype, uint8_t *base, const uint64_t *const *page_offs,
                               const uint32_t *n_tokens, const int32_t *holes,
                               uint32_t max_tokens, uint32_t layers,
                               uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                               uint32_t tokens_per_page, size_t v_offset_bytes, const void *q,
                               float *out, void *ws, size_t ws_bytes, void *stream);

/* One layer's decode attention for a batch of sequences in one launch (graph capturable):
 * for sequence b and query head h (kv head h / (q_heads / kv_heads)),
 *   out[b][h] = softmax(q[b][h] . K_b^T / sqrt(d)) V_b   over its *n_tokens[b] slots,
 * slot t of sequence b in pool page pages[b][t / tokens_per_page] (a page index: the page
 * is at base + index * page_bytes, K as [kv_heads][tokens_per_page][d], V v_offset_bytes
 * after it - FlashInfer's HND layout). pages and n_tokens are device arrays of `batch`
 * device pointers, read by the kernel (the tables may change between launches, the arrays
 * not). q, out: [batch][q_heads][d] in dtype. max_tokens bounds every count (it sizes the
 * grid); a count above it or above max_pages pages, or a page index outside the pool's
 * pool_pages, makes that sequence's rows NaN. holes (NULL: none): `batch` device pointers,
 * each to the sequence's [kv_heads][2] int32 (first slot, count) of slots kv head g holds no
 * token in (Ada-KV's per-head budgets), left out of its softmax.
 * ws: kern_cuda_paged_decode_workspace() bytes. Asynchronous; 0 or -EINVAL / -EIO. */
struct kern_cuda_paged {
    int dtype;
    uint32_t q_heads, kv_heads, head_dim, tokens_per_page, max_pages;
    uint8_t *base;
    uint64_t page_bytes, pool_pages;
    size_t v_offset_bytes;
};
size_t kern_cuda_paged_decode_workspace(uint32_t batch, uint32_t q_heads, uint32_t head_dim,
                                        uint32_t max_tokens);
int kern_cuda_paged_decode(const struct kern_cuda_paged *pk, const int32_t *const *pages,
                           const int32_t *const *n_tokens, const int32_t *const *holes,
                           uint32_t batch, uint32_t max_tokens,
                           const void *q, void *out, void *ws, size_t ws_bytes, void *stream);
/* The same tables: k, v [batch][kv_heads][d] (dtype) into each sequence's newest slot
 * (*n_tokens[b] - 1). A sequence whose count or page is out of bounds is skipped.
 * Asynchronous; 0 or -EINVAL / -EIO. */
int kern_cuda_paged_append(const struct kern_cuda_paged *pk, const int32_t *const *pages,
                           const int32_t *const *n_tokens, uint32_t batch, const void *k,
                           const void *v, void *stream);

/* A decode step's evictions in one launch (evict.cu): job j is one layer with n_tokens
 * slots, the last w its window; its prefix (the first S = n_tokens - w) is scored against
 * the window's queries read from the layer's paged ring (rows (first + i) mod w, i < n_q,
 * oldest first; row i sees the keys up to n_tokens - n_q + i), as kern_cuda_score_layer_pool
 * scores and pools it, without statistics; each kv head keeps its top k (ties to the lower
 * position), the kept slots then the window compacted to the front, in place. The removed
 * slots (S - k a head, ascending) go to the job's `evicted`; with `ind` set, the indicator
 * too. Every job shares the launch-wide shapes and ranking; 0 < S <= max_S and k < S for
 * every job (a job outside these does nothing but set its rows' `lse` NaN). Asynchronous;
 * 0, -EINVAL, -ENOTSUP (shapes or a ranking the one launch does not take:
 * kern_cuda_decode_evict_check says so first) or -EIO.
 *
 * A job's `lse` (device [q_heads][w] floats by ring slot, or NULL) carries its window rows'
 * log-sum-exps (natural log of the scaled logits' exp-sum over the keys a row sees) from one
 * step to the next: the launch writes each of its n_q rows' over the cache it leaves (after
 * the eviction; NaN where the evicted keys held more than half a row's weight, or k = 0).
 * With `carry` set, rows 0..n_q - 2 take theirs from `lse` instead of a first pass over the
 * keys and only the newest row is computed - right when the previous step's launch wrote
 * them and since then the layer only gained its newest token (a row never sees a later key,
 * and every evicted key's term was taken out); a row's value that is not finite makes the
 * head run both passes. With `lse_new` too (the newest row's of each q head, as the engine's
 * decode attention computed it over the same keys) no pass runs for the newest row either:
 * finite ones are taken as they are (one not finite: that kv head's group runs the newest
 * row's first pass). Bytes of other rows
 * are left alone.
 *
 * A job's `order` (device [kv_heads][order_cap] slots, or NULL) lets a step fill its holes
 * instead of shifting every row after them: entry r of a head is the slot holding the
 * prefix's r-th token in position order for r < order_n (order_n <= S, k <= order_cap),
 * and slot r itself past them (tokens that joined the prefix since, in position order).
 * The launch pools the scores in that order (neighbours by position, as CAKE pools), keeps
 * the top k of them (ties to the lower position), and moves the fewest rows: the removed
 * slots below k (ascending) take the kept tokens of slots k..S (ascending), the window
 * moves down to [k, k + w); `evicted` still lists the removed slots ascending, `ind` is in
 * position order, and the head's first k entries of `order` are rewritten for the slots
 * left (the caller's order_n becomes k). With order NULL the prefix is taken to be in
 * position order and the kept slots shift down in order (every row after the first hole
 * moves). */
struct kern_cuda_evict {
    int dtype;                  /* KERN_BF16 or KERN_F16 */
    uint32_t q_heads, kv_heads, head_dim, tokens_per_page, w;
    uint8_t *base;              /* the pool (device) */
    size_t v_offset_bytes;      /* page start -> its V block */
    uint32_t ring_rows_per_page, ring_heads_per_page, ring_pages_per_head; /* shm_ring */
    uint32_t first, n_q;
    float gamma;
    int var_only;               /* the variance alone (gamma unused) */
    int pool;                   /* KERN_POOL_AVG, _NONE, or _MAX with one query head per kv head */
    uint32_t radius;
    /* NULL, or device [n_jobs][kv_heads][KERN_EVICT_CLOCKS]: where each block's time goes
     * (tools/bench-gpu): its SM clock (clock64) when it starts and as each phase ends -
     * pass 1, pass 2 and pooling, top-k with the ordered walk, compaction - then the
     * global timer (ns) at its start and end, then the SM it ran on; a block with nothing
     * to do writes nothing */
    unsigned long long *phase_clock;
};
#define KERN_EVICT_PHASES 4
#define KERN_EVICT_CLOCKS (KERN_EVICT_PHASES + 4)
struct kern_cuda_evict_job {
    const uint64_t *page_off;   /* device: the layer's page offsets from base */
    const uint64_t *ring_off;   /* device: its ring's page offsets from base */
    uint32_t n_tokens, k;
    uint32_t *evicted;          /* device [kv_heads][n_tokens - w - k] */
    float *ind;                 /* device [kv_heads][n_tokens - w], or NULL */
    float *lse;                 /* device [q_heads][w], or NULL: the rows' log-sum-exps */
    uint32_t carry;             /* 1: lse holds the rows' from the step before (above) */
    const float *lse_new;       /* device [q_heads] or NULL: with carry, the newest row's */
    uint32_t *order;            /* device [kv_heads][order_cap], or NULL: fill holes (below) */
    uint32_t order_n, order_cap;
};
int kern_cuda_decode_evict_check(const struct kern_cuda_evict *e, uint32_t max_S);
int kern_cuda_decode_evict(const struct kern_cuda_evict *e,
                           const struct kern_cuda_evict_job *jobs_dev, uint32_t n_jobs,
                           uint32_t max_S, void *stream);

#ifdef __cplusplus
}
#endif
#endif
