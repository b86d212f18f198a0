/* seq_room.c - a sequence giving room (pressure.c decides who gives; these act on one
 * sequence): re-slicing its budgets and evicting to them, parking a GPU sequence in the host
 * pool and bringing it back, and moving its pages out of segments drained for another
 * tenant. The same ownership as seq.c's (seq.h): *_prepare and *_commit on the loop, *_work
 * on the worker that has the sequence. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "seq_int.h"

/* ---- re-slicing ------------------------------------------------------------------- */

/* During the prompt a sequence is re-sliced through the cascade's total (cakeseq_restage);
 * once prefilled, layer by layer through its budgets and the decode rule. */
static int mid_prompt(const struct seq *s)
{
    return s->next_observe < s->L;
}

int seq_reslice_ok(const struct seq *s)
{
    if (s->busy || s->orphaned || s->group || s->parked || s->moving)
        return 0;
    if (mid_prompt(s))
        return s->next_observe > 0 && cakeseq_can_restage(s->cs);
    /* per-head budgets (Ada-KV) leave holes the decode rule's ranking cannot see: cutting
     * such a layer would bring hole slots back as tokens and mask real ones */
    return s->cfg.alloc != POLICY_ALLOC_NONE && !s->cfg.per_head_budgets;
}

/* The prefix tokens layer l holds within its budget: what a cut starts from. */
static uint32_t held_prefix(const struct seq *s, uint32_t l)
{
    uint32_t w = s->cfg.window, t = s->layer[l].tokens, b = cakeseq_budget(s->cs, l);
    uint32_t h = t > w ? t - w : 0;
    return b < h ? b : h;
}

static uint32_t floor_of(const struct seq *s, uint32_t min_tokens)
{
    return min_tokens > s->cfg.window ? min_tokens - s->cfg.window : 0;
}

static uint32_t floor_prefix(const struct seq *s, uint32_t l, uint32_t min_tokens)
{
    uint32_t f = floor_of(s, min_tokens), h = held_prefix(s, l);
    return f < h ? f : h;
}

uint64_t seq_reslice_room(const struct seq *s, uint32_t min_tokens, uint64_t *floor)
{
    uint64_t t = 0, f = 0;
    if (mid_prompt(s)) { /* the whole model's total; its floor: every layer's */
        int64_t T = cakeseq_total(s->cs);
        t = T > 0 ? (uint64_t)T : 0;
        f = (uint64_t)floor_of(s, min_tokens) * s->L;
        *floor = f < t ? f : t;
        return t;
    }
    for (uint32_t l = 0; l < s->L; l++)
        t += held_prefix(s, l), f += floor_prefix(s, l, min_tokens);
    *floor = f;
    return t;
}

void seq_reslice_budgets(const struct seq *s, uint32_t min_tokens, uint64_t total, uint32_t *b)
{
    if (mid_prompt(s)) { /* the scored layers at the cascade's rule; the rest untouched */
        int64_t sb[SEQ_MAX_LAYERS];
        cakeseq_restage_preview(s->cs, (int64_t)total, sb);
        for (uint32_t l = 0; l < s->L; l++)
            b[l] = l < s->next_observe ? (uint32_t)sb[l] : UINT32_MAX;
        return;
    }
    double P[SEQ_MAX_LAYERS];
    int64_t cap[SEQ_MAX_LAYERS], give[SEQ_MAX_LAYERS];
    uint64_t fl = 0;
    int pref = s->cfg.alloc == POLICY_ALLOC_PREFERENCE;
    for (uint32_t l = 0; l < s->L; l++) {
        uint32_t h = held_prefix(s, l), f = floor_prefix(s, l, min_tokens);
        b[l] = f, fl += f, cap[l] = h - f;
        /* CAKE's own rule at a smaller total (its preferences); other allocations keep
         * their shape (weights = what each layer holds) */
        P[l] = pref ? cakeseq_preference(s->cs, l) : (double)h;
    }
    if (total <= fl)
        return;
    policy_budgets_fixed(P, cap, s->L, (int64_t)(total - fl), give);
    for (uint32_t l = 0; l < s->L; l++)
        b[l] += (uint32_t)give[l];
}

