/* pressure.c - making room instead of refusing (see pressure.h): the requests waiting for
 * room, the plan that lowers a tenant's budgets, and the re-slice jobs that apply it. */
#define _GNU_SOURCE /* struct ucred (server_int.h) */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "frame.h"
#include "pressure.h"
#include "server_int.h"

const char *pressure_mode_name(int m)
{
    return m == PRESSURE_REFUSE ? "refuse" : m == PRESSURE_PARK ? "park" : "reslice";
}

int pressure_mode_parse(const char *s)
{
    return !strcmp(s, "reslice") ? PRESSURE_RESLICE
           : !strcmp(s, "refuse") ? PRESSURE_REFUSE
           : !strcmp(s, "park")   ? PRESSURE_PARK
                                  : -1;
}

/* A request waiting for room. Sequences are named by id (looked up again at each retry:
 * nothing here points at a sequence that may go meanwhile). */
struct waiter {
    struct waiter *next;
    uint64_t client_id;
    uint32_t tenant_id;      /* its client's: what other tenants drain for (plan_others) */
    uint16_t type;           /* MSG_SEQ_OPEN, MSG_PREFILL_RESERVE or MSG_DECODE_STEP */
    double t0, deadline;
    struct seq_open_args a;  /* open */
    uint64_t seq_id;         /* reserve */
    uint32_t layer;
    uint64_t *ids;           /* decode step: its sequences */
    uint32_t n, evictions;
    int restore;             /* decode step: its parked sequences must come back first */
    char why[200];           /* the refusal it waits to overcome */
};

static int mode_of(const struct server *s, const struct tenant *t)
{
    return t->pressure ? t->pressure : s->cfg.pressure ? s->cfg.pressure : PRESSURE_RESLICE;
}

static uint32_t min_tokens_of(const struct server *s, const struct tenant *t)
{
    return t->min_tokens ? t->min_tokens : s->cfg.min_tokens ? s->cfg.min_tokens : 64;
}

static struct pool *pool_of(struct server *s, int gpu, uint32_t dev)
{
    return gpu ? &s->gpus[dev].pages : &s->pool;
}

/* Pages tenant t lacks for `need` more pages in that pool (0: it fits now). Bound by its
 * own cap, what it holds beyond the cap (its share shrank as others came) is lacking too:
 * one cut gives it all, not a page per request. */
static uint64_t shortfall(struct server *s, const struct tenant *t, int gpu, uint32_t dev,
                          uint64_t need, int *own_bound)
{
    struct pool *p = pool_of(s, gpu, dev);
    uint64_t pb = p->page_bytes;
    uint64_t room = tenant_room(&s->tenants, t, gpu, pool_avail(p, t->id) * pb, p->bytes, own_bound);
    uint64_t want = need * pb;
    if (*own_bound && want > room) {
        uint64_t cap = gpu ? tenant_cap_gpu(&s->tenants, t, p->bytes) : tenant_cap(&s->tenants, t, p->bytes);
        uint64_t used = gpu ? t->gpu_used_bytes : t->used_bytes;
        uint64_t giving = gpu ? t->gpu_giving_bytes : t->giving_bytes;
        used = used > giving ? used - giving : 0;
        want += used > cap ? used - cap : 0;
    }
    return want > room ? (want - room + pb - 1) / pb : 0;
}

static int in_pool(const struct seq *q, int gpu, uint32_t dev)
{
    return q->gpu ? gpu && q->gpu_dev == dev : !gpu;
}

/* ---- the plan ------------------------------------------------------------------ */

struct cand {
    struct seq *q;
    uint64_t held, floor;   /* prefix tokens over all layers, and their floors */
    int now;                /* its engine is in this call: compacted at once */
};

/* Each candidate's total after cutting a fraction f / 4096 of what it may give; the pages
 * all of them would give back then (b: scratch for one sequence's budgets). */
