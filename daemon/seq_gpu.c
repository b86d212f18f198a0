/* seq_gpu.c - the GPU executor (seq_int.h): a GPU sequence's layers scored, selected and
 * compacted by the CUDA kernels (through gpuexec) over its GPU pool pages; the indicators
 * stay in device memory during the prefill. */
#define _GNU_SOURCE /* RUSAGE_THREAD */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "cake/cake.h"
#include "seq_int.h"

/* CAKED_TRACE: this thread's minor page faults so far (fresh memory touched: a host cost the
 * trace's times alone do not name). */
static long thread_faults(void)
{
    struct rusage ru;
    return getrusage(RUSAGE_THREAD, &ru) ? 0 : ru.ru_minflt;
}

/* How the policy ranks a layer's tokens, for the GPU kernels (indicator.c's rules). */
static struct gpu_rank gpu_rank_of(const struct seq *s)
{
    const struct policy_cfg *c = &s->cfg;
    return (struct gpu_rank){
        .gamma = c->indicator == POLICY_IND_MEAN || c->indicator == POLICY_IND_LAST ? 0.0f : c->gamma,
        .var_only = c->indicator == POLICY_IND_VAR,
        .pool = c->pool == POLICY_POOL_MAX    ? KERN_POOL_MAX
                : c->pool == POLICY_POOL_NONE ? KERN_POOL_NONE
                                              : KERN_POOL_AVG,
        .radius = (c->pool_kernel ? c->pool_kernel : 5) / 2,
        .last = c->indicator == POLICY_IND_LAST, .position = c->indicator == POLICY_IND_POSITION,
        .sinks = c->sinks, .shared = c->shared_heads,
    };
}

/* The GPU kernels' view of layer l (GPU sequences). */
static struct gpu_layer gpu_layer_view(const struct seq_env *e, const struct seq *s, uint32_t l)
{
    const struct seq_layer *ly = &s->layer[l];
    return (struct gpu_layer){
        .dtype = s->dt, .kv_heads = s->Hkv, .head_dim = s->d, .tokens_per_page = s->tpp,
        .n_tokens = ly->tokens, .n_pages = ly->n_pages, .base = GPOOL(e, s)->base,
        .page_bytes = GPOOL(e, s)->page_bytes, .pages = ly->pages,
        .v_offset_bytes = (size_t)s->Hkv * s->tpp * s->d * kern_dtype_size(s->dt),
    };
}

/* The GPU kernels' view of layer l's query ring (GPU sequences). */
static struct gpu_ring gpu_ring_view(const struct seq_env *e, const struct seq *s, uint32_t l)
{
    return (struct gpu_ring){
        .base = GPOOL(e, s)->base, .page_bytes = GPOOL(e, s)->page_bytes,
        .pages = s->ring_pg + (size_t)l * s->ring.pages, .n_pages = s->ring.pages,
        .q_heads = s->H, .w = s->cfg.window, .rows_per_page = s->ring.rows_per_page,
        .heads_per_page = s->ring.heads_per_page, .pages_per_head = s->ring.pages_per_head,
    };
}

/* GPU sequences: the engine's indicator (in the window) to the device, page run by page
 * run of the host pool (each registered with CUDA as part of its segment). */
static int indicator_to_gpu(const struct seq_env *e, const struct seq *s, struct gpuctx *gc,
                            float *dst, size_t bytes)
{
    uint64_t pb = e->pool->page_bytes;
    uint64_t off = (uint8_t *)seq_indicator_ptr(e, s) - s->win;
    uint8_t *d = (uint8_t *)dst;
    int rc = 0;
    while (bytes && !rc) {
        uint32_t i = (uint32_t)(off / pb), k = 1;
        while (i + k < s->win_n && s->win_pages[i + k] == s->win_pages[i] + k)
            k++;
        size_t into = off % pb, n = (size_t)k * pb - into;
        n = n < bytes ? n : bytes;
        rc = gpuctx_copy_h2d(gc, d, (uint8_t *)pool_ptr(e->pool, s->win_pages[i]) + into, n,
                             e->pool->base, e->pool->seg_bytes);
        off += n, d += n, bytes -= n;
    }
    return rc;
}

/* What a layer's scoring reads: its keys, its window's ring, the ranking, and whether the
 * window's statistics are wanted (where indicator.c takes them: the preference). */
struct score_view {
    struct gpu_layer l;
    struct gpu_ring r;
    struct gpu_rank rk;
    int stats;
};

