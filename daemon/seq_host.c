/* seq_host.c - the host executor (seq_int.h): a host sequence's layers scored, selected and
 * compacted by the CPU kernels over its host pool pages; H2O's decode step. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "evict.h"
#include "indicator.h"
#include "seq_int.h"

static int host_score(const struct seq_env *e, struct seq *s, uint32_t layer, int observe,
                      struct seq_result *r)
{
    uint32_t S = seq_scored_len(s);
    float *ind = s->pend_ind = malloc(sizeof(float) * ((size_t)s->Hkv * S + 1));
    if (!ind)
        return -ENOMEM;
    if (S && observe) {
        void **pages = malloc(sizeof(void *) * (s->layer[layer].n_pages + 1));
        if (!pages)
            return -ENOMEM;
        struct kern_kv kv = seq_layer_view(e, s, layer, pages);
        int rc = indicator_layer(&s->cfg, &kv, seq_ring_ptr(e, s, layer), s->lse, s->dt, s->H,
                                 s->cfg.window, S, e->threads, ind, &r->ent, &r->var);
        free(pages);
        return rc;
    }
    if (S) /* the engine's own indicator: copied out of shared memory before use */
        memcpy(ind, seq_indicator_ptr(e, s), sizeof(float) * (size_t)s->Hkv * S);
    return 0;
}

static const float *host_selection(const struct seq *s)
{
    return s->pend_ind;
}

/* Compaction of a host sequence's layer on the CPU (GPU sequences: gpuctx_compact_many). */
static int apply_evict(const struct seq_env *e, struct seq *s, const struct cakeseq_evict *ev,
                       struct seq_result *r)
{
    struct seq_layer *ly = &s->layer[ev->layer];
    void **pages = malloc(sizeof(void *) * (ly->n_pages + 1));
    size_t row = (size_t)s->d * kern_dtype_size(s->dt);
    void *scratch = malloc(2 * row * (ev->kept + 1));
    if (!pages || !scratch) {
        free(pages), free(scratch);
        return -ENOMEM;
    }
    struct kern_kv kv = seq_layer_view(e, s, ev->layer, pages);
    uint32_t win = ly->tokens - ev->old_prefix;
    for (uint32_t g = 0; g < s->Hkv; g++)
        kern_compact_head(&kv, g, ev->slots + (size_t)g * ev->kept, ev->kept, ev->old_prefix,
                          win, scratch);
    r->evicted_tokens += ev->old_prefix - ev->kept;
    ly->tokens = ev->kept + win;
    free(pages), free(scratch);
    return seq_positions_compact(s, ly, ev->slots, ev->kept, ev->old_prefix, win);
}

static int host_compact(const struct seq_env *e, struct seq *s, const struct cakeseq_evict *ev,
                        uint32_t n, struct seq_result *r)
{
    int rc = 0;
    for (uint32_t i = 0; i < n && !rc; i++) {
        rc = apply_evict(e, s, &ev[i], r);
        r->ev_layers[r->n_ev++] = ev[i].layer;
    }
    return rc;
}

static void host_prefill_done(const struct seq_env *e, struct seq *s)
{
    (void)e, (void)s; /* the pending indicator is seq.c's to free */
}

/* The window rows' log-sum-exps for layer l's decode eviction, rows [q_heads][valid] (q:
 * the rows, oldest first, ring slots from `first`): the older rows' carried from the step
 * before (seq_lse_carry, every one finite), the newest's the engine's (cake_put_decode_lse)
 * or a first pass for that row alone; else a first pass for them all. 0 or -ENOMEM/-EINVAL;
 * *given: the engine's were taken with carried ones. */
