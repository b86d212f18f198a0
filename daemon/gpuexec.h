/* gpuexec.h - caked's CUDA execution: streams and workspaces for worker threads, and the
 * CAKE operations on layers whose K/V live in the GPU pool (kernels/kern_cuda.h).
 *
 * A worker takes a context (its own stream, device workspace and pinned staging) for the
 * length of one job and puts it back; contexts are never shared while taken, so jobs of
 * different sequences run on the GPU side by side. Every operation is synchronous for the
 * calling worker (it waits on its own stream) and never touches the event loop, except the
 * decode eviction's launch/ready/land, which the loop itself uses (work.c) with a context
 * it takes without waiting. Without
 * CUDA, gpuexec_stub.c stands in: every function returns -ENOTSUP. */
#ifndef CAKE_GPUEXEC_H
#define CAKE_GPUEXEC_H

#include <stddef.h>
#include <stdint.h>

struct gpuexec;
struct gpuctx;

/* One layer in the GPU pool: pages[i] is the page index of the layer's i-th page. */
struct gpu_layer {
    int dtype;                   /* KERN_F16 or KERN_BF16 */
    uint32_t kv_heads, head_dim, tokens_per_page, n_tokens, n_pages;
    uint8_t *base;               /* device address of the GPU pool */
    uint64_t page_bytes;
    const uint32_t *pages;       /* host */
    size_t v_offset_bytes;
};

/* n contexts on the CUDA device `device`. Returns 0 or -errno with a message in *why. */
int gpuexec_create(struct gpuexec **out, int device, int n, const char **why);
void gpuexec_destroy(struct gpuexec *g);
/* Blocks until a context is free. */
struct gpuctx *gpuexec_take(struct gpuexec *g);
/* A free context, or NULL where every one is taken: never waits (the event loop's). */
struct gpuctx *gpuexec_try_take(struct gpuexec *g);
/* A small device -> host copy from any thread (the loop: it never waits for a context), on a
 * free context, waited for. 0, -EAGAIN (every context taken) or -EIO. */
int gpuexec_peek(struct gpuexec *g, void *dst, const void *src_dev, size_t bytes);
void gpuexec_put(struct gpuexec *g, struct gpuctx *c);

/* One layer's query ring in the GPU pool (proto/shm.h's shm_ring): page i of it is page
 * index pages[i] of the pool at base; rows are [q_heads][w] of the layer's dtype. */
struct gpu_ring {
    uint8_t *base;               /* device address of the GPU pool */
    uint64_t page_bytes;
    const uint32_t *pages;       /* host */
    uint32_t n_pages, q_heads, w, rows_per_page, heads_per_page, pages_per_head;
};

/* How a layer's tokens are ranked on the GPU: the indicators of policy.h (indicator.c's, for
 * CAKE, SnapKV, PyramidKV, Ada-KV, TOVA, StreamingLLM and the ablations). */
struct gpu_rank {
    float gamma;      /* mean + gamma * var of the window's attention */
    int var_only;     /* the variance alone (the ablation) */
    int pool;         /* kern.h's KERN_POOL_AVG, _MAX or _NONE */
    uint32_t radius;  /* pooling over [j - radius, j + radius] */
    int last;         /* the newest query alone (TOVA) */
    int position;     /* no scoring: the sinks, then the most recent (StreamingLLM) */
    uint32_t sinks;
    int shared;       /* one ranking for every kv head, their mean (TOVA) */
};

/* Prefill scoring: the layer's n_scored prefix tokens against the window queries in the
 * ring (all w rows, oldest first from row 0), ranked by rk. Writes the indicator
 * [kv_heads][n_scored] to ind_dev (device) and, when asked (non-NULL), the entropy and
 * variance sums of the window's attention (CAKE's preference, whatever rk ranks by). lse
 * (host, NULL: none): the engine's log-sum-exps of the rows, [q_heads][w]: one pass over
 * the keys. */
int gpuctx_score(struct gpuctx *c, const struct gpu_layer *l, const struct gpu_ring *ring,
                 const float *lse, uint32_t n_scored, const struct gpu_rank *rk, float *ind_dev,
                 double *entropy, double *variance);
/* The same for a caller that must not wait (the event loop), as gpuctx_decode_evict_launch:
 * gpuctx_score_launch returns 0 with the work in flight (the statistics coming back where
 * stats), -EAGAIN where it would have to wait (the scoring's kernels not yet run in this
 * process - a worker's gpuctx_score runs the first of each kind - or the context's buffers
 * too small: it never allocates), -EIO after a failed launch (waited for); gpuctx_ready
 * polls it; gpuctx_score_land then gives the statistics (NULL: not wanted) and returns 0 or
 * -EIO. The context stays taken from the launch to the land. */
int gpuctx_score_launch(struct gpuctx *c, const struct gpu_layer *l, const struct gpu_ring *ring,
                        const float *lse, uint32_t n_scored, const struct gpu_rank *rk,
                        float *ind_dev, int stats);
int gpuctx_score_land(struct gpuctx *c, double *entropy, double *variance);