static struct score_view score_view(const struct seq_env *e, const struct seq *s, uint32_t layer)
{
    struct score_view v = {.l = gpu_layer_view(e, s, layer), .r = gpu_ring_view(e, s, layer),
                           .rk = gpu_rank_of(s)};
    v.stats = !(v.rk.last || v.rk.position) || s->cfg.alloc == POLICY_ALLOC_PREFERENCE;
    return v;
}

static void score_trace(const struct seq_env *e, const struct seq *s, uint32_t layer,
                        struct gpuctx *gc, const char *how)
{
    struct gpu_times gt;
    gpuctx_times(gc, &gt);
    if (e->trace)
        fprintf(stderr, "caked trace: seq %#llx layer %u scored on the GPU%s: tables and ring "
                "%.0f us (the page table's upload issued at %.0f us)%s, kernels issued in %.0f "
                "us, kernels and statistics %.0f us on the device, call %.0f us (its wait at the "
                "end %.0f us)\n", (unsigned long long)s->id, layer, how, gt.prep_us, gt.tables_us,
                gt.grew ? " (buffers grown)" : "", gt.issue_us, gt.kernel_us, gt.total_us,
                gt.sync_us);
}

static int gpu_score(const struct seq_env *e, struct seq *s, uint32_t layer, int observe,
                     struct seq_result *r)
{
    uint32_t S = seq_scored_len(s);
    if (!S) /* nothing to score; host selections (Ada-KV, runs) stay on the host all the same */
        return policy_host_selects(&s->cfg) && !(s->pend_ind = malloc(sizeof(float))) ? -ENOMEM : 0;
    size_t ib = sizeof(float) * (size_t)s->Hkv * S;
    struct gpuctx *gc = gpuexec_take(GEXEC(e, s));
    int rc = s->ind_dev ? 0 : gpuctx_dev_alloc(gc, (void **)&s->ind_dev, ib * s->L);
    float *dst = s->ind_dev ? s->ind_dev + (size_t)layer * s->Hkv * S : NULL;
    if (!rc && observe) {
        struct score_view v = score_view(e, s, layer);
        rc = gpuctx_score(gc, &v.l, &v.r, s->lse, S, &v.rk, dst, v.stats ? &r->ent : NULL,
                          v.stats ? &r->var : NULL);
        score_trace(e, s, layer, gc, "");
    } else if (!rc) { /* the engine's own, from the host pool (registered) */
        rc = indicator_to_gpu(e, s, gc, dst, ib);
    }
    /* per-head budgets (Ada-KV) split a layer's tokens among its heads, and runs reshape the
     * kept set, by the indicator on the host (cakeseq): a copy there, charged at open as the
     * pending indicator */
    if (!rc && policy_host_selects(&s->cfg)) {
        if (!(s->pend_ind = malloc(ib)))
            rc = -ENOMEM;
        else if (observe)
            rc = gpuctx_copy_d2h(gc, s->pend_ind, dst, ib);
        else
            memcpy(s->pend_ind, seq_indicator_ptr(e, s), ib);
    }
    gpuexec_put(GEXEC(e, s), gc);
    return rc;
}

/* Budgets on the host and the kept sets on the GPU (gpu_compact), NULL; or, for selections
 * made on the host (policy_host_selects), the host's copy of the indicator: the host selects
 * and the GPU compacts. */
static const float *gpu_selection(const struct seq *s)
{
    return s->pend_ind;
}

/* A stage's job for ev fills holes (a GPU top-k, unless CAKED_COMPACT_ORDERED): the fewest
 * rows move, slot order stops following position order until gpu_prefill_order. */
static int job_fills(const struct seq_env *e, const struct cakeseq_evict *ev)
{
    return !e->ordered && !ev->slots;
}

/* Layer l's prefix positions on the device while the prompt is prefilled: [kv_heads][S]. */
static uint32_t *pos_of(const struct seq *s, uint32_t l)
{
    return s->pos_dev + (size_t)l * s->Hkv * seq_scored_len(s);
}

/* A cascading stage's jobs (jobs[n]) for the controller's decisions ev[n]: each layer's
 * indicator picks its kept tokens (or the host's slots), the positions follow on the device.
 * 0 or -EIO (a layer not in the state a stage takes). */