uint64_t seq_reslice_pages_freed(const struct seq *s, const uint32_t *b)
{
    int64_t freed = 0;
    /* a prefilled sequence may be evicted by its decode step, which then adds a token to
     * every layer (a page more where that crosses one) */
    uint32_t step = !mid_prompt(s) && s->decoded < s->max_new;
    for (uint32_t l = 0; l < s->L; l++) {
        if (b[l] == UINT32_MAX)
            continue;
        const struct seq_layer *ly = &s->layer[l];
        uint64_t keep = (uint64_t)b[l] + s->cfg.window;
        uint64_t t = (ly->tokens < keep ? ly->tokens : keep) + step;
        freed += (int64_t)ly->n_pages - (int64_t)((t + s->tpp - 1) / s->tpp);
    }
    return freed > 0 ? (uint64_t)freed : 0;
}

uint64_t seq_reslice_commit(const struct seq_env *e, struct seq *s, uint64_t total,
                            const uint32_t *b)
{
    uint64_t given = 0;
    if (mid_prompt(s)) {
        int64_t T = cakeseq_total(s->cs);
        if ((int64_t)total >= T)
            return 0;
        given = (uint64_t)T - total;
        cakeseq_lower_total(s->cs, (int64_t)total);
        for (uint32_t l = 0; l < s->next_observe; l++)
            if (s->layer[l].tokens > (uint64_t)b[l] + s->cfg.window)
                s->rs_pending = 1; /* re-staged by the next job (a re-slice, or its observe) */
    } else {
        for (uint32_t l = 0; l < s->L; l++) {
            uint32_t h = held_prefix(s, l);
            if (b[l] >= h)
                continue;
            given += h - b[l];
            cakeseq_lower_budget(s->cs, l, b[l]);
            if (s->layer[l].tokens > (uint64_t)b[l] + s->cfg.window)
                s->rs_pending = 1; /* evicted by the next job that has the sequence */
        }
    }
    if (given) {
        s->reslices++, s->rs_tokens += given;
        seq_publish(e, s); /* the budgets engines read (cake_layer_budget) */
    }
    return given;
}

void seq_reslice_work(const struct seq_env *e, struct seq *s, struct seq_result *r)
{
    uint32_t over[SEQ_MAX_LAYERS], nover = 0, evicted[SEQ_MAX_LAYERS] = {0};
    int rcs[SEQ_MAX_LAYERS] = {0};
    *r = (struct seq_result){0};
    if (mid_prompt(s)) { /* the cascade's stage again, at the lowered total */
        struct cakeseq_evict ev[SEQ_MAX_LAYERS];
        uint32_t nev = 0;
        r->rc = cakeseq_restage(s->cs, ev, &nev);
        if (!r->rc && nev)
            r->rc = seq_exec(s)->compact(e, s, ev, nev, r);
        if (!r->rc)
            s->rs_pending = 0;
        return;
    }
    for (uint32_t l = 0; l < s->L; l++)
        if (seq_layer_resliced(s, l))
            over[nover++] = l;
    if (!nover)
        return;
    if (s->cfg.accumulate && s->gpu) { /* H2O: by the scores accumulated so far, nothing added */
        uint32_t ev_all[SEQ_MAX_LAYERS];
        int rc_all[SEQ_MAX_LAYERS];
        seq_gpu_h2o(e, s, 0, ev_all, rc_all);
        for (uint32_t i = 0; i < nover; i++)
            evicted[i] = ev_all[over[i]], rcs[i] = rc_all[over[i]];
    } else if (s->cfg.accumulate) {
        for (uint32_t i = 0; i < nover; i++)
            rcs[i] = seq_host_h2o_trim(e, s, over[i], &evicted[i]);
    } else {
        uint32_t w = s->cfg.window, v0 = s->n < w ? s->n : w;
        uint32_t valid = v0 + s->decoded < w ? v0 + s->decoded : w;
        seq_exec(s)->decode_evict(e, s, over, nover, valid, evicted, rcs);
        s->dlse_used = 0; /* caked_decode_lse_layers_total counts decode steps' */
    }
    for (uint32_t i = 0; i < nover; i++) {
        if (rcs[i] && !r->rc)
            r->rc = rcs[i];
        if (!rcs[i]) {
            r->evicted_tokens += evicted[i];
            r->ev_layers[r->n_ev++] = over[i];
        }
    }
    if (!r->rc)
        s->rs_pending = 0;
}

/* ---- parking ----------------------------------------------------------------------- */

uint64_t seq_kv_pages(const struct seq *s)
{
    uint64_t n = 0;
    for (uint32_t l = 0; l < s->L; l++)
        n += s->layer[l].n_pages;
    return n;
}