/* A cascading stage's evictions, all on the GPU, every layer in one pass (three launches,
 * one upload, one wait; every job of one layout): each layer's indicator ind_dev
 * ([kv_heads][old], device) picks the top k per kv head (ties to the lower slot) - or the
 * host chose them (slots: per-head budgets, whose holes the host fills; or a permutation,
 * k = old) - the K/V compact into slots [0, k) with the window [win_start = old, + win_len)
 * after, and the indicator and the positions (pos_dev) follow their tokens ([kv_heads][k]
 * at ind_dev). The host's slots go in its order, a top k in
 * ascending slot order, or, with fill, where the fewest rows move (kern_cuda_compact_many: a
 * kept token below k stays, the holes below k take the kept tokens above it). Returns 0,
 * -EINVAL (a job out of range or of another layout), -ENOMEM or -EIO. */
struct gpu_select {
    struct gpu_layer l;
    float *ind_dev;
    uint32_t old, k, win_start, win_len;
    const uint32_t *slots;       /* host [kv_heads][k] slots below old to keep, or NULL */
    int fill;                    /* top-k jobs: fill the holes below k rather than keep order */
    /* the prefix slots' positions on the device ([kv_heads][pos_stride], old <= pos_stride),
     * or NULL: they follow the tokens (pos_init: none written yet, slot i held position i) */
    uint32_t *pos_dev;
    uint32_t pos_stride;
    int pos_init;
    uint32_t *pos_back;          /* host, or NULL: receives the new positions, head g's k at
                                    pos_back + g * pos_back_pitch */
    size_t pos_back_pitch;
    /* order: the prefix put back in position order (k == old, pos_dev, no slots, no fill; ind_dev
     * may be NULL), every position below pos_span; n_sorted (host [kv_heads]) receives each
     * head's distinct positions below pos_span, k when sound (else the head did not move) */
    int order;
    uint32_t pos_span;
    uint32_t *n_sorted;
};
int gpuctx_select_compact_many(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n);
/* The same launched and landed apart, as gpuctx_score_launch (-EAGAIN: the stage's kernels
 * not yet run in this process, or the buffers too small; -EINVAL: a job out of range, nothing
 * launched); jobs stays valid until gpuctx_select_compact_many_land, which writes what the
 * jobs asked back (n_sorted, pos_back). */
int gpuctx_select_compact_many_launch(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n);
int gpuctx_select_compact_many_land(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n);

/* Device -> host (any memory) copy on the context's stream, waited for. 0 or -EIO. */
int gpuctx_copy_d2h(struct gpuctx *c, void *dst, const void *src_dev, size_t bytes);
/* Rows of 32-bit words from the device to the host, many at once (through the context's
 * pinned staging, one wait): for each r, rows x width words from src (device, row pitch
 * src_pitch words) to dst (host, dst_pitch words). 0, -ENOMEM or -EIO. */
struct gpu_rows {
    uint32_t *dst;
    const uint32_t *src;
    size_t dst_pitch, src_pitch;
    uint32_t width, rows;
};
int gpuctx_fetch_rows(struct gpuctx *c, const struct gpu_rows *r, uint32_t n);
/* Copies host memory of the host pool to the device, in pieces that never cross a segment
 * boundary (base + k * seg_bytes): each host segment is registered with CUDA on its own, and
 * one copy over two registrations is refused. */
int gpuctx_copy_h2d(struct gpuctx *c, void *dst_dev, const void *src, size_t bytes,
                    const void *base, size_t seg_bytes);
/* Parking: n whole pages between the GPU pool (page dev[i] at dev_base) and the host pool
 * (page host[i] at host_base), page_bytes each; to_host: device -> host, else back. On the
 * context's stream, waited for. 0 or -EIO. */
int gpuctx_copy_pages(struct gpuctx *c, uint8_t *dev_base, const uint32_t *dev, uint8_t *host_base,
                      const uint32_t *host, uint32_t n, uint64_t page_bytes, int to_host);
/* Relocation: page src[i] to page dst[i] of one GPU pool (at base) for every i where they
 * differ, page_bytes each; on the context's stream, waited for. 0 or -EIO. */
int gpuctx_copy_pages_d2d(struct gpuctx *c, uint8_t *base, const uint32_t *src, const uint32_t *dst,
                          uint32_t n, uint64_t page_bytes);
/* Device memory for a sequence's prefill indicators (or its decode steps' log-sum-exps),
 * stream-ordered on this context; gpuexec_dev_free (any thread, NULL ok) never waits for the
 * device. gpuctx_dev_fill sets its bytes to `byte` on the context's stream, not waited for:
 * ordered before the context's next work. 0, -ENOMEM or -EIO. */
int gpuctx_dev_alloc(struct gpuctx *c, void **p, size_t bytes);
int gpuctx_dev_fill(struct gpuctx *c, void *p, int byte, size_t bytes);
void gpuexec_dev_free(struct gpuexec *g, void *p);

/* Decode eviction of one layer, all on the GPU: the ring's oldest-first rows are the n_q
 * rows starting at ring row `first` (mod w); score the prefix (n_tokens - w slots) with
 * them (rk: TOVA the newest alone), keep the top k per kv head in positional order (ties to
 * the lower position), compact behind the window. */