static int stage_jobs(const struct seq_env *e, const struct seq *s, const struct cakeseq_evict *ev,
                      uint32_t n, struct gpu_select *jobs)
{
    uint32_t S = seq_scored_len(s), Hkv = s->Hkv;
    for (uint32_t i = 0; i < n; i++) {
        const struct seq_layer *ly = &s->layer[ev[i].layer];
        if (ev[i].old_prefix > S || ly->pos) { /* host positions only once the prompt is done */
            fprintf(stderr, "caked: seq %#llx: a stage's layer %u: prefix %u of %u, host positions "
                    "%s\n", (unsigned long long)s->id, ev[i].layer, ev[i].old_prefix, S,
                    ly->pos ? "already" : "none");
            return -EIO;
        }
        jobs[i] = (struct gpu_select){
            .l = gpu_layer_view(e, s, ev[i].layer),
            .ind_dev = s->ind_dev + (size_t)ev[i].layer * Hkv * S,
            .old = ev[i].old_prefix, .k = ev[i].kept,
            .win_start = ev[i].old_prefix, .win_len = ly->tokens - ev[i].old_prefix,
            .slots = ev[i].slots, .fill = job_fills(e, &ev[i]),
            .pos_dev = pos_of(s, ev[i].layer), .pos_stride = S, .pos_init = !ly->pos_gpu,
        };
    }
    return 0;
}

/* After a stage's jobs for ev[n] ran: each layer's count, r's evicted tokens and layers. */
static void stage_applied(struct seq *s, const struct cakeseq_evict *ev, uint32_t n,
                          struct seq_result *r)
{
    for (uint32_t i = 0; i < n; i++) {
        struct seq_layer *ly = &s->layer[ev[i].layer];
        uint32_t win = ly->tokens - ev[i].old_prefix, k = ev[i].kept;
        r->evicted_tokens += ev[i].old_prefix - k;
        ly->tokens = k + win;
        ly->pos_gpu = 1;
        r->ev_layers[r->n_ev++] = ev[i].layer;
    }
}

/* CAKED_TRACE's line for a stage of n layers (context: the wait for one; f0 the page faults
 * before it). */
static void stage_trace(const struct seq_env *e, const struct seq *s, uint32_t n, struct gpuctx *gc,
                        double context_s, long f0, const char *how)
{
    struct gpu_times gt;
    gpuctx_times(gc, &gt);
    if (e->trace) /* where a stage's time goes: the context, the host's tables, the device */
        fprintf(stderr, "caked trace: seq %#llx stage of %u layers on the GPU%s: context %.0f us, "
                "tables %.0f us%s, kernels issued in %.0f us, kernels %.0f us on the device, call "
                "%.0f us (its wait at the end %.0f us); page faults %ld\n", (unsigned long long)s->id,
                n, how, context_s * 1e6, gt.prep_us, gt.grew ? " (buffers grown)" : "",
                gt.issue_us, gt.kernel_us, gt.total_us, gt.sync_us, thread_faults() - f0);
}

/* Every layer of a cascading stage in one pass on the GPU (gpuctx_select_compact_many): top-k,
 * compaction, the indicator's and the positions' gather, one upload, one wait; nothing comes
 * back (the positions stay on the device until the prompt's end, gpu_prefill_order). */
static int gpu_compact(const struct seq_env *e, struct seq *s, const struct cakeseq_evict *ev,
                       uint32_t n, struct seq_result *r)
{
    struct gpu_select jobs[SEQ_MAX_LAYERS];
    uint32_t S = seq_scored_len(s);
    double t0 = e->trace ? clock_now_s() : 0;
    long f0 = e->trace ? thread_faults() : 0;
    struct gpuctx *gc = gpuexec_take(GEXEC(e, s));
    double t1 = e->trace ? clock_now_s() : 0;
    int rc = s->pos_dev || !S ? 0 : gpuctx_dev_alloc(gc, (void **)&s->pos_dev, sizeof(uint32_t) * s->L * s->Hkv * S);
    if (!rc)
        rc = stage_jobs(e, s, ev, n, jobs);
    if (!rc)
        rc = gpuctx_select_compact_many(gc, jobs, n);
    stage_trace(e, s, n, gc, t1 - t0, f0, "");
    gpuexec_put(GEXEC(e, s), gc);
    if (!rc)
        stage_applied(s, ev, n, r);
    return rc;
}

/* prefill_order: a stage that filled holes (gpu_compact) leaves a layer's kept slots out of
 * position order, and a decode step's ranking pools neighbouring slots; once the prompt's
 * last layer is applied, every compacted layer's prefix is put back in position order on
 * the GPU in one pass (order jobs: each head's positions ranked there, the rows and the
 * indicator, for H2O, permuted), and the sorted positions come back in the same copy,
 * straight into the layers' new host positions, where decode keeps them. Layers with
 * per-head holes (the host's slots, never filled) keep their order; only their positions
 * come back (one more copy). */
