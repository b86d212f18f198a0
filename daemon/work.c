/* work.c - requests that run on the workers (prefill observe/submit, decode steps): a job
 * per request, its run on a worker (each sequence's layers, skipped once its owner is gone;
 * a decode step of several sequences split over the workers, or its GPU evictions launched
 * by the loop itself and polled), and its completion on the loop (commit, accounting, the
 * reply). Shard groups' two phases
 * meet at shard.c's barrier. See server_int.h for who owns what while a job runs. */
#define _GNU_SOURCE /* struct ucred (server_int.h) */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cake/cake.h"
#include "frame.h"
#include "pressure.h"
#include "server_int.h"

static void work_done(struct job *j);

/* A sequence whose owner went away while its work waited: nothing more is done for it
 * (the layer it is in finishes; the next one does not begin). */
static int cancelled(struct seq *q, struct seq_result *r)
{
    if (!__atomic_load_n(&q->cancel, __ATOMIC_RELAXED))
        return 0;
    *r = (struct seq_result){.rc = -ECANCELED};
    return 1;
}

/* The decode step of sequences [from, to) of w: each sequence's own work, so parts of one
 * step run on several workers at once (work_start splits it); what the loop has
 * (w->on_loop: launched by it, or launched and failed) is not redone. */
static void decode_run(struct work *w, uint32_t from, uint32_t to)
{
    const struct seq_env *e = &w->srv->env;
    for (uint32_t i = from; i < to; i++) {
        struct seq *q = w->seqs[i];
        if (w->on_loop && w->on_loop[i])
            continue;
        /* a parked sequence comes back first (its commit reads q->parked) */
        if (q->moving && (seq_move_work(e, q, &w->res[i]), w->res[i].rc))
            continue;
        if (!cancelled(q, &w->res[i]) && seq_decode_needs_evict(q))
            seq_decode_evict_work(e, q, &w->res[i]);
        if (q->reloc) /* after the eviction: only what stays moves */
            seq_reloc_work(e, q, &w->res[i]);
    }
}

/* CAKED_TEST_JOB_DELAY_MS (tests only): a job that takes that much longer, as a stuck one */
static void test_delay(const struct seq_env *e)
{
    if (e->job_delay_us)
        usleep(e->job_delay_us);
}

static void part_run(struct job *j)
{
    struct work_part *p = (struct work_part *)j;
    test_delay(&p->w->srv->env);
    decode_run(p->w, p->from, p->to);
}

static void part_done(struct job *j) /* the loop thread, like every done */
{
    struct work *w = ((struct work_part *)j)->w;
    metrics_observe_work(&w->srv->m, WORK_DECODE, j, clock_now_s());
    if (--w->parts == 0)
        work_done(&w->job); /* frees the parts with the work */
}

static void work_run(struct job *j)
{
    struct work *w = (struct work *)j;
    const struct seq_env *e = &w->srv->env;
    test_delay(e);
    if (w->type == MSG_RESLICE) {
        for (uint32_t i = 0; i < w->n; i++)
            if (!cancelled(w->seqs[i], &w->res[i]))
                seq_reslice_work(e, w->seqs[i], &w->res[i]);
    } else if (w->type == MSG_PARK) { /* a move is never skipped: its commit needs its result */
        for (uint32_t i = 0; i < w->n; i++)
            seq_move_work(e, w->seqs[i], &w->res[i]);
    } else if (w->type == MSG_DECODE_STEP) {
        decode_run(w, 0, w->n);
    } else if (w->phase == 1) { /* a shard scores its heads; the group allocates later */
        if (!cancelled(w->seqs[0], &w->res[0]))
            seq_prefill_score(e, w->seqs[0], w->layer, w->observe, w->pref, &w->res[0]);
    } else if (w->phase == 3) { /* the loop scored it; its stage needs a worker */
        seq_prefill_rest(e, w->seqs[0], w->rest, &w->res[0]);
        w->rest = NULL;
    } else if (w->phase == 2) {
        for (uint32_t i = 0; i < w->n; i++)
            if (!cancelled(w->seqs[i], &w->res[i]))
                seq_prefill_apply(e, w->seqs[i], w->layer, w->pref, &w->res[i]);
    } else if (!cancelled(w->seqs[0], &w->res[0])) {
        seq_prefill_work(e, w->seqs[0], w->layer, w->observe, w->pref, &w->res[0]);
    }
    if (w->type == MSG_PREFILL_OBSERVE || w->type == MSG_PREFILL_SUBMIT)
        for (uint32_t i = 0; i < w->n; i++)
            if (w->seqs[i]->reloc)
                seq_reloc_work(e, w->seqs[i], &w->res[i]);
}