static uint64_t freed_at(const struct cand *c, uint32_t n, uint32_t f, uint32_t mt, uint32_t *b,
                         int now_only)
{
    uint64_t pages = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (now_only && !c[i].now)
            continue;
        uint64_t give = (c[i].held - c[i].floor) * f / 4096;
        if (!give)
            continue;
        seq_reslice_budgets(c[i].q, mt, c[i].held - give, b);
        pages += seq_reslice_pages_freed(c[i].q, b);
    }
    return pages;
}

static int in_batch(uint64_t id, const uint64_t *ids, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] == id)
            return 1;
    return 0;
}

static int by_use(const void *a, const void *b)
{
    double x = (*(struct seq *const *)a)->t_used, y = (*(struct seq *const *)b)->t_used;
    return x < y ? -1 : x > y;
}

/* Parking (pressure=park, short of GPU pages): the tenant's GPU sequences that c's call has
 * in hand (its idle ones, with shrink_idle), least recently used first, go to the host pool
 * until their pages cover `need`. Returns the GPU pages that will come back. */
static uint64_t park_some(struct server *s, struct client *c, uint32_t dev, uint64_t need,
                          const uint64_t *batch, uint32_t nb)
{
    if (!c->shrink_idle)
        return 0;
    struct seq **cand = malloc(sizeof(*cand) * (s->n_seqs + 1));
    uint32_t n = 0;
    for (uint32_t i = 0; cand && i < s->n_slots; i++) {
        struct seq *q = s->slots[i].s;
        if (q && q->owner == c->id && q->gpu && q->gpu_dev == dev && !q->parked && !q->moving &&
            !q->busy && !q->orphaned && !q->group && q->next_observe == q->L &&
            !in_batch(q->id, batch, nb) && n < s->n_seqs)
            cand[n++] = q;
    }
    qsort(cand, n, sizeof(*cand), by_use);
    uint64_t got = 0;
    uint32_t nj = 0;
    for (uint32_t i = 0; i < n && got < need; i++) {
        const char *why;
        if (seq_move_prepare(&s->env, cand[i], 1, &why))
            break; /* the host pool has no room either */
        seq_expect(&s->env, cand[i], seq_kv_pages(cand[i]), 1);
        got += cand[i]->rs_expect;
        cand[nj++] = cand[i];
    }
    srv_logl(SRV_LOG_DEBUG, "pressure: tenant %s lacks %llu GPU pages: parking %u sequences "
             "(%llu pages)", c->tenant->name, (unsigned long long)need, nj, (unsigned long long)got);
    if (nj)
        work_start_pressure(s, c, MSG_PARK, cand, nj);
    else
        free(cand);
    return got;
}

/* Lowers the budgets of tenant t's sequences in the pool so that they give back `need`
 * pages, by the same fraction of what each may give above its floors. With a client c (the
 * requester, t its tenant) the sequences in c's call (the batch ids, and with shrink_idle
 * all of c's idle ones) are cut first and compacted by a re-slice job now; without (another
 * tenant giving room: none of its engines is in this call) every cut waits for the
 * sequence's own next job. Returns 1 if the room is on its way, 0 if even the floors would
 * not make it (nothing is changed then). */
