/* cakeseq.c - one sequence's CAKE prefill state and cascading controller. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../kernels/kern.h"
#include "cakeseq.h"

struct layer_state {
    double pref;
    int64_t budget;
    uint32_t prefix;  /* prefix tokens held (per kv head) */
    float *ind;       /* [kv_heads][prefix] */
    uint32_t *head_kept; /* Ada-KV: [kv_heads] tokens per head (the rest are holes) */
    uint32_t *pos;    /* [kv_heads][prefix] original positions */
};

struct cakeseq {
    struct policy_cfg cfg;
    uint32_t kv_heads, n, S;
    uint32_t next_layer;
    uint32_t fallbacks;
    int64_t total;     /* the whole model's prefix budget: (C - w) L unless lowered (pressure) */
    int external;      /* the caller selects (indicator NULL): counts only */
    struct layer_state *ls;
    int64_t *stage;    /* [L][L] */
    uint32_t *slots;   /* [L][kv_heads][S] eviction slots of the last call */
    uint32_t *ltmp;    /* [L][2 S]: selection scratch, one row per thread (at most L threads) */
    int threads;       /* kv heads selected in parallel (cakeseq_set_threads) */
};

int cakeseq_create(const struct policy_cfg *cfg, uint32_t kv_heads, uint32_t n,
                   struct cakeseq **out, const char **why)
{
    const char *msg = policy_cfg_check(cfg);
    if (!msg && kv_heads == 0)
        msg = "kv_heads must be at least 1";
    if (msg) {
        if (why)
            *why = msg;
        return -EINVAL;
    }
    struct cakeseq *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    uint32_t L = cfg->layers;
    s->cfg = *cfg, s->kv_heads = kv_heads, s->n = n;
    s->S = n > cfg->window ? n - cfg->window : 0;
    s->ls = calloc(L, sizeof(*s->ls));
    s->stage = malloc(sizeof(int64_t) * L * L);
    s->slots = malloc(sizeof(uint32_t) * ((size_t)L * kv_heads * s->S + 1));
    s->ltmp = malloc(sizeof(uint32_t) * (2 * (size_t)s->S * L + 1));
    s->threads = 1;
    s->total = ((int64_t)cfg->cache_size - cfg->window) * L;
    if (!s->ls || !s->stage || !s->slots || !s->ltmp) {
        cakeseq_destroy(s);
        return -ENOMEM;
    }
    for (size_t i = 0; i < (size_t)L * L; i++)
        s->stage[i] = -1;
    *out = s;
    return 0;
}

uint64_t cakeseq_heap_bytes(const struct policy_cfg *cfg, uint32_t kv_heads, uint32_t n)
{
    uint64_t L = cfg->layers, S = n > cfg->window ? n - cfg->window : 0;
    return sizeof(struct cakeseq) + L * sizeof(struct layer_state) + 8 * L * L +
           4 * (L * kv_heads * S + 1) + 4 * (2 * S * L + 1) /* slots, ltmp */
           + L * kv_heads * S * (4 + 4) /* each layer's indicator and positions */
           + 4 * L * kv_heads;           /* head_kept */
}

void cakeseq_destroy(struct cakeseq *s)
{
    if (!s)
        return;
    if (s->ls)
        for (uint32_t l = 0; l < s->cfg.layers; l++)
            free(s->ls[l].ind), free(s->ls[l].pos), free(s->ls[l].head_kept);
    free(s->ls), free(s->stage), free(s->slots), free(s->ltmp);
    free(s);
}

uint32_t cakeseq_scored_len(const struct cakeseq *s) { return s->S; }
void cakeseq_set_threads(struct cakeseq *s, int n) { s->threads = n; }
double cakeseq_preference(const struct cakeseq *s, uint32_t l) { return s->ls[l].pref; }
uint32_t cakeseq_budget(const struct cakeseq *s, uint32_t l) { return (uint32_t)s->ls[l].budget; }
uint32_t cakeseq_prefix_len(const struct cakeseq *s, uint32_t l) { return s->ls[l].prefix; }
uint32_t cakeseq_fallbacks(const struct cakeseq *s) { return s->fallbacks; }