/* A job for the n sequences seqs (taken over: freed with the job), its results zeroed. */
static struct work *work_new(struct server *s, struct seq **seqs, uint32_t n)
{
    struct work *w = calloc(1, sizeof(*w));
    struct seq_result *res = calloc(n, sizeof(*res));
    if (!w || !res) {
        free(w), free(res);
        return NULL;
    }
    w->job.run = work_run, w->job.done = work_done;
    w->srv = s, w->seqs = seqs, w->res = res, w->n = n;
    return w;
}

void work_free(struct work *w)
{
    free(w->part), free(w->fl), free(w->on_loop), free(w->seqs), free(w->res), free(w);
}

static void work_done(struct job *j)
{
    struct work *w = (struct work *)j;
    struct server *s = w->srv;
    double t_done = clock_now_s();
    metrics_observe_work(&s->m, w->pressure ? WORK_PRESSURE : w->type == MSG_DECODE_STEP
                         ? WORK_DECODE : WORK_PREFILL, j, t_done); /* a split step's: its parts' */
    for (uint32_t i = 0; i < w->n; i++)
        s->m.jobs_cancelled += w->res[i].rc == -ECANCELED;
    if (w->pressure) {
        pressure_job_done(s, w);
        return;
    }
    struct client *c = srv_client_by_id(s, w->client_id);
    if (w->phase == 2) {
        shard_group_done(s, w);
        work_free(w);
        return;
    }
    if (w->phase == 1) {
        struct seq *q = w->seqs[0];
        q->busy = 0;
        if (q->orphaned || !q->group) { /* its owner or its group went meanwhile */
            if (c && c->state == C_BUSY)
                srv_reply_error(s, c, CAKE_ENOSEQ, "the shard's group ended meanwhile");
            srv_seq_remove(s, q);
        } else {
            shard_arrive(s, w, c);
        }
        work_free(w);
        return;
    }
    int rc = 0, lost = 0;
    uint32_t evictions = 0, ev_layers[SEQ_MAX_LAYERS], n_ev = 0;
    double pref = 0;
    for (uint32_t i = 0; i < w->n; i++) {
        struct seq *q = w->seqs[i];
        const struct seq_result *r = &w->res[i];
        q->busy = 0;
        if (r->rc && !rc)
            rc = r->rc;
        if (w->type == MSG_PARK) {
            seq_move_commit(&s->env, q, r);
        } else if (w->type == MSG_DECODE_STEP) {
            /* a restore is done when it is no longer parked; published even if the step's
             * reserve is refused below */
            struct seq_result mr = {.rc = q->parked ? (r->rc ? r->rc : -EIO) : 0};
            work_commit_seq(s, q, &mr, 0);
            s->m.evictions_decode += r->n_ev;
            s->m.decode_lse_layers += r->lse_given;
            if (r->n_ev) /* the loop's are counted as they land */
                s->m.decode_by_worker += !(w->on_loop && w->on_loop[i]);
        } else {
            if (w->type == MSG_PREFILL_OBSERVE && q->gpu) {
                s->m.observe_by_loop += w->n_fl != 0;
                s->m.observe_by_worker += w->n_fl == 0;
            }
            s->m.pages_relocated += seq_reloc_commit(&s->env, q);
            seq_prefill_commit(&s->env, q, r);
            if (!q->rs_pending)
                seq_expect(&s->env, q, 0, 0); /* its cascade re-selected at the lowered total */
            s->m.evictions_prefill += r->n_ev;
            memcpy(ev_layers, r->ev_layers, sizeof(uint32_t) * r->n_ev);
            n_ev = r->n_ev, pref = r->pref;
        }
        evictions += r->n_ev;
        s->m.tokens_evicted += r->evicted_tokens;
        if (q->orphaned) {
            srv_seq_remove(s, q);
            lost = 1;
        }
    }
    if (c && c->state == C_BUSY) {
        if (rc == -ENOMEM) { /* its own heap, or a GPU another process has filled */
            srv_oom(s, c, "no memory for the work (caked's own, or on the GPU)");
            srv_reply_error(s, c, CAKE_EOOM, "%s: caked has no memory for the work now (its own, "
                            "or on the GPU)", frame_type_name(w->type));
        } else if (rc) {
            srv_reply_error(s, c, rc < -4095 ? rc : CAKE_EINTERNAL, "%s failed: %s",
                        frame_type_name(w->type), rc < -4095 ? cake_strerror(rc) : strerror(-rc));
        } else if (lost) {
            srv_reply_error(s, c, CAKE_ENOSEQ, "a sequence was closed by its owner's exit meanwhile");
        } else if (w->type == MSG_DECODE_STEP) {
            double t0 = s->env.trace ? clock_now_s() : 0;
            work_decode_reply(s, c, w->seqs, w->n, evictions);
            if (s->env.trace && j->t_end) /* one job: its stages */
                fprintf(stderr, "caked trace: decode step of %u sequences: %.0f us submitted to "
                        "commit (queued %.0f, run %.0f, back to the loop %.0f), reserve and "
                        "reply %.0f us\n", w->n, (t0 - w->t_start) * 1e6,
                        (j->t_start - j->t_submit) * 1e6, (j->t_end - j->t_start) * 1e6,
                        (t_done - j->t_end) * 1e6, (clock_now_s() - t0) * 1e6);
            else if (s->env.trace && w->n_fl)
                fprintf(stderr, "caked trace: decode step of %u sequences, %u launched by the "
                        "loop: %.0f us submitted to commit (launches %.0f, then until landed "
                        "%.0f), reserve and reply %.0f us\n", w->n, w->n_fl,
                        (t0 - w->t_start) * 1e6, (w->t_launched - w->t_start) * 1e6,
                        (t_done - w->t_launched) * 1e6, (clock_now_s() - t0) * 1e6);
            else if (s->env.trace)
                fprintf(stderr, "caked trace: decode step of %u sequences over the workers: %.0f "
                        "us submitted to commit, reserve and reply %.0f us\n", w->n,
                        (t0 - w->t_start) * 1e6, (clock_now_s() - t0) * 1e6);
        } else if (w->type == MSG_PARK) {
            srv_reply(s, c, MSG_PARK, NULL);
        } else {
            Cake__PrefillReply r = CAKE__PREFILL_REPLY__INIT;
            r.preference = pref;
            r.n_evicted_layers = n_ev, r.evicted_layers = ev_layers;
            srv_reply(s, c, w->type, &r.base);
        }
    }
    work_free(w);
    pressure_poll(s); /* pages may have come back */
}