int seq_move_prepare(const struct seq_env *e, struct seq *s, int park, const char **why)
{
    if (!s->gpu || s->group || s->next_observe != s->L || s->moving || s->busy) {
        *why = !s->gpu ? "only GPU sequences park (host sequences are in host memory already)"
               : s->group ? "a shard of a group does not park alone"
               : s->busy || s->moving ? "sequence busy"
                                      : "a sequence parks once its prompt is prefilled";
        return s->gpu && !s->group ? CAKE_ESTATE : CAKE_EINVAL;
    }
    struct pool *to = park ? e->pool : GPOOL(e, s);
    uint64_t n = seq_kv_pages(s), pb = to->page_bytes;
    int bad = park ? tenant_admit(e->tenants, s->tenant, n * pb, pool_avail(to, s->tenant->id) * pb,
                                  to->bytes)
                   : tenant_admit_gpu(e->tenants, s->tenant, n * pb,
                                      pool_avail(to, s->tenant->id) * pb, to->bytes);
    if (bad) {
        *why = park ? "parking it: its pages exceed the tenant's share of the host pool"
                    : "restoring the parked sequence: its pages exceed the tenant's share of the "
                      "GPU pool";
        return CAKE_EOOM;
    }
    if (!s->mv && !(s->mv = malloc(sizeof(uint32_t) * ((size_t)s->L * s->max_pages + 1)))) {
        *why = "out of memory";
        return -ENOMEM;
    }
    for (uint32_t l = 0; l < s->L; l++) {
        uint32_t *m = s->mv + (size_t)l * s->max_pages;
        if (pool_alloc_list(to, s->layer[l].n_pages, s->tenant->id, POOL_SCATTER, m)) {
            for (uint32_t k = 0; k < l; k++)
                pool_free_list(to, s->mv + (size_t)k * s->max_pages, s->layer[k].n_pages);
            *why = park ? "no free host pool pages to park it" : "no free GPU pool pages to restore it";
            return CAKE_EOOM;
        }
    }
    if (park)
        seq_account(e, s, (int64_t)n);
    else
        seq_account_gpu(e, s, (int64_t)n);
    s->moving = park ? 1 : 2;
    return 0;
}

void seq_move_work(const struct seq_env *e, struct seq *s, struct seq_result *r)
{
    *r = (struct seq_result){0};
    int park = s->moving == 1;
    struct gpuctx *gc = gpuexec_take(GEXEC(e, s));
    uint64_t pb = e->pool->page_bytes;
    for (uint32_t l = 0; l < s->L && !r->rc; l++) {
        const uint32_t *src = s->layer[l].pages, *dst = s->mv + (size_t)l * s->max_pages;
        uint32_t n = s->layer[l].n_pages;
        r->rc = park ? gpuctx_copy_pages(gc, GPOOL(e, s)->base, src, e->pool->base, dst, n, pb, 1)
                     : gpuctx_copy_pages(gc, GPOOL(e, s)->base, dst, e->pool->base, src, n, pb, 0);
    }
    gpuexec_put(GEXEC(e, s), gc);
    if (r->rc)
        return;
    for (uint32_t l = 0; l < s->L; l++) { /* the layers name the new pages, mv the old */
        uint32_t *p = s->layer[l].pages, *m = s->mv + (size_t)l * s->max_pages;
        for (uint32_t i = 0; i < s->layer[l].n_pages; i++) {
            uint32_t t = p[i];
            p[i] = m[i], m[i] = t;
        }
    }
    s->parked = park;
}

void seq_move_commit(const struct seq_env *e, struct seq *s, const struct seq_result *r)
{
    /* mv holds the pages to give back: the old ones after a move, the new ones after a
     * failure; they are in the pool the sequence is not in now */
    int done = !r->rc;
    struct pool *p = done ? (s->parked ? GPOOL(e, s) : e->pool) /* where it was */
                          : (s->moving == 1 ? e->pool : GPOOL(e, s)); /* where it was going */
    uint64_t n = seq_kv_pages(s);
    for (uint32_t l = 0; l < s->L; l++)
        pool_free_list(p, s->mv + (size_t)l * s->max_pages, s->layer[l].n_pages);
    if (p == e->pool)
        seq_account(e, s, -(int64_t)n);
    else
        seq_account_gpu(e, s, -(int64_t)n);
    if (done && s->parked)
        s->parks++;
    s->moving = 0;
    free(s->mv);
    s->mv = NULL;
    seq_publish(e, s);
}