static int cut(struct server *s, struct client *c, struct tenant *t, int gpu, uint32_t dev,
               uint64_t need, const uint64_t *batch, uint32_t nb)
{
    uint32_t n = 0, mt = min_tokens_of(s, t);
    for (uint32_t i = 0; i < s->n_slots; i++) {
        struct seq *q = s->slots[i].s;
        n += q && q->tenant == t && in_pool(q, gpu, dev);
    }
    struct cand *cd = calloc(n + 1, sizeof(*cd));
    uint32_t *b = malloc(sizeof(uint32_t) * SEQ_MAX_LAYERS);
    if (!cd || !b) {
        free(cd), free(b);
        return 0;
    }
    uint32_t nc = 0;
    for (uint32_t i = 0; i < s->n_slots && nc < n; i++) {
        struct seq *q = s->slots[i].s;
        if (!q || q->tenant != t || !in_pool(q, gpu, dev) || !seq_reslice_ok(q) || q->rs_pending)
            continue;
        struct cand x = {.q = q};
        x.held = seq_reslice_room(q, mt, &x.floor);
        if (x.held <= x.floor)
            continue;
        if (c) {
            x.now = in_batch(q->id, batch, nb) || (q->owner == c->id && c->shrink_idle);
            if (q->owner == c->id && !x.now)
                continue; /* its engine waits in this call: its next step cannot come meanwhile */
        }
        cd[nc++] = x;
    }
    int ok = 0;
    for (int now_only = c != NULL; now_only >= 0 && !ok; now_only--) {
        if (freed_at(cd, nc, 4096, mt, b, now_only) < need)
            continue;
        uint32_t lo = 1, hi = 4096; /* the least fraction that makes the room */
        while (lo < hi) {
            uint32_t mid = (lo + hi) / 2;
            if (freed_at(cd, nc, mid, mt, b, now_only) >= need)
                hi = mid;
            else
                lo = mid + 1;
        }
        struct seq **job = malloc(sizeof(*job) * (nc + 1));
        uint32_t nj = 0;
        for (uint32_t i = 0; i < nc; i++) {
            struct cand *x = &cd[i];
            uint64_t give = (x->held - x->floor) * lo / 4096;
            if ((now_only && !x->now) || !give)
                continue;
            seq_reslice_budgets(x->q, mt, x->held - give, b);
            seq_expect(&s->env, x->q, seq_reslice_pages_freed(x->q, b), x->q->gpu && !x->q->parked);
            uint64_t tokens = seq_reslice_commit(&s->env, x->q, x->held - give, b);
            t->reslices++, t->rs_tokens += tokens;
            s->m.reslices++, s->m.reslice_tokens += tokens;
            if (job && x->now && x->q->rs_pending)
                job[nj++] = x->q;
        }
        srv_logl(SRV_LOG_DEBUG, "pressure: tenant %s gives %llu pages%s: %u%% of what %u "
                 "sequences may give, %u of them now", t->name, (unsigned long long)need,
                 c ? "" : " to another", (unsigned)(lo * 100 / 4096), nc, nj);
        if (c && nj)
            work_start_pressure(s, c, MSG_RESLICE, job, nj);
        else
            free(job);
        ok = 1; /* without memory for the job's list the budgets wait for the next steps */
    }
    free(cd), free(b);
    return ok;
}

/* c's tenant lacks `short_` pages of the pool and its own sequences must give them: what
 * re-slices under way will give counts, then parking (pressure=park), then a cut. */
static int plan(struct server *s, struct client *c, int gpu, uint32_t dev, uint64_t short_,
                const uint64_t *batch, uint32_t nb)
{
    struct tenant *t = c->tenant;
    uint64_t pending = 0, n = 0;
    for (uint32_t i = 0; i < s->n_slots; i++) {
        struct seq *q = s->slots[i].s;
        if (!q || q->tenant != t || !in_pool(q, gpu, dev))
            continue;
        n++;
        /* c's own sequences outside this call cannot step while it waits */
        if (q->owner != c->id || c->shrink_idle || in_batch(q->id, batch, nb))
            pending += q->rs_expect;
    }
    if (pending >= short_)
        return 1;
    if (gpu && mode_of(s, t) == PRESSURE_PARK) { /* idle sequences to the host first */
        pending += park_some(s, c, dev, short_ - pending, batch, nb);
        if (pending >= short_)
            return 1;
    }
    /* a page to spare per sequence of the tenant: what a step or a rounding may take back */
    return cut(s, c, t, gpu, dev, short_ - pending + n, batch, nb);
}