void work_commit_seq(struct server *s, struct seq *q, const struct seq_result *r, int settled)
{
    if (q->moving)
        seq_move_commit(&s->env, q, r);
    s->m.pages_relocated += seq_reloc_commit(&s->env, q);
    seq_trim_pages(&s->env, q);
    seq_publish(&s->env, q);
    if (!q->rs_pending || settled)
        seq_expect(&s->env, q, 0, 0); /* a re-slice's room has come */
}

/* Whether sequence i of a decode step has work left for a worker (the loop's launches
 * have none). */
static int worker_has(const struct work *w, uint32_t i)
{
    const struct seq *q = w->seqs[i];
    if (w->on_loop && w->on_loop[i])
        return 0;
    return q->moving || q->reloc || seq_decode_needs_evict(q);
}

/* A decode step of many GPU sequences in parts, one per worker (sequences are independent
 * in a step; each part takes a run of them): each sequence's eviction is a launch and a wait
 * on its worker's own stream, so several workers keep the GPU busy side by side (bench-e2e
 * at batch 32 on an H200: caked's step 50 -> 20-25 ms split, when each layer was still its
 * own launches; 6.5 ms with one launch a sequence). A host sequence's eviction already spreads its layers over
 * every core (OpenMP, seq_host.c): host sequences gained nothing split (cake-workload, 8
 * sequences, this project's 2-core VM) and stay one job. 0 where fewer than two GPU
 * sequences have work in the step or the parts could not be made (the step then runs whole
 * on one worker). With the loop's flights (parts: the step completes by parts, never as
 * one job) a single part is made for whatever is left, and -ENOMEM if none could be. */