struct gpu_evict {
    struct gpu_layer l;
    struct gpu_ring ring;
    uint32_t first, n_q, k;
    struct gpu_rank rk;
    uint32_t *evicted;           /* host [kv_heads][n_tokens - w - k]: receives the removed
                                    slots, ascending */
    float *lse;                  /* device [q_heads][w] or NULL: the window rows' log-sum-exps
                                    carried from step to step (kern_cuda_evict_job.lse); the
                                    layer-by-layer way sets them NaN (not carried) */
    int carry;                   /* lse holds the rows' from the layer's previous step */
    const float *lse_new;        /* host [q_heads] or NULL: with carry, the newest row's
                                    (the engine's, finite), so no pass runs for it */
    uint32_t *order;             /* device [kv_heads][order_cap] or NULL: the prefix's slots in
                                    position order for its first order_n tokens
                                    (kern_cuda_evict_job.order); the one launch then fills
                                    the step's holes and rewrites it, the layer-by-layer way
                                    first puts the prefix back in position order */
    uint32_t order_n, order_cap;
    int layerwise;               /* run layer by layer even where one launch could (tests) */
    int fused;                   /* out: 1 where the one launch ran it (with order: holes
                                    filled, the caller's positions follow seq_positions_fill
                                    and order_n becomes k), 0 layer by layer (the kept slots
                                    shifted in position order) */
};

/* H2O on the GPU, one layer: acc (device [kv_heads][cap]) gains the attention of the ring's
 * row `newest` (group mean, no pooling) over the first n_tokens - 1 slots (add: a decode
 * step; not a re-slice), then, with k != UINT32_MAX, the first n_tokens - w slots keep their
 * top k by acc (positional order, ties to the lower position), K/V and acc compacted behind
 * the window, acc's tail zeroed; the kept slots to keep (host [kv_heads][k]). Waited for. */
struct gpu_h2o {
    struct gpu_layer l;
    struct gpu_ring ring;
    uint32_t newest, k, cap;
    int add;
    float *acc;
    uint32_t *keep;
};
int gpuctx_h2o(struct gpuctx *c, const struct gpu_h2o *j);
/* acc [rows][cap] = scale * src [rows][n] (device, src rows n apart), zero beyond n. */
int gpuctx_h2o_init(struct gpuctx *c, float *acc, uint32_t cap, const float *src, uint32_t rows,
                    uint32_t n, float scale);

/* Runs n evictions (a decode step's layers) and waits for all of them: in one launch
 * (kern_cuda_decode_evict) where the layers share their shapes and ranking and the kernel
 * takes them (mean + gamma * var ranked with average or no pooling: CAKE's and its
 * ablations'), else layer by
 * layer, side by side on the context's streams. Returns 0 or the first error (then the
 * layers' contents are undefined: the CUDA context has failed). */
int gpuctx_decode_evict(struct gpuctx *c, struct gpu_evict *ev, uint32_t n);

/* The same one launch for a caller that must not wait (the event loop), on any thread:
 * gpuctx_decode_evict_launch returns 0 with the work in flight on the context's stream,
 * -ENOTSUP where only gpuctx_decode_evict can run these layers (layer by layer), -EAGAIN
 * where it would have to wait (the kernel not yet loaded in this process - a worker's
 * gpuctx_decode_evict runs the first one - or the context's buffers too small: it never
 * allocates), -EINVAL with nothing launched, -EIO after a failed launch (waited for). While in flight
 * gpuctx_ready answers 1 (done), 0 (running) or -EIO, never waiting; once it is not 0,
 * gpuctx_decode_evict_land (ev as launched, still valid) writes each ev[i].evicted and
 * .fused and returns 0 or -EIO. The context stays taken from the launch to the land. */
int gpuctx_decode_evict_launch(struct gpuctx *c, const struct gpu_evict *ev, uint32_t n);
int gpuctx_ready(struct gpuctx *c);
int gpuctx_decode_evict_land(struct gpuctx *c, struct gpu_evict *ev, uint32_t n);

/* Timing (CAKED_TRACE): with it on, each context keeps where its last one-launch eviction,
 * scoring (gpuctx_score) or cascading stage (gpuctx_select_compact_many) spent its time -
 * host work before the launch (job and page tables made and sent, the buffers grown), the
 * kernels' own time on the device (CUDA events around them), and the whole call - in
 * microseconds, and whether the call grew the context's buffers (cudaFree and
 * cudaMallocHost wait for the device); all 0 after a layer-by-layer eviction. */
struct gpu_times {
    double prep_us, kernel_us, total_us, sync_us; /* sync: the wait for the stream at the end */
    double issue_us;   /* the host's time issuing the kernels (their launches' API calls) */
    double tables_us;  /* a scoring's: the part of prep_us up to its page table's upload */
    int grew;
};
void gpuexec_set_timing(struct gpuexec *g, int on);
void gpuctx_times(const struct gpuctx *c, struct gpu_times *t);

#endif