void cakeseq_lower_budget(struct cakeseq *s, uint32_t l, uint32_t budget)
{
    if ((int64_t)budget < s->ls[l].budget)
        s->ls[l].budget = budget;
}

const uint32_t *cakeseq_positions(const struct cakeseq *s, uint32_t l, uint32_t g)
{
    if (!s->ls[l].pos)
        return NULL;
    return s->ls[l].pos + (size_t)g * s->ls[l].prefix;
}

void cakeseq_prefill_done(struct cakeseq *s)
{
    free(s->slots), free(s->ltmp);
    s->slots = NULL, s->ltmp = NULL;
    for (uint32_t l = 0; l < s->cfg.layers; l++) {
        struct layer_state *ls = &s->ls[l];
        size_t n = (size_t)s->kv_heads * ls->prefix;
        if (!ls->ind || !n)
            continue;
        float *ind = realloc(ls->ind, sizeof(float) * n); /* shrinking: NULL only if odd */
        uint32_t *pos = realloc(ls->pos, sizeof(uint32_t) * n);
        if (ind)
            ls->ind = ind;
        if (pos)
            ls->pos = pos;
    }
}

const uint32_t *cakeseq_head_kept(const struct cakeseq *s, uint32_t l)
{
    return s->ls[l].head_kept;
}

const float *cakeseq_indicator(const struct cakeseq *s, uint32_t l, uint32_t g)
{
    if (!s->ls[l].ind)
        return NULL;
    return s->ls[l].ind + (size_t)g * s->ls[l].prefix;
}

const int64_t *cakeseq_stage_budgets(const struct cakeseq *s, uint32_t m)
{
    return s->stage + (size_t)m * s->cfg.layers;
}

/* Evictions: layer l keeps the top `keep` of its prefix per kv head (Ada-KV: `keep` on
 * average, per-head counts from policy_head_budgets). In three steps so that a stage's
 * layers and heads all select side by side: plan (per-head counts, the largest kmax), select
 * (per layer and head, into the layer's slots), repack (per layer: indicator and positions
 * follow their tokens). */
struct evict_job {
    uint32_t l, keep, old, kmax;
    uint32_t *hk; /* Ada-KV per-head counts, else NULL */
};

static int evict_plan(struct cakeseq *s, struct evict_job *j)
{
    struct layer_state *ls = &s->ls[j->l];
    uint32_t Hkv = s->kv_heads;
    j->old = ls->prefix, j->kmax = j->keep, j->hk = NULL;
    if (s->cfg.per_head_budgets && j->keep < j->old && !s->external) {
        free(ls->head_kept);
        if (!(j->hk = ls->head_kept = malloc(sizeof(uint32_t) * Hkv)))
            return -ENOMEM;
        int rc = policy_head_budgets(&s->cfg, ls->ind, Hkv, j->old, j->keep, j->hk);
        if (rc)
            return rc;
        j->kmax = 0;
        for (uint32_t g = 0; g < Hkv; g++)
            j->kmax = j->hk[g] > j->kmax ? j->hk[g] : j->kmax;
    }
    return 0;
}

/* Threads for a selection of `work` scores: one below 64K (not worth a team). */
static int sel_threads(const struct cakeseq *s, uint64_t work)
{
    return s->threads == 1 || work < 65536 ? 1 : kern_threads(s->threads);
}