static int split_decode(struct server *s, struct work *w, int parts)
{
    uint32_t busy = 0, k = (uint32_t)workers_count(s->workers);
    for (uint32_t i = 0; i < w->n; i++) /* GPU sequences with work in this step */
        busy += w->seqs[i]->gpu && worker_has(w, i);
    k = k < w->n ? k : w->n;
    if (parts)
        k = k < busy ? k : busy ? busy : 1;
    else if (busy < 2 || k < 2)
        return 0;
    if (!(w->part = calloc(k, sizeof(*w->part))))
        return parts ? -ENOMEM : 0;
    w->parts += k;
    for (uint32_t i = 0; i < k; i++)
        w->part[i] = (struct work_part){
            .job = {.run = part_run, .done = part_done, .urgent = 1, .owner = w->job.owner,
                    .weight = w->job.weight},
            .w = w, .from = (uint32_t)((uint64_t)w->n * i / k),
            .to = (uint32_t)((uint64_t)w->n * (i + 1) / k)};
    for (uint32_t i = 0; i < k; i++)
        workers_submit(s->workers, &w->part[i].job);
    return 1;
}

/* A decode step's GPU evictions the loop launches itself, up to this many sequences a step
 * (each launch's host work - job and page tables, two copies and the kernel issued - runs
 * on the loop, 20-60 us; a larger batch's sequences are split over the workers instead).
 * The hand-off to a worker and back (two thread wake-ups, ~70 us a step on an H100 host,
 * docs/benchmarks.md) is what this saves; the loop polls the GPU while anything is in
 * flight (work_poll_flights) and serves every other connection meanwhile. */
#define LOOP_LAUNCH_MAX 4

/* Launches what it can of w's evictions from the loop; returns how many are in flight. */
static uint32_t launch_on_loop(struct server *s, struct work *w)
{
    uint32_t want = 0, n = 0;
    for (uint32_t i = 0; i < w->n; i++)
        want += w->seqs[i]->gpu && seq_decode_needs_evict(w->seqs[i]);
    if (!want || want > LOOP_LAUNCH_MAX || s->env.job_delay_us || s->env.workers_only)
        return 0;
    w->fl = calloc(w->n, sizeof(*w->fl));
    w->on_loop = calloc(w->n, 1);
    if (!w->fl || !w->on_loop) {
        free(w->fl), free(w->on_loop);
        w->fl = NULL, w->on_loop = NULL;
        return 0;
    }
    for (uint32_t i = 0; i < w->n; i++) {
        if (!w->seqs[i]->gpu || !seq_decode_needs_evict(w->seqs[i]))
            continue;
        int rc = seq_decode_evict_launch(&s->env, w->seqs[i], &w->fl[i]);
        if (!rc)
            n++;
        else if (rc != -ENOTSUP && rc != -EAGAIN)
            w->res[i].rc = rc; /* launched and failed: the step answers it */
        w->on_loop[i] = rc != -ENOTSUP && rc != -EAGAIN;
    }
    return n;
}

/* A GPU sequence's prefill observe the loop runs itself (seq_prefill_launch): its scoring,
 * then its cascading stage, each polled between the loop's other events (work_poll_flights)
 * - no worker woken, none waking the loop: the two hand-offs took 60-310 us a layer on H100
 * hosts (docs/benchmarks.md). Each launch's host work runs on the loop (the scoring's 45-167 us
 * at 32K by H100 host, mostly its CUDA calls; the stage's ~20 us), so at most
 * LOOP_OBSERVES_MAX are the loop's at once and the rest go to the workers, side by side.
 * 1 where w is the loop's now (in flight, or done and answered), 0 where a worker takes it. */