/* Pages of the pool's segments drained for owner `to`: promised (empty) or still draining. */
static uint64_t drained_for(const struct pool *p, uint32_t to)
{
    uint64_t n = p->promised_to[to];
    for (uint32_t i = 0; p->draining && i < p->n_segs; i++)
        if (p->seg[i].drain == to && p->seg[i].used)
            n += pool_seg_pages(p, i);
    return n;
}

/* c's tenant lacks `short_` pages of the pool although it is within its own share: other
 * tenants give them, those holding more than their share (their cap: maximum or weighted
 * share, at least their minimum) or free pages in their segments, each in proportion to
 * what it holds beyond that. A donor's least used segments are drained for the requester
 * (pool_drain: promised to it once empty) and its budgets lowered so that its sequences fit
 * in its other segments, a page per sequence to spare; its sequences move and shrink at
 * their own next jobs (never between their engine's calls). Returns the pages on their way
 * (drained before, and now). */
static uint64_t plan_others(struct server *s, struct client *c, int gpu, uint32_t dev,
                            uint64_t short_)
{
    struct pool *p = pool_of(s, gpu, dev);
    struct tenant *t = c->tenant;
    uint64_t coming = drained_for(p, t->id);
    if (coming >= short_ || mode_of(s, t) == PRESSURE_REFUSE)
        return coming;
    uint64_t need = short_ - coming, total = 0, pb = p->page_bytes;
    struct tenants *ts = &s->tenants;
    /* per tenant slot: what it may give, of it beyond its cap, and its free pages */
    uint64_t *give = calloc(3 * ((size_t)ts->n + 1), sizeof(*give));
    if (!give)
        return coming;
    uint64_t *excess = give + ts->n + 1, *free_of = excess + ts->n + 1;
    for (uint32_t k = 0; k < ts->n; k++) {
        struct tenant *d = &ts->t[k];
        if (!d->in_use || d == t)
            continue;
        uint64_t used, owned = pool_owned_pages(p, d->id, &used);
        uint64_t cap = (gpu ? tenant_cap_gpu(ts, d, p->bytes) : tenant_cap(ts, d, p->bytes)) / pb;
        excess[k] = used > cap ? used - cap : 0;
        free_of[k] = owned - used;
        give[k] = free_of[k] + excess[k];
        total += give[k];
    }
    for (uint32_t k = 0; k < ts->n && total; k++) {
        struct tenant *d = &ts->t[k];
        if (!give[k])
            continue;
        uint64_t want = (need * give[k] + total - 1) / total; /* its part, rounded up */
        uint64_t free_in = free_of[k], nseq = 0, room = 0, fl;
        for (uint32_t i = 0; i < s->n_slots; i++) {
            struct seq *q = s->slots[i].s;
            if (!q || q->tenant != d || !in_pool(q, gpu, dev))
                continue;
            nseq++;
            if (seq_reslice_ok(q) && !q->rs_pending) { /* pages a cut could free at most */
                uint32_t b[SEQ_MAX_LAYERS];
                uint64_t h = seq_reslice_room(q, min_tokens_of(s, d), &fl);
                if (h > fl) {
                    seq_reslice_budgets(q, min_tokens_of(s, d), fl, b);
                    room += seq_reslice_pages_freed(q, b);
                }
            }
        }
        uint64_t cut_max = mode_of(s, d) == PRESSURE_REFUSE ? 0 /* its budgets are its own */
                           : excess[k] < room ? excess[k] : room;
        if (free_in + cut_max <= nseq)
            continue;
        uint64_t moving, got = pool_drain(p, d->id, t->id, want, free_in + cut_max - nseq, &moving);
        if (!got)
            continue;
        uint64_t cut_pages = got + nseq > free_in ? got + nseq - free_in : 0;
        if (cut_pages && !cut(s, NULL, d, gpu, dev, cut_pages, NULL, 0)) {
            pool_undrain(p, t->id); /* its floors would not make it after all */
            break;
        }
        srv_logl(SRV_LOG_DEBUG, "pressure: tenant %s lacks %llu pages: %llu drained from tenant "
                 "%s (%llu pages to move, %llu given up)", t->name, (unsigned long long)need,
                 (unsigned long long)got, d->name, (unsigned long long)moving,
                 (unsigned long long)cut_pages);
        d->drained += got, s->m.pages_drained += got;
        t->drain_until = clock_now_s() + s->cfg.pressure_wait_s;
        coming += got;
    }
    free(give);
    return coming;
}