static int gpu_prefill_order(const struct seq_env *e, struct seq *s)
{
    uint32_t S = seq_scored_len(s), Hkv = s->Hkv, n = 0, nf = 0;
    struct gpu_select jobs[SEQ_MAX_LAYERS];
    struct gpu_rows rows[SEQ_MAX_LAYERS];
    uint32_t ls[SEQ_MAX_LAYERS];
    for (uint32_t l = 0; l < s->L; l++) {
        const struct seq_layer *ly = &s->layer[l];
        uint32_t k = cakeseq_prefix_len(s->cs, l);
        if (!ly->pos_gpu)
            continue;
        if (k > ly->tokens || k > S) {
            fprintf(stderr, "caked: seq %#llx: at the prompt's end, layer %u keeps %u of %u "
                    "tokens (prompt prefix %u)\n", (unsigned long long)s->id, l, k, ly->tokens, S);
            return -EIO;
        }
    }
    uint32_t *sorted = malloc(sizeof(uint32_t) * ((size_t)s->L * Hkv + 1));
    int rc = sorted ? 0 : -ENOMEM;
    for (uint32_t l = 0; l < s->L && !rc; l++) { /* host positions, which the copy fills */
        struct seq_layer *ly = &s->layer[l];
        uint32_t k = cakeseq_prefix_len(s->cs, l);
        if (!ly->pos_gpu || (rc = seq_positions_alloc(s, ly, k, ly->tokens - k)))
            continue;
        if (cakeseq_head_kept(s->cs, l)) { /* in slot order: their positions alone */
            rows[nf++] = (struct gpu_rows){.dst = ly->pos, .src = pos_of(s, l), .dst_pitch = ly->pos_cap,
                                           .src_pitch = S, .width = k, .rows = Hkv};
            continue;
        }
        jobs[n] = (struct gpu_select){
            .l = gpu_layer_view(e, s, l),
            .ind_dev = s->ind_dev ? s->ind_dev + (size_t)l * Hkv * S : NULL,
            .old = k, .k = k, .win_start = k, .win_len = ly->tokens - k,
            .pos_dev = pos_of(s, l), .pos_stride = S, .order = 1, .pos_span = S,
            .n_sorted = sorted + (size_t)n * Hkv, .pos_back = ly->pos, .pos_back_pitch = ly->pos_cap,
        };
        ls[n++] = l;
    }
    double t0 = e->trace ? clock_now_s() : 0, t1 = t0;
    struct gpu_times gt = {0};
    if (!rc && (n || nf)) {
        struct gpuctx *gc = gpuexec_take(GEXEC(e, s));
        rc = gpuctx_select_compact_many(gc, jobs, n);
        gpuctx_times(gc, &gt);
        t1 = e->trace ? clock_now_s() : 0;
        if (!rc && nf && (rc = gpuctx_fetch_rows(gc, rows, nf)))
            fprintf(stderr, "caked: seq %#llx: at the prompt's end, the positions of %u layers "
                    "from the GPU: %s\n", (unsigned long long)s->id, nf, strerror(-rc));
        gpuexec_put(GEXEC(e, s), gc);
        if (rc && rc != -EIO)
            fprintf(stderr, "caked: seq %#llx: at the prompt's end, ordering %u layers on the "
                    "GPU: %s\n", (unsigned long long)s->id, n, strerror(-rc));
    }
    double t2 = e->trace ? clock_now_s() : 0;
    long f2 = e->trace ? thread_faults() : 0;
    for (uint32_t i = 0; i < n && !rc; i++) { /* checked before any layer takes them */
        for (uint32_t g = 0; g < Hkv; g++)
            if (jobs[i].n_sorted[g] != jobs[i].k) { /* not k distinct positions below S */
                fprintf(stderr, "caked: seq %#llx: at the prompt's end, layer %u's kv head %u "
                        "holds %u distinct positions in its %u prefix slots\n",
                        (unsigned long long)s->id, ls[i], g, jobs[i].n_sorted[g], jobs[i].k);
                rc = -EIO;
            }
    }
    for (uint32_t l = 0; l < s->L && !rc; l++) { /* the window: the prompt's last tokens */
        struct seq_layer *ly = &s->layer[l];
        if (!ly->pos_gpu)
            continue;
        uint32_t k = cakeseq_prefix_len(s->cs, l);
        for (uint32_t g = 0; g < Hkv; g++)
            for (uint32_t j = k; j < ly->tokens; j++)
                ly->pos[(size_t)g * ly->pos_cap + j] = S + (j - k);
        ly->pos_gpu = 0;
    }
    if (e->trace)
        fprintf(stderr, "caked trace: seq %#llx prefill end: %u layers back in position order "
                "on the GPU, their positions with them: call %.0f us%s (kernels %.0f us on the "
                "device); %u layers' positions alone %.0f us; to the layers %.0f us (page faults "
                "%ld)\n", (unsigned long long)s->id, n, (t1 - t0) * 1e6,
                gt.grew ? " (buffers grown)" : "", gt.kernel_us, nf, (t2 - t1) * 1e6,
                (clock_now_s() - t2) * 1e6, thread_faults() - f2);
    free(sorted);
    return rc;
}