#define LOOP_OBSERVES_MAX 4

static int observe_on_loop(struct server *s, struct work *w)
{
    if (w->n != 1 || w->phase || !w->seqs[0]->gpu || s->env.job_delay_us ||
        s->env.observe_workers || s->observes_on_loop >= LOOP_OBSERVES_MAX ||
        !(w->fl = calloc(1, sizeof(*w->fl))))
        return 0;
    int rc = seq_prefill_launch(&s->env, w->seqs[0], w->layer, &w->fl[0]);
    if (rc == -EAGAIN || rc == -ENOTSUP) {
        free(w->fl);
        w->fl = NULL;
        return 0;
    }
    w->n_fl = 1;
    w->t_launched = clock_now_s();
    if (rc) { /* launched and failed: the observe's answer */
        w->res[0].rc = rc;
        work_done(&w->job);
        return 1;
    }
    w->parts = 1;
    w->next_fl = s->flights, s->flights = w;
    s->observes_on_loop++;
    return 1;
}

/* A prefill observe's flight whose GPU work is done (off the flights): it lands, or its
 * stage goes on (1: w back on the list at *pp), or goes to a worker. */
static int observe_landed(struct server *s, struct work *w, struct work **pp)
{
    struct seq_flight *f = w->fl[0];
    int rc = seq_prefill_advance(&s->env, w->seqs[0], f, &w->res[0]);
    if (rc == 1) { /* its stage in flight */
        w->next_fl = *pp, *pp = w;
        return 1;
    }
    w->fl[0] = NULL;
    s->observes_on_loop--;
    if (rc == -EAGAIN) { /* the stage's buffers to grow: a worker's (its times are the job's) */
        w->phase = 3, w->rest = f;
        workers_submit(s->workers, &w->job);
        return 0;
    }
    /* caked_work_seconds: the launch's host work as the wait, the GPU's and the loop's as
     * the run */
    double now = clock_now_s();
    struct job j = {.t_submit = w->t_start, .t_start = w->t_launched, .t_end = now};
    metrics_observe_work(&s->m, WORK_PREFILL, &j, now);
    work_done(&w->job);
    return 0;
}

int work_poll_flights(struct server *s)
{
    struct work **pp = &s->flights;
    while (*pp) {
        struct work *w = *pp;
        uint32_t i = 0;
        while (i < w->n && (!w->fl[i] || seq_flight_ready(w->fl[i])))
            i++;
        if (i < w->n) { /* one still runs */
            pp = &w->next_fl;
            continue;
        }
        *pp = w->next_fl; /* off the list before its step completes (which may start more) */
        if (w->type != MSG_DECODE_STEP) {
            if (observe_landed(s, w, pp)) /* back on the list, in flight again */
                pp = &w->next_fl;
            continue;
        }
        double now = clock_now_s();
        for (i = 0; i < w->n; i++)
            if (w->fl[i]) {
                seq_flight_land(&w->srv->env, w->seqs[i], w->fl[i], &w->res[i]);
                w->fl[i] = NULL;
                s->m.decode_by_loop++;
            }
        /* caked_work_seconds: the launches' host work as the wait, the GPU's as the run */
        struct job j = {.t_submit = w->t_start, .t_start = w->t_launched, .t_end = now};
        metrics_observe_work(&s->m, WORK_DECODE, &j, now);
        if (--w->parts == 0)
            work_done(&w->job);
    }
    return s->flights != NULL;
}