static int window_lse(const struct seq_env *e, struct seq *s, uint32_t l, const struct kern_kv *kv,
                      const uint8_t *q, uint32_t valid, uint32_t first, float *rows, int *given)
{
    uint32_t w = s->cfg.window, H = s->H;
    size_t row = (size_t)s->d * kern_dtype_size(s->dt);
    const float *c = s->lse_host + (size_t)l * H * w;
    int carry = seq_lse_carry(s, l) && valid > 1;
    for (uint32_t h = 0; carry && h < H; h++)
        for (uint32_t i = 0; carry && i + 1 < valid; i++) {
            float v = c[(size_t)h * w + (first + i) % w];
            rows[(size_t)h * valid + i] = v;
            carry = isfinite(v) != 0;
        }
    struct kern_score_args a = {.q = q, .q_dtype = s->dt, .q_heads = H, .n_q = valid, .kv = kv,
                                .n_threads = 1};
    *given = 0;
    if (!carry) /* the first pass for every row */
        return kern_score_lse(&a, rows);
    float *newest = malloc(sizeof(float) * H + row * H);
    if (!newest)
        return -ENOMEM;
    int rc = 0;
    if ((*given = seq_decode_lse_given(e, s, l, newest)) == 0) { /* a pass for the newest row */
        uint8_t *qn = (uint8_t *)(newest + H);
        for (uint32_t h = 0; h < H; h++)
            memcpy(qn + h * row, q + ((size_t)h * valid + valid - 1) * row, row);
        a.q = qn, a.n_q = 1;
        rc = kern_score_lse(&a, newest);
    }
    for (uint32_t h = 0; !rc && h < H; h++)
        rows[(size_t)h * valid + valid - 1] = newest[h];
    free(newest);
    return rc;
}

/* After layer l's selection (slots [Hkv][kept] ascending) and before its compaction: each
 * window row's log-sum-exp over the cache the eviction leaves, to lse_host by ring slot
 * (kern_lse_carry: its value less the removed keys' terms, NaN where they held more than half
 * the row's weight; rows, [H][valid], are overwritten). Where over half the prefix goes (a
 * re-slice), every row NaN: a first pass over the keys left costs less than the removed
 * ones' terms. */
static int carry_lse(struct seq *s, uint32_t l, const struct kern_kv *kv, const uint8_t *q,
                     uint32_t valid, uint32_t first, float *rows, const uint32_t *slots,
                     uint32_t kept, uint32_t S)
{
    uint32_t w = s->cfg.window, H = s->H;
    float *out = s->lse_host + (size_t)l * H * w;
    struct kern_score_args a = {.q = q, .q_dtype = s->dt, .q_heads = H, .n_q = valid, .kv = kv,
                                .n_scored = S, .n_threads = 1};
    int reslice = 2 * (S - kept) > S, rc = reslice ? 0 : kern_lse_carry(&a, rows, slots, kept, rows);
    for (uint32_t h = 0; !rc && h < H; h++)
        for (uint32_t i = 0; i < valid; i++)
            out[(size_t)h * w + (first + i) % w] = reslice ? NAN : rows[(size_t)h * valid + i];
    return rc;
}