int seq_gpu_positions(const struct seq_env *e, const struct seq *s, uint32_t l, uint32_t g,
                      uint32_t from, uint32_t n, uint32_t *out)
{
    uint32_t S = seq_scored_len(s), k = cakeseq_prefix_len(s->cs, l);
    uint32_t m = from < k ? (k - from < n ? k - from : n) : 0; /* slots on the device */
    for (uint32_t i = m; i < n; i++) /* the window's */
        out[i] = S + (from + i - k);
    return m ? gpuexec_peek(GEXEC(e, s), out, pos_of(s, l) + (size_t)g * S + from,
                            sizeof(uint32_t) * m)
             : 0;
}

static void gpu_prefill_done(const struct seq_env *e, struct seq *s)
{
    gpuexec_dev_free(GEXEC(e, s), s->pos_dev);
    s->pos_dev = NULL;
    if (s->cfg.accumulate && !s->acc_dev)
        return; /* H2O's scores start from the kept indicators (seq_gpu_h2o); seq_free frees */
    gpuexec_dev_free(GEXEC(e, s), s->ind_dev);
    s->ind_dev = NULL;
}

void seq_gpu_h2o(const struct seq_env *e, struct seq *s, int add, uint32_t *evicted, int *rcs)
{
    uint32_t w = s->cfg.window, v0 = s->n < w ? s->n : w, Hkv = s->Hkv, S0 = seq_scored_len(s);
    uint32_t cap = s->n + s->max_new + 1; /* a layer holds at most the prompt and its tokens */
    struct gpuctx *gc = gpuexec_take(GEXEC(e, s));
    uint32_t *keep = malloc(sizeof(uint32_t) * ((size_t)Hkv * cap + 1));
    int rc = keep ? 0 : -ENOMEM;
    if (!rc && !s->acc_dev) { /* the first step: the prompt's window sums of the kept prefix */
        rc = gpuctx_dev_alloc(gc, (void **)&s->acc_dev, sizeof(float) * s->L * Hkv * cap);
        for (uint32_t l = 0; l < s->L && !rc; l++) {
            uint32_t P = cakeseq_prefix_len(s->cs, l);
            P = P < s->layer[l].tokens ? P : s->layer[l].tokens;
            rc = gpuctx_h2o_init(gc, s->acc_dev + (size_t)l * Hkv * cap, cap,
                                 s->ind_dev ? s->ind_dev + (size_t)l * Hkv * S0 : NULL, Hkv,
                                 s->ind_dev ? P : 0, (float)v0);
        }
        if (!rc) {
            gpuexec_dev_free(GEXEC(e, s), s->ind_dev);
            s->ind_dev = NULL;
        }
    }
    for (uint32_t l = 0; l < s->L; l++) {
        struct seq_layer *ly = &s->layer[l];
        uint32_t N = ly->tokens, budget = cakeseq_budget(s->cs, l), S = N > w ? N - w : 0;
        int over = policy_decode_should_evict(&s->cfg, budget, N) || seq_layer_resliced(s, l);
        evicted[l] = 0, rcs[l] = rc;
        if (rc || (!add && !over) || N < 2)
            continue;
        struct gpu_h2o j = {
            .l = gpu_layer_view(e, s, l), .ring = gpu_ring_view(e, s, l),
            .newest = seq_ring_newest(s), .k = over ? (budget < S ? budget : S) : UINT32_MAX,
            .cap = cap, .add = add, .acc = s->acc_dev + (size_t)l * Hkv * cap, .keep = keep,
        };
        if ((rcs[l] = gpuctx_h2o(gc, &j)) || !over)
            continue;
        evicted[l] = S - j.k;
        ly->tokens = j.k + w;
        rcs[l] = seq_positions_compact(s, ly, keep, j.k, S, w);
    }
    gpuexec_put(GEXEC(e, s), gc);
    free(keep);
}

enum { ORD_MAX = 32768 };