void work_start(struct server *s, struct client *c, uint16_t type, struct seq **seqs,
                       uint32_t n, uint32_t layer, int observe, double pref)
{
    struct work *w = work_new(s, seqs, n);
    if (!w) { /* what was prepared for the job goes back: a restore's pages, a relocation's */
        struct seq_result undo = {.rc = -ECANCELED};
        for (uint32_t i = 0; i < n; i++) {
            if (seqs[i]->moving)
                seq_move_commit(&s->env, seqs[i], &undo);
            seq_reloc_commit(&s->env, seqs[i]);
        }
        free(seqs);
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    w->job.urgent = type == MSG_DECODE_STEP;
    w->job.owner = c->tenant->id, w->job.weight = c->tenant->weight; /* shared by weight */
    w->client_id = c->id, w->request_id = c->h.request_id, w->type = type;
    w->layer = layer, w->observe = observe, w->pref = pref;
    w->phase = type != MSG_DECODE_STEP && seqs[0]->group ? 1 : 0;
    double now = clock_now_s();
    for (uint32_t i = 0; i < n; i++)
        seqs[i]->busy = 1, seqs[i]->t_used = now;
    c->state = C_BUSY;
    w->t_start = now;
    if (type == MSG_PREFILL_OBSERVE && observe_on_loop(s, w))
        return;
    if (type == MSG_DECODE_STEP && (w->n_fl = launch_on_loop(s, w))) {
        w->t_launched = clock_now_s();
        w->parts = 1; /* the flights */
        w->next_fl = s->flights, s->flights = w;
        int left = 0;
        for (uint32_t i = 0; i < w->n; i++)
            left |= worker_has(w, i);
        if (left && split_decode(s, w, 1) < 0)
            for (uint32_t i = 0; i < w->n; i++) /* no memory for a part: those fail */
                if (worker_has(w, i))
                    w->res[i].rc = -ENOMEM;
        return;
    }
    if (type == MSG_DECODE_STEP && split_decode(s, w, 0))
        return;
    workers_submit(s->workers, &w->job);
}

void work_decode_reply(struct server *s, struct client *c, struct seq **seqs,
                                     uint32_t n, uint32_t evictions)
{
    const char *why = "";
    if (seq_decode_admit(&s->env, c->tenant, seqs, n, &why)) {
        if (pressure_wait_decode(s, c, seqs, n, evictions, why))
            return; /* waits for room (pressure.h) */
        srv_oom(s, c, why);
        srv_reply_error(s, c, CAKE_EOOM, "%s", why);
        return;
    }
    uint32_t resliced = 0;
    for (uint32_t i = 0; i < n; i++) {
        seq_decode_reserve(&s->env, seqs[i]); /* admitted above: cannot run dry */
        resliced += seqs[i]->rs_told != seqs[i]->reslices;
        seqs[i]->rs_told = seqs[i]->reslices;
    }
    Cake__DecodeReply r = CAKE__DECODE_REPLY__INIT;
    r.evictions = evictions, r.resliced = resliced;
    srv_reply(s, c, MSG_DECODE_STEP, &r.base);
}

/* Phase 2 of a shard group's layer: every shard allocates and evicts with pref. */
int work_start_group(struct server *s, struct shard_group *g, struct seq **all, uint16_t type,
                     uint32_t layer, double pref)
{
    struct work *w = work_new(s, all, g->n);
    if (!w)
        return -ENOMEM;
    w->job.owner = g->tenant->id, w->job.weight = g->tenant->weight;
    w->type = type, w->layer = layer, w->pref = pref, w->phase = 2, w->group = g;
    for (uint32_t i = 0; i < g->n; i++)
        all[i]->busy = 1;
    workers_submit(s->workers, &w->job);
    return 0;
}

void work_start_pressure(struct server *s, struct client *c, uint16_t type, struct seq **seqs,
                         uint32_t n)
{
    struct work *w = work_new(s, seqs, n);
    if (!w) {
        free(seqs); /* their next decode steps evict to the lowered budgets instead */
        return;
    }
    w->job.urgent = 1; /* a request waits for it */
    w->job.owner = c->tenant->id, w->job.weight = c->tenant->weight;
    w->client_id = c->id, w->type = type, w->pressure = 1;
    for (uint32_t i = 0; i < n; i++)
        seqs[i]->busy = 1;
    c->rs_jobs++;
    workers_submit(s->workers, &w->job);
}