/* ---- re-slice jobs ---------------------------------------------------------------- */

void pressure_job_done(struct server *s, struct work *w)
{
    for (uint32_t i = 0; i < w->n; i++) {
        struct seq *q = w->seqs[i];
        q->busy = 0;
        work_commit_seq(s, q, &w->res[i], w->type == MSG_PARK);
        s->m.evictions_reslice += w->res[i].n_ev;
        s->m.tokens_evicted += w->res[i].evicted_tokens;
        if (q->orphaned)
            srv_seq_remove(s, q);
    }
    struct client *c = srv_client_by_id(s, w->client_id);
    if (c && c->rs_jobs)
        c->rs_jobs--;
    work_free(w);
    pressure_poll(s);
}

/* ---- waiting ---------------------------------------------------------------------- */

static struct waiter *waiter_new(struct server *s, struct client *c, uint16_t type, const char *why)
{
    struct waiter *x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    x->client_id = c->id, x->tenant_id = c->tenant->id, x->type = type;
    x->t0 = clock_now_s(), x->deadline = x->t0 + s->cfg.pressure_wait_s;
    snprintf(x->why, sizeof x->why, "%s", why);
    return x;
}

static void enqueue(struct server *s, struct waiter *x)
{
    struct waiter **pp = &s->waiters;
    while (*pp)
        pp = &(*pp)->next;
    *pp = x;
    s->n_waiting++;
}

static void waiter_free(struct waiter *x)
{
    free(x->ids);
    free(x);
}

/* Does the request fit now? If not, plan (again) for what it lacks: 1 room is coming or
 * may come, 0 it cannot. *fits: it fits now. */
static int make_room(struct server *s, struct client *c, const struct waiter *x, int *fits)
{
    uint64_t host = 0, gpu[SERVER_MAX_GPUS] = {0};
    *fits = 0;
    if (x->type == MSG_SEQ_OPEN) {
        seq_open_pages(&s->env, &x->a, &host, &gpu[x->a.gpu_dev]);
    } else if (x->type == MSG_PREFILL_RESERVE) {
        struct seq *q = srv_seq_of(s, c, x->seq_id);
        if (!q)
            return 0;
        *(q->gpu ? &gpu[q->gpu_dev] : &host) += ((uint64_t)q->n + q->tpp - 1) / q->tpp;
    } else {
        for (uint32_t i = 0; i < x->n; i++) {
            struct seq *q = srv_seq_of(s, c, x->ids[i]);
            if (!q)
                return 0;
            if (x->restore && q->parked) /* its K/V pages back on its GPU */
                gpu[q->gpu_dev] += seq_kv_pages(q);
            else if (!x->restore)
                *(q->gpu ? &gpu[q->gpu_dev] : &host) += seq_decode_pages_needed(q);
        }
    }
    int all_fit = 1, coming = 1;
    for (uint32_t p = 0; p <= s->n_gpus; p++) {
        int g = p > 0;
        uint32_t dev = g ? p - 1 : 0;
        uint64_t need = g ? gpu[dev] : host;
        int own = 0;
        uint64_t sh = need ? shortfall(s, c->tenant, g, dev, need, &own) : 0;
        if (!sh)
            continue;
        all_fit = 0;
        /* within its share, the pool is what binds: tenants beyond theirs give first */
        if (!own) {
            uint64_t others = plan_others(s, c, g, dev, sh);
            if (others >= sh)
                continue;
            sh -= others;
        }
        /* what the tenant's own sequences cannot give, others' endings may (pool-bound) */
        /* in this call: a decode step's sequences, a reserve's own (its earlier layers) */
        int one = x->type == MSG_PREFILL_RESERVE;
        if (!plan(s, c, g, dev, sh, one ? &x->seq_id : x->ids, one ? 1 : x->n) && own)
            coming = 0;
    }
    *fits = all_fit;
    return all_fit || coming;
}

