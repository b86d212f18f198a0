/* seq_int.h - what seq.c shares with its two executors and with seq_room.c (re-slicing,
 * parking, relocation): where a sequence's pieces are, its page accounting, and the executor
 * interface. The sequence (its pages, accounting, descriptor, window) is seq.c's; how its layers are scored, selected and compacted is an executor's: seq_host.c
 * (the CPU kernels over host pool pages) or seq_gpu.c (the CUDA kernels over GPU pool pages,
 * through gpuexec). Executors run on the worker that has the sequence (seq.h's ownership
 * rule). Not for the rest of the daemon. */
#ifndef CAKE_SEQ_INT_H
#define CAKE_SEQ_INT_H

#include "seq.h"

/* the GPU pool and execution contexts of a GPU sequence's device */
#define GPOOL(e, s) ((e)->gpu_pools[(s)->gpu_dev])
#define GEXEC(e, s) ((e)->gpus[(s)->gpu_dev])

#include "clock.h" /* clock_now_s */
/* The pool holding the sequence's K/V pages (a parked GPU sequence's are in the host's). */
struct pool *seq_kv_pool(const struct seq_env *e, const struct seq *s);
/* Pages the sequence holds (negative: gives back), charged to its tenant: host pool pages,
 * GPU pool pages, or K/V pages wherever seq_kv_pool says they are. */
void seq_account(const struct seq_env *e, struct seq *s, int64_t pages);
void seq_account_gpu(const struct seq_env *e, struct seq *s, int64_t pages);
void seq_account_kv(const struct seq_env *e, struct seq *s, int64_t pages);

/* Prompt tokens before the window (the scored prefix). */
uint32_t seq_scored_len(const struct seq *s);
/* Host sequences: layer l's query ring [q_heads][w][head_dim] in the window. */
void *seq_ring_ptr(const struct seq_env *e, const struct seq *s, uint32_t l);
/* The engine's indicator [kv_heads][S] in the window (either placement). */
float *seq_indicator_ptr(const struct seq_env *e, const struct seq *s);
/* Host sequences: the CPU kernels' view of layer l (pages[] filled, n_pages + 1 of room). */
struct kern_kv seq_layer_view(const struct seq_env *e, const struct seq *s, uint32_t l,
                              void **pages);

/* The engine's log-sum-exps of layer l in the window (shared, the engine may write on):
 * [q_heads][w] f32, the window rows' by row at an observe (cake_put_lse), the decode
 * token's by ring slot at a step (cake_put_decode_lse). */
const float *seq_lse_ptr(const struct seq_env *e, const struct seq *s, uint32_t l);

/* Whether a decode step may carry layer l's window rows' log-sum-exps from the step before
 * (lse_dev or lse_host): that step's eviction left them and the layer only gained this
 * step's token since. */
int seq_lse_carry(const struct seq *s, uint32_t l);
/* Whether a host sequence of this policy carries them (lse_host): fixed mode, a ranking
 * over every window row (not TOVA's newest alone, not positions), not H2O's. */
int seq_host_carries(const struct seq_env *e, const struct policy_cfg *cfg);
/* The engine's log-sum-exps of layer l's newest token for this step (cake_put_decode_lse,
 * the step's request said so): copied to out [q_heads] and checked finite. 1 if so, else 0
 * (out undefined). */
int seq_decode_lse_given(const struct seq_env *e, const struct seq *s, uint32_t l, float *out);

/* A layer's first compaction (host positions): room for its k + win slots and every
 * decode token. 0 or -ENOMEM. */
int seq_positions_alloc(const struct seq *s, struct seq_layer *ly, uint32_t k, uint32_t win);
/* Executors, after compacting layer l: per kv head g, the slots keep[g * k .. + k) of the
 * first `old` (ascending) now lead, the `win` slots from `old` follow them; the layer's
 * positions follow its tokens. 0 or -ENOMEM (charged at open: seq_open's heap bound). */
int seq_positions_compact(const struct seq *s, struct seq_layer *ly, const uint32_t *keep,
                          uint32_t k, uint32_t old, uint32_t win);
/* The same from what left instead of what stayed: per kv head g, the slots ev[g * n_ev ..
 * + n_ev) (ascending, below old) of the first `old` are gone, the rest (the window's `win`
 * after them) moved down in order. 0, -ENOMEM, or -EIO for a list out of order or range. */
int seq_positions_evict(const struct seq *s, struct seq_layer *ly, const uint32_t *ev,
                        uint32_t n_ev, uint32_t old, uint32_t win);
/* The same where the holes were filled (a GPU decode step's one launch given an order):
 * the removed slots below k = old - n_ev (ascending) take the kept slots from k on
 * (ascending), the window moves down to k. */
int seq_positions_fill(const struct seq *s, struct seq_layer *ly, const uint32_t *ev,
                       uint32_t n_ev, uint32_t old, uint32_t win);
/* Each kv head's first n positions put in ascending order (the prefix of a layer whose
 * filled holes the GPU just put back in position order). */
void seq_positions_sort(const struct seq *s, struct seq_layer *ly, uint32_t n);