/* Evicts layer l of a decode step (one OpenMP thread per layer; layers share nothing). */
static int decode_evict_layer(const struct seq_env *e, struct seq *s, uint32_t l, uint32_t valid,
                              uint32_t *evicted)
{
    uint32_t w = s->cfg.window;
    size_t row = (size_t)s->d * kern_dtype_size(s->dt);
    struct seq_layer *ly = &s->layer[l];
    uint32_t N = ly->tokens, S = N - w; /* N > budget + w >= valid */
    uint32_t budget = cakeseq_budget(s->cs, l), first = seq_ring_first(s, valid);
    uint8_t *q = malloc(row * s->H * valid);
    uint32_t *slots = malloc(sizeof(uint32_t) * ((size_t)s->Hkv * S + 1));
    float *ind = malloc(sizeof(float) * ((size_t)s->Hkv * S + 1));
    float *rows = s->lse_host ? malloc(sizeof(float) * s->H * valid) : NULL;
    void **pages = malloc(sizeof(void *) * (ly->n_pages + 1));
    void *scratch = malloc(2 * row * (budget < S ? budget : S) + 1);
    int rc = -ENOMEM, given = 0;
    if (q && slots && ind && pages && scratch && (rows || !s->lse_host)) {
        /* the ring's valid rows, oldest first (the newest at seq_ring_newest) */
        const uint8_t *ring = seq_ring_ptr(e, s, l);
        for (uint32_t h = 0; h < s->H; h++)
            for (uint32_t i = 0; i < valid; i++) {
                uint32_t slot = (first + i) % w;
                memcpy(q + ((size_t)h * valid + i) * row, ring + ((size_t)h * w + slot) * row, row);
            }
        struct kern_kv kv = seq_layer_view(e, s, l, pages);
        rc = rows ? window_lse(e, s, l, &kv, q, valid, first, rows, &given) : 0;
        ly->lse_next = 0; /* until this eviction leaves them */
        int kept = rc ? rc : evict_decode_select(&s->cfg, budget, &kv, q, rows, s->dt, s->H, valid, slots, ind, 1);
        rc = kept < 0 ? kept : 0;
        if (!rc && rows && !(rc = carry_lse(s, l, &kv, q, valid, first, rows, slots, (uint32_t)kept, S)))
            ly->lse_next = s->decoded + 1, ly->lse_tokens = (uint32_t)kept + w;
        if (!rc) {
            for (uint32_t g = 0; g < s->Hkv; g++)
                kern_compact_head(&kv, g, slots + (size_t)g * kept, (uint32_t)kept, S, w, scratch);
            *evicted = S - (uint32_t)kept;
            ly->tokens = (uint32_t)kept + w;
            rc = seq_positions_compact(s, ly, slots, (uint32_t)kept, S, w);
        }
    }
    if (!rc && given)
        __atomic_add_fetch(&s->dlse_used, 1, __ATOMIC_RELAXED); /* the layers run side by side */
    free(q), free(slots), free(ind), free(rows), free(pages), free(scratch);
    return rc;
}

static void host_decode_evict(const struct seq_env *e, struct seq *s, const uint32_t *over,
                              uint32_t n, uint32_t valid, uint32_t *evicted, int *rcs)
{
    /* a decode step waits for its evictions: spread the layers over the job's threads */
#pragma omp parallel for schedule(dynamic, 1) num_threads(kern_threads(0)) if (n > 1)
    for (uint32_t i = 0; i < n; i++)
        rcs[i] = decode_evict_layer(e, s, over[i], valid, &evicted[i]);
}

/* H2O's accumulated scores of layer l, made at its first decode step (or re-slice) from the
 * prefill's window sums of the kept prefix. 0 or -ENOMEM. */
static int h2o_acc(struct seq *s, uint32_t l)
{
    struct seq_layer *ly = &s->layer[l];
    if (ly->acc)
        return 0;
    uint32_t w = s->cfg.window, N = ly->tokens, Hkv = s->Hkv;
    uint32_t cap = N + (s->max_new - s->decoded) + 1, P = cakeseq_prefix_len(s->cs, l);
    if (!(ly->acc = calloc((size_t)Hkv * cap, sizeof(float))))
        return -ENOMEM;
    ly->acc_cap = cap;
    uint32_t nw = s->n < w ? s->n : w;
    for (uint32_t g = 0; g < Hkv; g++)
        for (uint32_t j = 0; j < P && j < N; j++)
            ly->acc[(size_t)g * cap + j] = cakeseq_indicator(s->cs, l, g)[j] * (float)nw;
    return 0;
}

/* Layer l (N tokens, over budget + w) keeps the top `budget` of its first N - w by the
 * accumulated scores (positional order) and the window. */
static int h2o_keep(const struct seq_env *e, struct seq *s, uint32_t l, uint32_t *evicted)
{
    uint32_t w = s->cfg.window, Hkv = s->Hkv;
    size_t row = (size_t)s->d * kern_dtype_size(s->dt);
    struct seq_layer *ly = &s->layer[l];
    uint32_t N = ly->tokens, cap = ly->acc_cap, budget = cakeseq_budget(s->cs, l);
    uint32_t S = N - w, kept = budget < S ? budget : S;
    uint32_t *slots = malloc(sizeof(uint32_t) * ((size_t)Hkv * kept + 1));
    void *scratch = malloc(2 * row * kept + 1);
    void **pages = malloc(sizeof(void *) * (ly->n_pages + 1));
    int rc = -ENOMEM;
    if (slots && scratch && pages) {
        struct kern_kv kv = seq_layer_view(e, s, l, pages);
        for (uint32_t g = 0; g < Hkv; g++) {
            uint32_t *sl = slots + (size_t)g * kept;
            evict_h2o_keep(ly->acc + (size_t)g * cap, cap, S, w, kept, sl);
            kern_compact_head(&kv, g, sl, kept, S, w, scratch);
        }
        *evicted = S - kept;
        ly->tokens = kept + w;
        rc = seq_positions_compact(s, ly, slots, kept, S, w);
    }
    free(slots), free(scratch), free(pages);
    return rc;
}