static int wait_for_room(struct server *s, struct client *c, struct waiter *x)
{
    int fits;
    /* fitting already: the refusal was not about pages (caked's heap, a fragmented pool) */
    if (mode_of(s, c->tenant) == PRESSURE_REFUSE || s->cfg.pressure_wait_s <= 0 || s->stopping ||
        !make_room(s, c, x, &fits) || fits) {
        waiter_free(x);
        return 0;
    }
    enqueue(s, x);
    if (c->state != C_BUSY)
        c->state = C_BUSY; /* the handler returns without a reply: the request waits */
    return 1;
}

int pressure_wait_open(struct server *s, struct client *c, const struct seq_open_args *a,
                       const char *why)
{
    struct waiter *x = waiter_new(s, c, MSG_SEQ_OPEN, why);
    if (!x)
        return 0;
    x->a = *a;
    return wait_for_room(s, c, x);
}

int pressure_wait_reserve(struct server *s, struct client *c, struct seq *q, uint32_t layer,
                          const char *why)
{
    struct waiter *x = waiter_new(s, c, MSG_PREFILL_RESERVE, why);
    if (!x)
        return 0;
    x->seq_id = q->id, x->layer = layer;
    return wait_for_room(s, c, x);
}

static int wait_decode(struct server *s, struct client *c, struct seq *const *seqs, uint32_t n,
                       uint32_t evictions, int restore, const char *why)
{
    struct waiter *x = waiter_new(s, c, MSG_DECODE_STEP, why);
    if (!x || !(x->ids = malloc(sizeof(uint64_t) * n))) {
        free(x);
        return 0;
    }
    for (uint32_t i = 0; i < n; i++)
        x->ids[i] = seqs[i]->id;
    x->n = n, x->evictions = evictions, x->restore = restore;
    return wait_for_room(s, c, x);
}

int pressure_wait_decode(struct server *s, struct client *c, struct seq *const *seqs, uint32_t n,
                         uint32_t evictions, const char *why)
{
    return wait_decode(s, c, seqs, n, evictions, 0, why);
}

int pressure_wait_restore(struct server *s, struct client *c, struct seq *const *seqs, uint32_t n,
                          const char *why)
{
    return wait_decode(s, c, seqs, n, 0, 1, why);
}

/* Tries x's request again: 1 done (replied, success or an error other than lack of room),
 * 0 still short of room. */
static int retry(struct server *s, struct client *c, struct waiter *x)
{
    const char *why = "";
    if (x->type == MSG_SEQ_OPEN) {
        int rc = srv_seq_open(s, c, &x->a, &why);
        if (rc == CAKE_EOOM)
            return 0;
        if (rc)
            srv_reply_error(s, c, rc < -4095 ? rc : CAKE_EINTERNAL, "%s", why);
        return 1;
    }
    if (x->type == MSG_PREFILL_RESERVE) {
        struct seq *q = srv_seq_of(s, c, x->seq_id);
        int rc = q ? seq_reserve(&s->env, q, x->layer, &why) : CAKE_ENOSEQ;
        if (rc == CAKE_EOOM)
            return 0;
        if (rc)
            srv_reply_error(s, c, rc, "%s", q ? why : "the sequence is gone");
        else
            srv_reply(s, c, MSG_PREFILL_RESERVE, NULL);
        return 1;
    }
    if (x->restore) { /* room for the parked ones now: the step starts again */
        int fits = 0;
        if (!make_room(s, c, x, &fits) || !fits)
            return 0;
        srv_decode(s, c, x->ids, x->n, 0, NULL); /* the bits its first try recorded */
        return 1;
    }
    struct seq **seqs = malloc(sizeof(*seqs) * x->n);
    if (!seqs) {
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return 1;
    }
    for (uint32_t i = 0; i < x->n; i++) {
        int rc = (seqs[i] = srv_seq_of(s, c, x->ids[i])) ? seq_decode_check(seqs[i], &why)
                                                         : CAKE_ENOSEQ;
        if (rc) {
            srv_reply_error(s, c, rc, "sequence %#llx: %s", (unsigned long long)x->ids[i],
                            rc == CAKE_ENOSEQ ? "no such sequence" : why);
            free(seqs);
            return 1;
        }
    }
    int rc = seq_decode_admit(&s->env, c->tenant, seqs, x->n, &why);
    if (!rc)
        work_decode_reply(s, c, seqs, x->n, x->evictions);
    free(seqs);
    return !rc;
}