/* scr: 2 * S uint32 of scratch. */
static void evict_select(struct cakeseq *s, const struct evict_job *j, uint32_t g, uint32_t *scr)
{
    const struct layer_state *ls = &s->ls[j->l];
    enum kern_order order = s->cfg.mode == POLICY_FIXED ? KERN_ORDER_POSITION : KERN_ORDER_SCORE;
    uint32_t *sl = s->slots + (size_t)j->l * s->kv_heads * s->S + (size_t)g * j->kmax;
    uint32_t k = j->hk ? j->hk[g] : j->keep, old = j->old;
    kern_topk_ws(ls->ind + (size_t)g * old, old, k, order, sl, scr);
    if (k < j->kmax) { /* holes: filled with the first unchosen slots (masked by readers) */
        uint8_t *taken = (uint8_t *)scr;
        memset(taken, 0, old);
        for (uint32_t i = 0; i < k; i++)
            taken[sl[i]] = 1;
        for (uint32_t x = 0, f = k; f < j->kmax; x++)
            if (!taken[x])
                sl[f++] = x;
    }
}

/* tmp: S uint32 of scratch. */
static void evict_repack(struct cakeseq *s, const struct evict_job *j, uint32_t *tmp,
                         struct cakeseq_evict *ev)
{
    struct layer_state *ls = &s->ls[j->l];
    uint32_t *slots = s->slots + (size_t)j->l * s->kv_heads * s->S, old = j->old, kmax = j->kmax;
    /* [kv_heads][old] -> [kv_heads][kmax] in place: g's new rows never overtake its old
     * ones, so heads go in order */
    for (uint32_t g = 0; g < s->kv_heads; g++) {
        const uint32_t *sl = slots + (size_t)g * kmax;
        float *t = (float *)tmp;
        kern_gather_f32(ls->ind + (size_t)g * old, sl, kmax, t);
        if (j->hk)
            for (uint32_t i = j->hk[g]; i < kmax; i++)
                t[i] = -INFINITY; /* holes */
        memcpy(ls->ind + (size_t)g * kmax, t, sizeof(float) * kmax);
        for (uint32_t i = 0; i < kmax; i++)
            tmp[i] = ls->pos[(size_t)g * old + sl[i]];
        memcpy(ls->pos + (size_t)g * kmax, tmp, sizeof(uint32_t) * kmax);
    }
    ls->prefix = kmax;
    *ev = (struct cakeseq_evict){.layer = j->l, .kept = kmax, .old_prefix = old, .slots = slots,
                                 .head_kept = j->hk};
}

/* Runs the n evictions; every (layer, kv head) selects side by side where there is enough
 * work. ev receives them in the jobs' order. */
static int evict_layers(struct cakeseq *s, struct evict_job *jobs, uint32_t n,
                        struct cakeseq_evict *ev)
{
    uint64_t work = 0;
    for (uint32_t i = 0; i < n; i++) {
        int rc = evict_plan(s, &jobs[i]);
        if (rc)
            return rc;
        work += jobs[i].old;
    }
    if (s->external) { /* the caller selects: counts only */
        for (uint32_t i = 0; i < n; i++) {
            s->ls[jobs[i].l].prefix = jobs[i].kmax;
            ev[i] = (struct cakeseq_evict){.layer = jobs[i].l, .kept = jobs[i].kmax,
                                           .old_prefix = jobs[i].old};
        }
        return 0;
    }
    uint32_t Hkv = s->kv_heads, pairs = n * Hkv;
    int nth = sel_threads(s, work * Hkv);
    if (nth > (int)s->cfg.layers)
        nth = (int)s->cfg.layers; /* one scratch row of ltmp per thread */
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
#ifdef _OPENMP
        uint32_t *scr = s->ltmp + (size_t)omp_get_thread_num() * 2 * s->S;
#else
        uint32_t *scr = s->ltmp;
#endif
#pragma omp for schedule(dynamic, 1)
        for (uint32_t p = 0; p < pairs; p++)
            evict_select(s, &jobs[p / Hkv], p % Hkv, scr);
#pragma omp for schedule(dynamic, 1)
        for (uint32_t i = 0; i < n; i++)
            evict_repack(s, &jobs[i], scr, &ev[i]);
    }
    return 0;
}