/* The decode steps' buffers, made at the sequence's first GPU decode eviction on a worker
 * (the loop launches only once they were tried) on gc's stream, ordered before the eviction:
 * the carried log-sum-exps (lse_dev, NaN-filled: nothing carried) and the prefixes' position
 * orders (ord_dev, each layer's ord_n 0: in position order until a step fills a hole). Where
 * one cannot be made (or CAKED_DECODE_RECOMPUTE, CAKED_DECODE_SHIFT), the steps run without
 * it: both passes, rows shifted. */
static void decode_bufs(const struct seq_env *e, struct seq *s, struct gpuctx *gc)
{
    if (s->dec_bufs)
        return;
    s->dec_bufs = 1;
    size_t b = sizeof(float) * s->L * s->H * s->cfg.window;
    if (!e->recompute && !gpuctx_dev_alloc(gc, (void **)&s->lse_dev, b) &&
        gpuctx_dev_fill(gc, s->lse_dev, 0xff, b)) {
        gpuexec_dev_free(GEXEC(e, s), s->lse_dev);
        s->lse_dev = NULL;
    }
    uint32_t cap = 0;
    for (uint32_t l = 0; l < s->L; l++) {
        uint32_t bl = cakeseq_budget(s->cs, l);
        cap = bl > cap ? bl : cap;
    }
    /* past ORD_MAX tokens a prefix never fits the one launch (over 8 bytes of a block's
     * shared memory a token, 227 KB at most on sm_90): no order, whose bytes would grow with
     * the budget for nothing */
    if (!e->shift && cap && cap <= ORD_MAX &&
        !gpuctx_dev_alloc(gc, (void **)&s->ord_dev, sizeof(uint32_t) * s->L * s->Hkv * cap))
        s->ord_cap = cap;
}

/* A decode eviction's jobs for layers over[n]: ev[i] for layer over[i], scored by the
 * ring's `valid` newest rows, each evicting to its budget, with the layer's log-sum-exps
 * where the sequence keeps them; the removed slots come back in one buffer (ev[0].evicted,
 * freed with ev). 0 or -ENOMEM. */
static int evict_jobs(const struct seq_env *e, const struct seq *s, const uint32_t *over,
                      uint32_t nover, uint32_t valid, struct gpu_evict **evp)
{
    uint32_t w = s->cfg.window;
    struct gpu_evict *ev = malloc(sizeof(*ev) * nover);
    size_t ev_n = 0;
    for (uint32_t i = 0; i < nover; i++) {
        uint32_t S = s->layer[over[i]].tokens - w, budget = cakeseq_budget(s->cs, over[i]);
        ev_n += (size_t)s->Hkv * (S - (budget < S ? budget : S));
    }
    /* the removed slots, then the engine's newest log-sum-exps ([nover][q_heads]) */
    uint32_t *gone = malloc(sizeof(uint32_t) * (ev_n + 1) + sizeof(float) * nover * s->H);
    if (!ev || !gone) {
        free(ev), free(gone);
        return -ENOMEM;
    }
    float *given = (float *)(gone + ev_n + 1);
    for (uint32_t i = 0, at = 0; i < nover; i++) {
        uint32_t l = over[i], S = s->layer[l].tokens - w, budget = cakeseq_budget(s->cs, l);
        ev[i] = (struct gpu_evict){
            .l = gpu_layer_view(e, s, l), .ring = gpu_ring_view(e, s, l),
            .first = seq_ring_first(s, valid), /* the oldest valid ring row */
            .n_q = valid, .k = budget < S ? budget : S, .rk = gpu_rank_of(s),
            .evicted = gone + at,
            .lse = s->lse_dev ? s->lse_dev + (size_t)l * s->H * w : NULL, .carry = seq_lse_carry(s, l),
            .order = s->ord_dev ? s->ord_dev + (size_t)l * s->Hkv * s->ord_cap : NULL,
            .order_n = s->layer[l].ord_n, .order_cap = s->ord_cap,
            .layerwise = e->layerwise && s->decoded % e->layerwise == e->layerwise - 1,
        };
        at += s->Hkv * (S - ev[i].k);
        float *mine = given + (size_t)i * s->H;
        if (ev[i].carry && seq_decode_lse_given(e, s, l, mine))
            ev[i].lse_new = mine;
    }
    *evp = ev;
    return 0;
}

static void evict_jobs_free(struct gpu_evict *ev)
{
    if (ev)
        free(ev[0].evicted);
    free(ev);
}

/* After the eviction ev[n] of layers over[n] ran (rc its result): the layers' token counts
 * and positions follow, evicted[i] gets layer over[i]'s count; CAKED_TRACE's line (how: who
 * launched it; t0..t1 the eviction's time on this thread, gt the context's timing). Returns
 * rc or the positions' error. */