/* Segments drained for a tenant none of whose requests waits any more, and none for a
 * --pressure-wait since the drain (a prompt's next layer asks soon after the last), go
 * back to their owners (still in use) or to anyone (empty). */
static void undrain_idle(struct server *s)
{
    double now = -1;
    for (uint32_t k = 0; k <= s->n_gpus; k++) {
        struct pool *p = pool_of(s, k > 0, k ? k - 1 : 0);
        for (uint32_t i = 0; (p->draining || p->promised) && i < p->n_segs; i++) {
            uint32_t to = p->seg[i].drain;
            struct waiter *x = s->waiters;
            while (to && x && x->tenant_id != to)
                x = x->next;
            if (!to || x)
                continue;
            if (now < 0)
                now = clock_now_s();
            const struct tenant *t = to <= s->tenants.n ? &s->tenants.t[to - 1] : NULL;
            if (!t || !t->in_use || now >= t->drain_until)
                pool_undrain(p, to);
        }
    }
}

void pressure_poll(struct server *s)
{
    if (s->polling)
        return;
    undrain_idle(s);
    if (!s->waiters)
        return;
    /* a reply may read and dispatch the client's next requests (which may wait, or close
     * clients): the list is taken off first, and what still waits goes back ahead of
     * whatever came meanwhile */
    s->polling = 1;
    double now = clock_now_s();
    struct waiter *list = s->waiters, *keep = NULL, **kt = &keep;
    s->waiters = NULL;
    while (list) {
        struct waiter *x = list;
        list = x->next, x->next = NULL;
        struct client *c = srv_client_by_id(s, x->client_id);
        int done = 0;
        if (!c || c->state == C_CLOSED) {
            done = 1;
        } else if (!c->rs_jobs) { /* its own re-slice must finish before it may go on */
            int fits = 0;
            if (retry(s, c, x)) {
                done = 1;
                c->tenant->waits_granted++, s->m.waits_granted++;
            } else if (now >= x->deadline || s->stopping || !make_room(s, c, x, &fits) || fits) {
                srv_oom(s, c, x->why);
                srv_reply_error(s, c, CAKE_EOOM, "%s (waited %.1f s for room)", x->why, now - x->t0);
                c->tenant->waits_refused++, s->m.waits_refused++;
                done = 1;
            }
        }
        if (done) {
            s->n_waiting--;
            waiter_free(x);
        } else {
            *kt = x, kt = &x->next;
        }
    }
    *kt = s->waiters;
    s->waiters = keep;
    s->polling = 0;
    undrain_idle(s);
}

void pressure_forget(struct server *s, uint64_t client_id)
{
    for (struct waiter **pp = &s->waiters; *pp;) {
        struct waiter *x = *pp;
        if (x->client_id == client_id) {
            *pp = x->next;
            s->n_waiting--;
            waiter_free(x);
        } else {
            pp = &x->next;
        }
    }
}