/* A layer's scores become run ranks once, when it is scored: every later stage and cut of
 * the cascade takes a top of the same ranking, so what a layer keeps stays whole runs (the
 * last one cut may be partial) and each stage's set holds the next one's. */
static int runs_rank_layer(struct cakeseq *s, float *ind)
{
    uint32_t Hkv = s->kv_heads, S = s->S;
    int nth = sel_threads(s, (uint64_t)S * Hkv);
    if (nth > (int)Hkv)
        nth = (int)Hkv;
    uint64_t *key = malloc(sizeof(uint64_t) * 2 * S * nth);
    uint8_t *taken = malloc((size_t)S * nth);
    if (!key || !taken) {
        free(key), free(taken);
        return -ENOMEM;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth) if (nth > 1)
    for (uint32_t g = 0; g < Hkv; g++) {
#ifdef _OPENMP
        int t = omp_get_thread_num();
#else
        int t = 0;
#endif
        policy_runs_rank(ind + (size_t)g * S, S, s->cfg.run_width, key + (size_t)t * 2 * S,
                         taken + (size_t)t * S);
    }
    free(key), free(taken);
    return 0;
}

int cakeseq_prefill_layer(struct cakeseq *s, uint32_t layer, double pref, const float *indicator,
                          struct cakeseq_evict *ev, uint32_t *n_ev)
{
    const struct policy_cfg *cfg = &s->cfg;
    uint32_t L = cfg->layers, S = s->S, Hkv = s->kv_heads;
    *n_ev = 0;
    if (layer != s->next_layer || layer >= L || !s->slots)
        return -EINVAL;
    if (layer == 0)
        s->external = !indicator;
    if ((indicator == NULL) != s->external ||
        (s->external && (cfg->mode != POLICY_FIXED || policy_host_selects(cfg))))
        return -EINVAL;
    struct layer_state *ls = &s->ls[layer];
    ls->pref = pref;
    ls->budget = (int64_t)cfg->cache_size - cfg->window;
    ls->prefix = S;
    if (S && !s->external) {
        ls->ind = malloc(sizeof(float) * (size_t)Hkv * S);
        ls->pos = malloc(sizeof(uint32_t) * (size_t)Hkv * S);
        if (!ls->ind || !ls->pos)
            return -ENOMEM;
        memcpy(ls->ind, indicator, sizeof(float) * (size_t)Hkv * S);
        for (uint32_t g = 0; g < Hkv; g++)
            for (uint32_t j = 0; j < S; j++)
                ls->pos[(size_t)g * S + j] = j;
        if (policy_keeps_runs(cfg)) {
            int rc = runs_rank_layer(s, ls->ind);
            if (rc)
                return rc;
        }
    }
    s->next_layer++;