int seq_host_h2o_trim(const struct seq_env *e, struct seq *s, uint32_t l, uint32_t *evicted)
{
    *evicted = 0;
    int rc = h2o_acc(s, l);
    if (rc || !seq_layer_resliced(s, l))
        return rc;
    return s->layer[l].tokens > s->layer[l].acc_cap ? -EINVAL : h2o_keep(e, s, l, evicted);
}

/* H2O's decode step for layer l: the newest query's attention (group mean) is added to
 * every held token's accumulated score, then an over-budget layer keeps the top `budget`
 * of its first N - w by that score (positional order) and the window. */
static int decode_h2o_layer(const struct seq_env *e, struct seq *s, uint32_t l,
                            uint32_t *evicted)
{
    uint32_t w = s->cfg.window, Hkv = s->Hkv;
    size_t row = (size_t)s->d * kern_dtype_size(s->dt);
    struct seq_layer *ly = &s->layer[l];
    uint32_t N = ly->tokens;
    *evicted = 0;
    int rc = h2o_acc(s, l);
    if (rc)
        return rc;
    if (s->decoded == 0) /* a re-slice before the first token: nothing to add yet */
        return seq_layer_resliced(s, l) ? h2o_keep(e, s, l, evicted) : 0;
    if (N < 2 || N > ly->acc_cap)
        return N > ly->acc_cap ? -EINVAL : 0;
    uint32_t cap = ly->acc_cap, S1 = N - 1;
    uint8_t *q = malloc(row * s->H);
    float *ind = malloc(sizeof(float) * ((size_t)Hkv * S1 + 1));
    void **pages = malloc(sizeof(void *) * (ly->n_pages + 1));
    rc = -ENOMEM;
    if (!q || !ind || !pages)
        goto out;
    const uint8_t *ring = seq_ring_ptr(e, s, l);
    uint32_t newest = seq_ring_newest(s);
    for (uint32_t h = 0; h < s->H; h++)
        memcpy(q + h * row, ring + ((size_t)h * w + newest) * row, row);
    struct kern_kv kv = seq_layer_view(e, s, l, pages);
    struct kern_score_args a = {
        .q = q, .q_dtype = s->dt, .q_heads = s->H, .n_q = 1, .kv = &kv, .n_scored = S1,
        .stats = KERN_STATS_FP32, .n_threads = 1, .pool = KERN_POOL_NONE,
    };
    struct kern_score_out o = {.indicator = ind};
    if ((rc = kern_score_layer(&a, &o)))
        goto out; /* the newest token's attention to itself is not counted */
    evict_h2o_add(ly->acc, cap, ind, Hkv, S1);
    if (policy_decode_should_evict(&s->cfg, cakeseq_budget(s->cs, l), N) ||
        seq_layer_resliced(s, l))
        rc = h2o_keep(e, s, l, evicted);
out:
    free(q), free(ind), free(pages);
    return rc;
}

void seq_host_h2o_step(const struct seq_env *e, struct seq *s, uint32_t *evicted, int *rcs)
{
#pragma omp parallel for schedule(dynamic, 1) num_threads(kern_threads(0)) if (s->L > 1)
    for (uint32_t l = 0; l < s->L; l++)
        rcs[l] = decode_h2o_layer(e, s, l, &evicted[l]);
}

const struct seq_exec seq_exec_host = {
    .score = host_score, .selection = host_selection, .compact = host_compact,
    .prefill_done = host_prefill_done, .decode_evict = host_decode_evict,
};