static int evict_apply(const struct seq_env *e, struct seq *s, const uint32_t *over,
                       const struct gpu_evict *ev, uint32_t nover, int rc, uint32_t *evicted,
                       const char *how, double t0, double t1, const struct gpu_times *gt)
{
    uint32_t w = s->cfg.window;
    for (uint32_t i = 0; i < nover; i++) /* the next step carries what this one left */
        s->layer[over[i]].lse_next = 0;
    for (uint32_t i = 0; i < nover && !rc; i++) {
        struct seq_layer *ly = &s->layer[over[i]];
        uint32_t S = ly->tokens - w, n_ev = S - ev[i].k;
        evicted[i] = n_ev;
        ly->tokens = ev[i].k + w;
        if (ev[i].lse && ev[i].fused) /* the layer-by-layer way left them NaN */
            ly->lse_next = s->decoded + 1, ly->lse_tokens = ly->tokens;
        s->dlse_used += ev[i].fused && ev[i].lse_new;
        if (ev[i].fused && ev[i].order) { /* holes filled: the order holds the k slots left */
            rc = seq_positions_fill(s, ly, ev[i].evicted, n_ev, S, w);
            ly->ord_n = n_ev ? ev[i].k : ly->ord_n;
            continue;
        }
        if (ly->ord_n) /* the layer-by-layer way put the prefix back in position order */
            seq_positions_sort(s, ly, S);
        ly->ord_n = 0;
        rc = seq_positions_evict(s, ly, ev[i].evicted, n_ev, S, w);
    }
    if (e->trace) {
        uint32_t lo = UINT32_MAX, hi = 0;
        for (uint32_t i = 0; i < nover; i++) {
            uint32_t S = ev[i].l.n_tokens - w; /* the view taken before the step */
            lo = S < lo ? S : lo, hi = S > hi ? S : hi;
        }
        fprintf(stderr, "caked trace: seq %#llx decode: %u layers (prefixes %u-%u) evicted on the "
                "GPU %s %.0f us (tables %.0f, kernel %.0f on the device, call %.0f), positions "
                "%.0f us\n", (unsigned long long)s->id, nover, lo, hi, how, (t1 - t0) * 1e6,
                gt->prep_us, gt->kernel_us, gt->total_us, (clock_now_s() - t1) * 1e6);
    }
    return rc;
}

/* The same on the GPU for every layer over budget at once (one launch where the kernel
 * takes the policy's ranking): score, top-k and compaction, only the removed slots come back
 * to the host. The worker waits for it. */
static int decode_evict_gpu(const struct seq_env *e, struct seq *s, const uint32_t *over,
                            uint32_t nover, uint32_t valid, uint32_t *evicted)
{
    struct gpu_evict *ev;
    double t0 = e->trace ? clock_now_s() : 0;
    struct gpuctx *gc = gpuexec_take(GEXEC(e, s));
    decode_bufs(e, s, gc);
    if (evict_jobs(e, s, over, nover, valid, &ev)) {
        gpuexec_put(GEXEC(e, s), gc);
        return -ENOMEM;
    }
    int rc = gpuctx_decode_evict(gc, ev, nover);
    struct gpu_times gt;
    gpuctx_times(gc, &gt);
    gpuexec_put(GEXEC(e, s), gc);
    rc = evict_apply(e, s, over, ev, nover, rc, evicted, "on a worker", t0,
                     e->trace ? clock_now_s() : 0, &gt);
    evict_jobs_free(ev);
    return rc;
}

struct gpu_flight {
    struct gpuctx *gc;
    struct gpu_evict *ev;
    double t0;
    struct gpu_select *jobs; /* a prefill stage's (seq_gpu_stage_launch) */
    long f0;                 /* CAKED_TRACE: the page faults before it */
};

/* A flight for the loop with a context taken without waiting; NULL with *rc -ENOMEM, or
 * -EAGAIN where none is free. */
static struct gpu_flight *flight_take(const struct seq_env *e, const struct seq *s, int *rc)
{
    struct gpu_flight *f = calloc(1, sizeof(*f));
    *rc = f ? -EAGAIN : -ENOMEM;
    if (!f)
        return NULL;
    f->t0 = e->trace ? clock_now_s() : 0;
    if (!(f->gc = gpuexec_try_take(GEXEC(e, s)))) {
        free(f);
        return NULL;
    }
    return f;
}