void seq_expect(const struct seq_env *e, struct seq *s, uint64_t pages, int gpu)
{
    int64_t pb = (int64_t)e->pool->page_bytes;
    if (s->rs_expect)
        tenant_giving(s->tenant, s->rs_expect_gpu, -(int64_t)s->rs_expect * pb);
    s->rs_expect = pages, s->rs_expect_gpu = gpu;
    if (pages)
        tenant_giving(s->tenant, gpu, (int64_t)pages * pb);
}

/* ---- relocation ---------------------------------------------------------------------- */

uint32_t seq_reloc_prepare(const struct seq_env *e, struct seq *s)
{
    struct pool *p = seq_kv_pool(e, s);
    if (!p->draining || s->busy || s->moving || s->parked || s->reloc)
        return 0;
    uint32_t n = 0, full = 0;
    for (uint32_t l = 0; l < s->next_reserve && !n; l++)
        for (uint32_t i = 0; i < s->layer[l].n_pages && !n; i++)
            n = pool_page_draining(p, s->layer[l].pages[i]);
    if (!n || (!s->mv && !(s->mv = malloc(sizeof(uint32_t) * ((size_t)s->L * s->max_pages + 1)))))
        return 0;
    n = 0;
    for (uint32_t l = 0; l < s->next_reserve; l++) {
        const uint32_t *pg = s->layer[l].pages;
        uint32_t *m = s->mv + (size_t)l * s->max_pages;
        for (uint32_t i = 0; i < s->layer[l].n_pages; i++) {
            int64_t to = -1;
            if (!full && pool_page_draining(p, pg[i]) && (to = pool_alloc_in(p, s->tenant->id)) < 0)
                full = 1; /* the rest at its next job, when eviction made room */
            m[i] = to < 0 ? pg[i] : (uint32_t)to;
            n += to >= 0;
        }
    }
    if (!n) {
        free(s->mv);
        s->mv = NULL;
        return 0;
    }
    seq_account_kv(e, s, n); /* held by both until the commit */
    s->reloc = 1;
    return n;
}

void seq_reloc_work(const struct seq_env *e, struct seq *s, struct seq_result *r)
{
    if (r->rc)
        return;
    struct pool *p = seq_kv_pool(e, s);
    uint64_t pb = p->page_bytes;
    struct gpuctx *gc = s->gpu ? gpuexec_take(GEXEC(e, s)) : NULL;
    for (uint32_t l = 0; l < s->next_reserve && !r->rc; l++) {
        struct seq_layer *ly = &s->layer[l];
        const uint32_t *m = s->mv + (size_t)l * s->max_pages;
        uint32_t keep = (ly->tokens + s->tpp - 1) / s->tpp; /* the pages still in use */
        keep = keep < ly->n_pages ? keep : ly->n_pages;
        if (gc) {
            r->rc = gpuctx_copy_pages_d2d(gc, p->base, ly->pages, m, keep, pb);
        } else {
            for (uint32_t i = 0; i < keep; i++)
                if (m[i] != ly->pages[i])
                    memcpy(pool_ptr(p, m[i]), pool_ptr(p, ly->pages[i]), pb);
        }
    }
    if (gc)
        gpuexec_put(GEXEC(e, s), gc);
    if (r->rc)
        return;
    for (uint32_t l = 0; l < s->next_reserve; l++) { /* the layers name the new pages */
        uint32_t *pg = s->layer[l].pages, *m = s->mv + (size_t)l * s->max_pages;
        for (uint32_t i = 0; i < s->layer[l].n_pages; i++) {
            uint32_t t = pg[i];
            pg[i] = m[i], m[i] = t;
        }
    }
    s->reloc = 2; /* moved */
}

uint64_t seq_reloc_commit(const struct seq_env *e, struct seq *s)
{
    if (!s->reloc)
        return 0;
    struct pool *p = seq_kv_pool(e, s);
    uint64_t n = 0;
    for (uint32_t l = 0; l < s->next_reserve; l++) {
        const uint32_t *pg = s->layer[l].pages, *m = s->mv + (size_t)l * s->max_pages;
        for (uint32_t i = 0; i < s->layer[l].n_pages; i++)
            if (m[i] != pg[i]) /* moved: the old page; not moved (a failure): the new one */
                pool_free_run(p, m[i], 1), n++;
    }
    seq_account_kv(e, s, -(int64_t)n);
    n = s->reloc == 2 ? n : 0;
    s->reloc = 0;
    free(s->mv);
    s->mv = NULL;
    return n;
}