struct seq_exec {
    /* Prefill: the layer's indicator where its selection will run - scored from the window
     * queries (observe: the entropy and variance sums in r->ent, r->var) or the engine's
     * own - kept in the sequence until compact. 0 or -errno. */
    int (*score)(const struct seq_env *e, struct seq *s, uint32_t layer, int observe,
                 struct seq_result *r);
    /* The indicator cakeseq selects the kept tokens from (host), or NULL: cakeseq gives
     * counts only and compact selects (on the GPU). */
    const float *(*selection)(const struct seq *s);
    /* The controller's decisions ev[n] (a cascading stage): each layer compacted to them
     * (r: tokens evicted, layers compacted). 0 or -errno. */
    int (*compact)(const struct seq_env *e, struct seq *s, const struct cakeseq_evict *ev,
                   uint32_t n, struct seq_result *r);
    /* The prompt's last layer applied: each layer's kept tokens back into positional order
     * where compact left them out of it (decode pools neighbouring slots); NULL: compact
     * keeps order. 0 or -errno. */
    int (*prefill_order)(const struct seq_env *e, struct seq *s);
    /* Prefill done (or the sequence freed): what score kept goes. */
    void (*prefill_done)(const struct seq_env *e, struct seq *s);
    /* Decode: layers over[n] over budget, scored by the ring's `valid` newest rows, evicted
     * to their budgets: tokens evicted in evicted[i], 0 or -errno in rcs[i]. */
    void (*decode_evict)(const struct seq_env *e, struct seq *s, const uint32_t *over,
                         uint32_t n, uint32_t valid, uint32_t *evicted, int *rcs);
};

extern const struct seq_exec seq_exec_host, seq_exec_gpu;

static inline const struct seq_exec *seq_exec(const struct seq *s)
{
    return s->gpu ? &seq_exec_gpu : &seq_exec_host;
}

/* The query ring's slot of the newest row: the last decode step's token's, or before the
 * first step the prompt's last (the prompt's rows fill slots 0.. oldest first). */
static inline uint32_t seq_ring_newest(const struct seq *s)
{
    uint32_t w = s->cfg.window, v0 = s->n < w ? s->n : w;
    return (v0 + s->decoded + w - 1) % w;
}
/* The slot of the oldest of the ring's `valid` newest rows (valid <= w). */
static inline uint32_t seq_ring_first(const struct seq *s, uint32_t valid)
{
    uint32_t w = s->cfg.window;
    return (seq_ring_newest(s) + w + 1 - valid) % w;
}

/* H2O's decode step (host sequences): every layer adds the newest query's attention to its
 * tokens' accumulated scores and, over budget, keeps the top by them; per layer evicted[l],
 * rcs[l]. */
void seq_host_h2o_step(const struct seq_env *e, struct seq *s, uint32_t *evicted, int *rcs);
/* H2O on a GPU sequence, every layer: (add: a decode step) each adds the newest query's
 * attention to its tokens' scores on the device, then an over-budget (or re-sliced) layer
 * keeps its top by them; per layer evicted[l], rcs[l]. */
void seq_gpu_h2o(const struct seq_env *e, struct seq *s, int add, uint32_t *evicted, int *rcs);
/* seq_gpu.c: seq_positions' slots [from, from + n) of a layer whose positions are still on
 * the GPU (pos_gpu), copied from there on a free context (the loop never waits for one:
 * -EAGAIN). 0 or -errno. */
int seq_gpu_positions(const struct seq_env *e, const struct seq *s, uint32_t l, uint32_t g,
                      uint32_t from, uint32_t n, uint32_t *out);
/* seq_gpu.c: the one-launch decode eviction of layers over[n] (seq.h's
 * seq_decode_evict_launch) for the loop: launch (a context taken without waiting: -EAGAIN
 * where it would wait; -ENOTSUP where the layers need the worker's way; nothing in flight
 * unless 0), ready (1 once done or failed, never waits), land (positions and counts as
 * decode_evict's; frees f; 0 or -errno). */
struct gpu_flight;
int seq_gpu_evict_launch(const struct seq_env *e, struct seq *s, const uint32_t *over,
                         uint32_t nover, uint32_t valid, struct gpu_flight **out);
int seq_gpu_flight_ready(struct gpu_flight *f);
int seq_gpu_evict_land(const struct seq_env *e, struct seq *s, const uint32_t *over,
                       uint32_t nover, struct gpu_flight *f, uint32_t *evicted);
/* seq_gpu.c: a prefill observe's GPU work for the loop (seq.h's seq_prefill_launch), on
 * one context taken without waiting from the scoring's launch to the flight's end: the
 * scoring (-EAGAIN: no context free, the sequence's device buffers not yet made, the
 * kernels not yet run in this process or the context's buffers too small; nothing in
 * flight unless 0), its land (the statistics into r->ent, r->var), the stage of ev[n] on
 * the same context (-EAGAIN / -ENOMEM: a worker's; another error: launched, failed, waited
 * for), its land (the layers' counts as gpu_compact leaves them, into r), and the end (the
 * context back; f freed; NULL: nothing). seq_gpu_flight_ready polls either launch. */
int seq_gpu_score_launch(const struct seq_env *e, struct seq *s, uint32_t layer,
                         struct gpu_flight **out);
int seq_gpu_score_land(const struct seq_env *e, struct seq *s, uint32_t layer,
                       struct gpu_flight *f, struct seq_result *r);
int seq_gpu_stage_launch(const struct seq_env *e, struct seq *s, const struct cakeseq_evict *ev,
                         uint32_t n, struct gpu_flight *f);
int seq_gpu_stage_land(const struct seq_env *e, struct seq *s, const struct cakeseq_evict *ev,
                       uint32_t n, struct gpu_flight *f, struct seq_result *r);
void seq_gpu_flight_end(const struct seq_env *e, struct seq *s, struct gpu_flight *f);
/* H2O's re-slice of layer l: over its lowered budget, keeps the top by the scores
 * accumulated so far (nothing added). 0 or -errno. */
int seq_host_h2o_trim(const struct seq_env *e, struct seq *s, uint32_t l, uint32_t *evicted);

#endif