int seq_gpu_score_launch(const struct seq_env *e, struct seq *s, uint32_t layer,
                         struct gpu_flight **out)
{
    uint32_t S = seq_scored_len(s);
    if (!s->ind_dev || !s->pos_dev)
        return -EAGAIN; /* made on a worker (cudaMalloc waits for the device) */
    struct score_view v = score_view(e, s, layer);
    if (v.rk.last || v.rk.position || v.rk.shared || v.rk.pool == KERN_POOL_MAX)
        return -ENOTSUP; /* more kernels than the loop's checks know: a worker's */
    int rc;
    struct gpu_flight *f = flight_take(e, s, &rc);
    if (!f)
        return rc;
    rc = gpuctx_score_launch(f->gc, &v.l, &v.r, s->lse, S, &v.rk,
                             s->ind_dev + (size_t)layer * s->Hkv * S, v.stats);
    if (rc) {
        gpuexec_put(GEXEC(e, s), f->gc);
        free(f);
        return rc;
    }
    *out = f;
    return 0;
}

int seq_gpu_score_land(const struct seq_env *e, struct seq *s, uint32_t layer,
                       struct gpu_flight *f, struct seq_result *r)
{
    int rc = gpuctx_score_land(f->gc, &r->ent, &r->var);
    score_trace(e, s, layer, f->gc, " (launched by the loop)");
    return rc;
}

int seq_gpu_stage_launch(const struct seq_env *e, struct seq *s, const struct cakeseq_evict *ev,
                         uint32_t n, struct gpu_flight *f)
{
    f->t0 = e->trace ? clock_now_s() : 0;
    f->f0 = e->trace ? thread_faults() : 0;
    if (!(f->jobs = malloc(sizeof(*f->jobs) * n)))
        return -ENOMEM;
    int rc = stage_jobs(e, s, ev, n, f->jobs);
    if (!rc)
        rc = gpuctx_select_compact_many_launch(f->gc, f->jobs, n);
    return rc;
}

int seq_gpu_stage_land(const struct seq_env *e, struct seq *s, const struct cakeseq_evict *ev,
                       uint32_t n, struct gpu_flight *f, struct seq_result *r)
{
    int rc = gpuctx_select_compact_many_land(f->gc, f->jobs, n);
    stage_trace(e, s, n, f->gc, 0, f->f0, " (launched by the loop)");
    if (!rc)
        stage_applied(s, ev, n, r);
    return rc;
}

void seq_gpu_flight_end(const struct seq_env *e, struct seq *s, struct gpu_flight *f)
{
    if (!f)
        return;
    gpuexec_put(GEXEC(e, s), f->gc);
    free(f->jobs);
    free(f);
}

int seq_gpu_evict_launch(const struct seq_env *e, struct seq *s, const uint32_t *over,
                         uint32_t nover, uint32_t valid, struct gpu_flight **out)
{
    if (!s->dec_bufs)
        return -EAGAIN; /* its first allocation on a worker, as a context's buffers grow */
    int rc;
    struct gpu_flight *f = flight_take(e, s, &rc);
    if (!f)
        return rc;
    rc = evict_jobs(e, s, over, nover, valid, &f->ev);
    if (!rc && (rc = gpuctx_decode_evict_launch(f->gc, f->ev, nover)))
        evict_jobs_free(f->ev);
    if (rc) {
        gpuexec_put(GEXEC(e, s), f->gc);
        free(f);
        return rc;
    }
    *out = f;
    return 0;
}

int seq_gpu_flight_ready(struct gpu_flight *f)
{
    return gpuctx_ready(f->gc) != 0;
}

int seq_gpu_evict_land(const struct seq_env *e, struct seq *s, const uint32_t *over,
                       uint32_t nover, struct gpu_flight *f, uint32_t *evicted)
{
    int rc = gpuctx_decode_evict_land(f->gc, f->ev, nover);
    struct gpu_times gt;
    gpuctx_times(f->gc, &gt);
    gpuexec_put(GEXEC(e, s), f->gc);
    rc = evict_apply(e, s, over, f->ev, nover, rc, evicted, "launched by the loop", f->t0,
                     e->trace ? clock_now_s() : 0, &gt);
    evict_jobs_free(f->ev);
    free(f);
    return rc;
}

static void gpu_decode_evict(const struct seq_env *e, struct seq *s, const uint32_t *over,
                             uint32_t n, uint32_t valid, uint32_t *evicted, int *rcs)
{
    int rc = decode_evict_gpu(e, s, over, n, valid, evicted);
    for (uint32_t i = 0; i < n; i++)
        rcs[i] = rc;
}

const struct seq_exec seq_exec_gpu = {
    .score = gpu_score, .selection = gpu_selection, .compact = gpu_compact,
    .prefill_order = gpu_prefill_order, .prefill_done = gpu_prefill_done, .decode_evict = gpu_decode_evict,
};