    int64_t *row = s->stage + (size_t)layer * L;
    int64_t sb[POLICY_MAX_LAYERS];
    if (policy_budgets_static(cfg, S, sb)) {
        /* budgets known up front (uniform, pyramid, none): each layer is cut to its own as
         * soon as it is scored, whatever cascading says (memory only ever shrinks) */
        if (cfg->alloc == POLICY_ALLOC_NONE)
            ls->budget = S;
        else if (!policy_prefill_early_exit(cfg, s->n))
            ls->budget = sb[layer];
        if (ls->budget < ls->prefix) {
            struct evict_job j = {.l = layer, .keep = (uint32_t)ls->budget};
            int rc = evict_layers(s, &j, 1, ev);
            if (rc)
                return rc;
            *n_ev = 1;
        }
        for (uint32_t l = 0; l < L; l++)
            row[l] = l <= layer ? s->ls[l].budget : -1;
        return 0;
    }
    int allocate = !policy_prefill_early_exit(cfg, s->n) && (cfg->cascading || layer == L - 1);
    if (allocate) {
        uint32_t m = layer + 1; /* layers 0..layer take part */
        int64_t T = s->total, b[POLICY_MAX_LAYERS];
        if (cfg->mode == POLICY_PARITY) {
            float P[POLICY_MAX_LAYERS];
            for (uint32_t l = 0; l < m; l++)
                P[l] = (float)s->ls[l].pref;
            if (policy_budgets_parity(P, m, T, S, b))
                s->fallbacks++;
        } else {
            double P[POLICY_MAX_LAYERS];
            int64_t cap[POLICY_MAX_LAYERS];
            for (uint32_t l = 0; l < m; l++)
                P[l] = s->ls[l].pref, cap[l] = s->ls[l].prefix;
            if (policy_budgets_fixed(P, cap, m, T, b))
                s->fallbacks++;
        }
        struct evict_job jobs[POLICY_MAX_LAYERS];
        uint32_t nt = 0;
        for (uint32_t l = 0; l < m; l++) {
            struct layer_state *x = &s->ls[l];
            x->budget = b[l];
            uint32_t keep = b[l] < x->prefix ? (uint32_t)b[l] : x->prefix;
            if (keep < x->prefix || (cfg->mode == POLICY_PARITY && x->prefix))
                jobs[nt++] = (struct evict_job){.l = l, .keep = keep};
        }
        /* a stage re-selects every earlier layer whose budget shrank: layers and heads are
         * independent, so they all go side by side */
        int rc = evict_layers(s, jobs, nt, ev);
        if (rc)
            return rc;
        *n_ev = nt;
    }
    for (uint32_t l = 0; l < L; l++)
        row[l] = l <= layer ? s->ls[l].budget : -1;
    return 0;
}

int cakeseq_can_restage(const struct cakeseq *s)
{
    const struct policy_cfg *c = &s->cfg;
    return s->slots && s->next_layer > 0 && s->next_layer < c->layers && c->mode == POLICY_FIXED &&
           c->alloc == POLICY_ALLOC_PREFERENCE && c->cascading && !c->per_head_budgets &&
           !policy_prefill_early_exit(c, s->n);
}

int64_t cakeseq_total(const struct cakeseq *s) { return s->total; }

void cakeseq_lower_total(struct cakeseq *s, int64_t T)
{
    if (T < s->total)
        s->total = T;
}

/* The stage's budgets of layers 0 .. next_layer - 1 at total T (policy_budgets_fixed). */
static void stage_budgets(const struct cakeseq *s, int64_t T, int64_t *b)
{
    double P[POLICY_MAX_LAYERS];
    int64_t cap[POLICY_MAX_LAYERS];
    for (uint32_t l = 0; l < s->next_layer; l++)
        P[l] = s->ls[l].pref, cap[l] = s->ls[l].prefix;
    policy_budgets_fixed(P, cap, s->next_layer, T, b);
}

void cakeseq_restage_preview(const struct cakeseq *s, int64_t T, int64_t *b)
{
    stage_budgets(s, T < s->total ? T : s->total, b);
}

int cakeseq_restage(struct cakeseq *s, struct cakeseq_evict *ev, uint32_t *n_ev)
{
    *n_ev = 0;
    if (!cakeseq_can_restage(s))
        return -EINVAL;
    int64_t b[POLICY_MAX_LAYERS];
    stage_budgets(s, s->total, b);
    struct evict_job jobs[POLICY_MAX_LAYERS];
    uint32_t nt = 0;
    for (uint32_t l = 0; l < s->next_layer; l++) {
        struct layer_state *x = &s->ls[l];
        x->budget = b[l];
        if ((uint64_t)b[l] < x->prefix)
            jobs[nt++] = (struct evict_job){.l = l, .keep = (uint32_t)b[l]};
    }
    int rc = evict_layers(s, jobs, nt, ev);
    if (!rc)
        *n_ev = nt;
    return rc;
}
