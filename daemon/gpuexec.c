/* gpuexec.c - CUDA streams and workspaces for caked's workers (see gpuexec.h; without CUDA,
 * gpuexec_stub.c is built instead). */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime.h>

#include "clock.h"
#include "gpuexec.h"
#include "kern.h"
#include "kern_cuda.h"

#define SUBSTREAMS 8 /* a decode step's layers run side by side on these */

/* The kinds of launch whose kernels a worker has run in this process (gpuexec.ran) */
enum { RAN_EVICT = 1, RAN_SCORE = 2, RAN_SCORE_LSE = 4, RAN_STAGE = 8 };

struct gpuctx {
    cudaStream_t stream;
    cudaStream_t sub[SUBSTREAMS];
    uint8_t *dbuf;   /* device workspace */
    size_t dcap;
    uint8_t *hbuf;   /* pinned staging */
    size_t hcap;
    int taken;
    int timing;      /* gpuexec_set_timing: events around an eviction, a scoring, a stage */
    cudaEvent_t ev0, ev1;
    struct gpu_times times;
    struct gpuexec *g; /* the contexts' owner: its device, whether an eviction has run */
    int no_grow;     /* the loop's launch: -EAGAIN rather than allocate (reserve) */
    /* a launch in flight (gpuctx_decode_evict_launch): its end on the stream, where its
     * removed slots land in hbuf, and when the call began (the timing's total) */
    cudaEvent_t done;
    size_t fl_tabs;
    double fl_t0;
};

struct gpuexec {
    int device, n;
    /* A bit a kind (RAN_*), set (atomically) once a worker has run that launch's kernels:
     * CUDA loads a kernel at its first launch, so from then on a launch from the loop (the
     * one-launch eviction, a prefill's scoring or stage) no longer pays that. */
    int ran;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct gpuctx *ctx;
};

static size_t al(size_t x) { return (x + 255) & ~(size_t)255; }

static void ran_set(struct gpuexec *g, int kind) { __atomic_fetch_or(&g->ran, kind, __ATOMIC_RELEASE); }
static int has_run(struct gpuexec *g, int kind) { return __atomic_load_n(&g->ran, __ATOMIC_ACQUIRE) & kind; }

int gpuexec_create(struct gpuexec **out, int device, int n, const char **why)
{
    struct gpuexec *g = calloc(1, sizeof(*g));
    if (!g || !(g->ctx = calloc((size_t)(n > 0 ? n : 1), sizeof(*g->ctx)))) {
        free(g);
        *why = "out of memory";
        return -ENOMEM;
    }
    g->device = device, g->n = n > 0 ? n : 1;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    if (cudaSetDevice(device) != cudaSuccess) {
        *why = "cudaSetDevice failed";
        gpuexec_destroy(g);
        return -EIO;
    }
    for (int i = 0; i < g->n; i++) {
        g->ctx[i].g = g;
        if (cudaEventCreateWithFlags(&g->ctx[i].done, cudaEventDisableTiming) != cudaSuccess) {
            *why = "cudaEventCreate failed";
            gpuexec_destroy(g);
            return -EIO;
        }
        for (int j = -1; j < SUBSTREAMS; j++)
            if (cudaStreamCreateWithFlags(j < 0 ? &g->ctx[i].stream : &g->ctx[i].sub[j],
                                          cudaStreamNonBlocking) != cudaSuccess) {
                *why = "cudaStreamCreate failed";
                gpuexec_destroy(g);
                return -EIO;
            }
    }
    *out = g;
    return 0;
}

void gpuexec_destroy(struct gpuexec *g)
{
    if (!g)
        return;
    cudaSetDevice(g->device);
    for (int i = 0; i < g->n; i++) {
        if (g->ctx[i].stream)
            cudaStreamDestroy(g->ctx[i].stream);
        for (int j = 0; j < SUBSTREAMS; j++)
            if (g->ctx[i].sub[j])
                cudaStreamDestroy(g->ctx[i].sub[j]);
        cudaFree(g->ctx[i].dbuf);
        cudaFreeHost(g->ctx[i].hbuf);
        if (g->ctx[i].ev0)
            cudaEventDestroy(g->ctx[i].ev0), cudaEventDestroy(g->ctx[i].ev1);
        if (g->ctx[i].done)
            cudaEventDestroy(g->ctx[i].done);
    }
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g->ctx);
    free(g);
}

struct gpuctx *gpuexec_take(struct gpuexec *g)
{
    pthread_mutex_lock(&g->mu);
    struct gpuctx *c = NULL;
    for (;;) {
        for (int i = 0; i < g->n && !c; i++)
            if (!g->ctx[i].taken)
                c = &g->ctx[i];
        if (c)
            break;
        pthread_cond_wait(&g->cv, &g->mu);
    }
    c->taken = 1;
    pthread_mutex_unlock(&g->mu);
    cudaSetDevice(g->device); /* per thread: the worker may be new to CUDA */
    return c;
}

struct gpuctx *gpuexec_try_take(struct gpuexec *g)
{
    struct gpuctx *c = NULL;
    pthread_mutex_lock(&g->mu); /* held only for the scan, never while a worker waits */
    for (int i = 0; i < g->n && !c; i++)
        if (!g->ctx[i].taken)
            c = &g->ctx[i];
    if (c)
        c->taken = 1;
    pthread_mutex_unlock(&g->mu);
    return c;
}

void gpuexec_put(struct gpuexec *g, struct gpuctx *c)
{
    pthread_mutex_lock(&g->mu);
    c->taken = 0;
    pthread_cond_signal(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

int gpuexec_peek(struct gpuexec *g, void *dst, const void *src_dev, size_t bytes)
{
    struct gpuctx *c = gpuexec_try_take(g);
    if (!c)
        return -EAGAIN;
    cudaSetDevice(g->device); /* the loop's thread: any GPU's sequences */
    int rc = gpuctx_copy_d2h(c, dst, src_dev, bytes);
    gpuexec_put(g, c);
    return rc;
}

/* Grows the workspaces (rarely: they keep the largest size seen). */
static int reserve(struct gpuctx *c, size_t dbytes, size_t hbytes)
{
    if (c->no_grow && (dbytes > c->dcap || hbytes > c->hcap))
        return -EAGAIN; /* the loop never allocates: cudaFree waits for the device */
    if (dbytes > c->dcap || hbytes > c->hcap)
        c->times.grew = 1;
    if (dbytes > c->dcap) {
        cudaFree(c->dbuf);
        c->dbuf = NULL, c->dcap = 0;
        size_t want = dbytes + dbytes / 4;
        if (cudaMalloc((void **)&c->dbuf, want) != cudaSuccess) {
            cudaGetLastError(); /* not sticky: the next launch's check must not see it */
            return -ENOMEM;
        }
        c->dcap = want;
    }
    if (hbytes > c->hcap) {
        cudaFreeHost(c->hbuf);
        c->hbuf = NULL, c->hcap = 0;
        size_t want = hbytes + hbytes / 4;
        if (cudaMallocHost((void **)&c->hbuf, want) != cudaSuccess) {
            cudaGetLastError();
            return -ENOMEM;
        }
        c->hcap = want;
    }
    return 0;
}

/* Uploads the page offsets (staged at hb, to db); fills the kernel's view of the layer. */
static void upload_pages_at(const struct gpu_layer *l, uint8_t *hb, uint8_t *db, cudaStream_t st,
                            struct kern_cuda_kv *kv)
{
    uint64_t *off = (uint64_t *)hb;
    for (uint32_t i = 0; i < l->n_pages; i++)
        off[i] = (uint64_t)l->pages[i] * l->page_bytes;
    cudaMemcpyAsync(db, off, sizeof(uint64_t) * l->n_pages, cudaMemcpyHostToDevice, st);
    *kv = (struct kern_cuda_kv){
        .dtype = l->dtype, .kv_heads = l->kv_heads, .head_dim = l->head_dim,
        .tokens_per_page = l->tokens_per_page, .n_tokens = l->n_tokens, .base = l->base,
        .page_off = (const uint64_t *)db, .v_offset_bytes = l->v_offset_bytes,
    };
}

/* The same at the front of the context's buffers, on its main stream. */
static void upload_pages(struct gpuctx *c, const struct gpu_layer *l, struct kern_cuda_kv *kv)
{
    upload_pages_at(l, c->hbuf, c->dbuf, c->stream, kv);
}


static int finish(struct gpuctx *c, int rc)
{
    double t0 = c->timing ? clock_now_s() * 1e6 : 0;
    cudaError_t e = cudaStreamSynchronize(c->stream);
    if (!rc && e != cudaSuccess)
        rc = -EIO;
    cudaGetLastError(); /* clear a sticky launch error for the next job */
    if (c->timing)
        c->times.sync_us = clock_now_s() * 1e6 - t0;
    return rc;
}

/* The context's timing (gpuexec_set_timing), in us: time_start clears it and returns the
 * call's start; time_kernels(c, t0, 0) ends the host's work before the kernels (prep) and
 * marks their start on the stream, time_kernels(c, t0, 1) their end; time_done reads the
 * kernels' time between the marks and the whole call's. Each does nothing with timing off. */
static double time_start(struct gpuctx *c)
{
    c->times = (struct gpu_times){0};
    return c->timing ? clock_now_s() * 1e6 : 0;
}

static void time_kernels(struct gpuctx *c, double t0, int end)
{
    if (!c->timing)
        return;
    double now = clock_now_s() * 1e6 - t0;
    if (!end)
        c->times.prep_us = now;
    else
        c->times.issue_us = now - c->times.prep_us;
    cudaEventRecord(end ? c->ev1 : c->ev0, c->stream);
}

static void time_done(struct gpuctx *c, double t0)
{
    if (!c->timing)
        return;
    float ms = 0;
    cudaEventElapsedTime(&ms, c->ev0, c->ev1);
    c->times.kernel_us = ms * 1e3;
    c->times.total_us = clock_now_s() * 1e6 - t0;
}

/* Uploads the ring's page offsets (staged at hb, to db) and gathers its rows first..
 * first + n_q (mod w), oldest first, into q [q_heads][n_q][d]. */
static int gather_ring(const struct gpu_ring *r, size_t row, uint32_t first, uint32_t n_q,
                       uint8_t *hb, uint8_t *db, void *q, cudaStream_t st)
{
    uint64_t *off = (uint64_t *)hb;
    for (uint32_t i = 0; i < r->n_pages; i++)
        off[i] = (uint64_t)r->pages[i] * r->page_bytes;
    cudaMemcpyAsync(db, off, sizeof(uint64_t) * r->n_pages, cudaMemcpyHostToDevice, st);
    return kern_cuda_ring_gather(q, r->base, (const uint64_t *)db, r->q_heads, r->w, (uint32_t)row,
                                 r->rows_per_page, r->heads_per_page, r->pages_per_head, first,
                                 n_q, st);
}

/* The indicator of the layer in kv by rk, from the gathered window rows q ([q_heads][n_q],
 * the newest last); the statistics too where stats_dev (device, [2]: the entropy, the
 * variance) is given (the full window's, as CAKE's preference takes them, whatever rk ranks
 * by). Nothing waited for. lse (NULL: none): the rows' log-sum-exps [q_heads][n_q] on the
 * device, lse_last the newest row's of each head ([q_heads]). */
static int rank_layer(const struct kern_cuda_kv *kv, const uint8_t *q, const float *lse,
                      const float *lse_last, uint32_t q_heads, uint32_t n_q, uint32_t S,
                      const struct gpu_rank *rk, float *ind, double *stats_dev, void *ws,
                      size_t wsb, cudaStream_t st)
{
    int rc = 0;
    if ((rk->last || rk->position) && stats_dev) /* the statistics alone */
        rc = kern_cuda_score_layer_pool_dev(kv, q, lse, q_heads, n_q, S, rk->gamma, 0,
                                            KERN_POOL_AVG, 2, ind, stats_dev, 0, ws, wsb, st);
    if (!rc && rk->position)
        return kern_cuda_position_indicator(ind, kv->kv_heads, S, rk->sinks, st);
    size_t row = (size_t)kv->head_dim * 2;
    uint8_t *one = (uint8_t *)ws + al(kern_cuda_score_pool_workspace(kv->kv_heads, q_heads, n_q,
                                                                     kv->n_tokens, S, rk->pool));
    if (!rc && rk->last) { /* the newest query of every head alone: row n_q - 1 */
        for (uint32_t h = 0; h < q_heads && !rc; h++)
            rc = cudaMemcpyAsync(one + h * row, q + ((size_t)h * n_q + n_q - 1) * row, row,
                                 cudaMemcpyDeviceToDevice, st) == cudaSuccess ? 0 : -EIO;
        q = one, n_q = 1;
    }
    if (!rc && rk->last) {
        rc = kern_cuda_score_layer_pool_dev(kv, q, lse_last, q_heads, 1, S, 0.0f, 0, rk->pool,
                                            rk->radius, ind, NULL, 0, ws, wsb, st);
    } else if (!rc && !rk->position) {
        rc = kern_cuda_score_layer_pool_dev(kv, q, lse, q_heads, n_q, S, rk->gamma, rk->var_only,
                                            rk->pool, rk->radius, ind, stats_dev, 0, ws, wsb, st);
    }
    if (!rc && rk->shared)
        rc = kern_cuda_rows_mean(ind, kv->kv_heads, S, st);
    return rc;
}

/* Workspace for rank_layer: the scoring's (its pooling's), then one row per head (TOVA's
 * newest query). */
static size_t rank_ws(const struct gpu_layer *l, uint32_t q_heads, uint32_t n_q, uint32_t S,
                      int pool)
{
    return al(kern_cuda_score_pool_workspace(l->kv_heads, q_heads, n_q, l->n_tokens, S, pool)) +
           (size_t)q_heads * l->head_dim * 2;
}

/* gpuctx_score up to its wait: tables and ring up, the kernels, the statistics (stats) back
 * to the staging at c->fl_tabs, c->done recorded after them. -ENOMEM / -EAGAIN (reserve)
 * with nothing issued; another error after issuing (the caller waits before the context
 * goes back). */
static int score_issue(struct gpuctx *c, const struct gpu_layer *l, const struct gpu_ring *r,
                       const float *lse, uint32_t S, const struct gpu_rank *rk, float *ind_dev,
                       int stats)
{
    size_t row = (size_t)l->head_dim * 2;
    size_t pg = al(sizeof(uint64_t) * l->n_pages), rg = al(sizeof(uint64_t) * r->n_pages);
    size_t qb = al(row * r->q_heads * r->w);
    size_t ws = al(rank_ws(l, r->q_heads, r->w, S, rk->pool));
    size_t lb = lse ? al(sizeof(float) * r->q_heads * (r->w + 1)) : 0; /* the rows', the newest's */
    size_t sb = stats ? al(2 * sizeof(double)) : 0;
    c->fl_t0 = time_start(c);
    int rc = reserve(c, pg + rg + qb + ws + lb + sb, pg + rg + lb + sb);
    if (rc)
        return rc;
    struct kern_cuda_kv kv;
    upload_pages(c, l, &kv);
    if (c->timing)
        c->times.tables_us = clock_now_s() * 1e6 - c->fl_t0;
    uint8_t *q = c->dbuf + pg + rg;
    rc = gather_ring(r, row, 0, r->w, c->hbuf + pg, c->dbuf + pg, q, c->stream);
    float *dl = NULL;
    if (!rc && lse) { /* staged beside the ring's offsets, uploaded after the workspace */
        float *hl = (float *)(c->hbuf + pg + rg);
        memcpy(hl, lse, sizeof(float) * r->q_heads * r->w);
        for (uint32_t h = 0; h < r->q_heads; h++)
            hl[r->q_heads * r->w + h] = lse[(size_t)h * r->w + r->w - 1];
        dl = (float *)(q + qb + ws);
        if (cudaMemcpyAsync(dl, hl, sizeof(float) * r->q_heads * (r->w + 1), cudaMemcpyHostToDevice,
                            c->stream) != cudaSuccess)
            rc = -EIO;
    }
    double *sd = stats ? (double *)(q + qb + ws + lb) : NULL;
    c->fl_tabs = pg + rg + lb; /* the statistics' staging */
    time_kernels(c, c->fl_t0, 0);
    if (!rc)
        rc = rank_layer(&kv, q, dl, dl ? dl + r->q_heads * r->w : NULL, r->q_heads, r->w, S, rk,
                        ind_dev, sd, q + qb, ws, c->stream);
    time_kernels(c, c->fl_t0, 1);
    if (!rc && sd && cudaMemcpyAsync(c->hbuf + c->fl_tabs, sd, 2 * sizeof(double),
                                     cudaMemcpyDeviceToHost, c->stream) != cudaSuccess)
        rc = -EIO;
    if (!rc && cudaEventRecord(c->done, c->stream) != cudaSuccess)
        rc = -EIO;
    return rc ? (rc == -ENOMEM || rc == -EAGAIN ? -EIO : rc) : 0;
}

/* After score_issue's work is done: the statistics, the timing. */
static void score_land(struct gpuctx *c, double *entropy, double *variance)
{
    const double *st = (const double *)(c->hbuf + c->fl_tabs);
    if (entropy)
        *entropy = st[0];
    if (variance)
        *variance = st[1];
    time_done(c, c->fl_t0);
}

int gpuctx_score(struct gpuctx *c, const struct gpu_layer *l, const struct gpu_ring *r,
                 const float *lse, uint32_t S, const struct gpu_rank *rk, float *ind_dev,
                 double *entropy, double *variance)
{
    int rc = score_issue(c, l, r, lse, S, rk, ind_dev, entropy || variance);
    if (rc == -ENOMEM || rc == -EAGAIN)
        return -ENOMEM;
    if ((rc = finish(c, rc)))
        return rc;
    score_land(c, entropy, variance);
    ran_set(c->g, lse ? RAN_SCORE_LSE : RAN_SCORE);
    return 0;
}

int gpuctx_score_launch(struct gpuctx *c, const struct gpu_layer *l, const struct gpu_ring *r,
                        const float *lse, uint32_t S, const struct gpu_rank *rk, float *ind_dev,
                        int stats)
{
    if (!has_run(c->g, lse ? RAN_SCORE_LSE : RAN_SCORE))
        return -EAGAIN; /* the first of its kind (the kernels' loading) on a worker */
    cudaSetDevice(c->g->device); /* the loop's thread: any GPU's sequences */
    c->no_grow = 1;
    int rc = score_issue(c, l, r, lse, S, rk, ind_dev, stats);
    c->no_grow = 0;
    if (rc && rc != -ENOMEM && rc != -EAGAIN)
        return finish(c, rc); /* what was issued is done before the context goes back */
    return rc;
}

int gpuctx_score_land(struct gpuctx *c, double *entropy, double *variance)
{
    int rc = finish(c, 0); /* done already (gpuctx_ready): returns at once, or the error */
    if (!rc)
        score_land(c, entropy, variance);
    return rc;
}

int gpuctx_copy_h2d(struct gpuctx *c, void *dst_dev, const void *src, size_t bytes,
                    const void *base, size_t seg_bytes)
{
    cudaError_t e = cudaSuccess;
    const uint8_t *p = src;
    uint8_t *d = dst_dev;
    while (bytes && e == cudaSuccess) {
        size_t into = (size_t)(p - (const uint8_t *)base) % seg_bytes, k = seg_bytes - into;
        k = k < bytes ? k : bytes;
        e = cudaMemcpyAsync(d, p, k, cudaMemcpyHostToDevice, c->stream);
        p += k, d += k, bytes -= k;
    }
    return finish(c, e == cudaSuccess ? 0 : -EIO);
}

int gpuctx_copy_d2h(struct gpuctx *c, void *dst, const void *src_dev, size_t bytes)
{
    cudaError_t e = cudaMemcpyAsync(dst, src_dev, bytes, cudaMemcpyDeviceToHost, c->stream);
    return finish(c, e == cudaSuccess ? 0 : -EIO);
}

int gpuctx_fetch_rows(struct gpuctx *c, const struct gpu_rows *r, uint32_t n)
{
    size_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += al(sizeof(uint32_t) * r[i].width * r[i].rows);
    if (!total)
        return 0;
    if (reserve(c, 0, total))
        return -ENOMEM;
    cudaError_t e = cudaSuccess;
    for (size_t i = 0, at = 0; i < n && e == cudaSuccess; i++) {
        size_t wb = sizeof(uint32_t) * r[i].width;
        if (wb && r[i].rows)
            e = cudaMemcpy2DAsync(c->hbuf + at, wb, r[i].src, sizeof(uint32_t) * r[i].src_pitch, wb,
                                  r[i].rows, cudaMemcpyDeviceToHost, c->stream);
        at += al(wb * r[i].rows);
    }
    int rc = finish(c, e == cudaSuccess ? 0 : -EIO);
    for (size_t i = 0, at = 0; i < n && !rc; i++) {
        size_t wb = sizeof(uint32_t) * r[i].width;
        for (uint32_t y = 0; y < r[i].rows; y++)
            memcpy(r[i].dst + y * r[i].dst_pitch, c->hbuf + at + y * wb, wb);
        at += al(wb * r[i].rows);
    }
    return rc;
}

int gpuctx_copy_pages(struct gpuctx *c, uint8_t *dev_base, const uint32_t *dev, uint8_t *host_base,
                      const uint32_t *host, uint32_t n, uint64_t page_bytes, int to_host)
{
    cudaError_t e = cudaSuccess;
    for (uint32_t i = 0; i < n && e == cudaSuccess; i++) { /* a page never crosses a segment */
        uint8_t *d = dev_base + (uint64_t)dev[i] * page_bytes, *h = host_base + (uint64_t)host[i] * page_bytes;
        e = to_host ? cudaMemcpyAsync(h, d, page_bytes, cudaMemcpyDeviceToHost, c->stream)
                    : cudaMemcpyAsync(d, h, page_bytes, cudaMemcpyHostToDevice, c->stream);
    }
    return finish(c, e == cudaSuccess ? 0 : -EIO);
}

int gpuctx_copy_pages_d2d(struct gpuctx *c, uint8_t *base, const uint32_t *src, const uint32_t *dst,
                          uint32_t n, uint64_t page_bytes)
{
    cudaError_t e = cudaSuccess;
    for (uint32_t i = 0; i < n && e == cudaSuccess; i++)
        if (src[i] != dst[i])
            e = cudaMemcpyAsync(base + (uint64_t)dst[i] * page_bytes, base + (uint64_t)src[i] * page_bytes,
                                page_bytes, cudaMemcpyDeviceToDevice, c->stream);
    return finish(c, e == cudaSuccess ? 0 : -EIO);
}

int gpuctx_dev_alloc(struct gpuctx *c, void **p, size_t bytes)
{
    /* stream-ordered: freeing it later (gpuexec_dev_free, from any thread) never waits for
     * the device; the context's device, whatever the thread's (the loop serves every GPU) */
    cudaSetDevice(c->g->device);
    if (cudaMallocAsync(p, bytes, c->stream) != cudaSuccess) {
        cudaGetLastError();
        *p = NULL;
        return -ENOMEM;
    }
    return 0;
}

int gpuctx_dev_fill(struct gpuctx *c, void *p, int byte, size_t bytes)
{
    cudaSetDevice(c->g->device);
    if (cudaMemsetAsync(p, byte, bytes, c->stream) != cudaSuccess) {
        cudaGetLastError();
        return -EIO;
    }
    return 0;
}

void gpuexec_dev_free(struct gpuexec *g, void *p)
{
    if (!p)
        return;
    cudaSetDevice(g->device);
    cudaFreeAsync(p, 0); /* the legacy stream: ours are non-blocking, so nothing waits */
}

/* Every layer of a cascading stage in one pass (kern_cuda_compact_many: three launches, one
 * wait; a long row's top-k a launch before them, kern_cuda_compact_split). Staged and
 * uploaded at once: the jobs, each one's page offsets and host-chosen slots; on the device
 * behind them what comes back in one copy (an order job's counts, the positions where the
 * caller asked for them), then the kept slots, then each job's scratch. */
static int compact_issue(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n)
{
    double t0 = c->fl_t0 = time_start(c);
    const struct gpu_layer *l0 = &jobs[0].l;
    size_t staged = al(sizeof(struct kern_cuda_compact_job) * n), rets = 0, keeps = 0, tmps = 0;
    uint32_t max_rows = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct gpu_select *j = &jobs[i];
        const struct gpu_layer *l = &j->l;
        if (j->k > j->old || j->win_start != j->old || (!j->slots && !j->ind_dev && !j->order) ||
            (j->pos_dev && j->old > j->pos_stride) ||
            (j->order && (j->k != j->old || !j->pos_dev || j->slots || j->fill || !j->pos_span ||
                          !j->n_sorted)) ||
            l->dtype != l0->dtype || l->kv_heads != l0->kv_heads || l->head_dim != l0->head_dim ||
            l->tokens_per_page != l0->tokens_per_page || l->base != l0->base ||
            l->v_offset_bytes != l0->v_offset_bytes)
            return -EINVAL;
        size_t kb = sizeof(uint32_t) * l->kv_heads * j->k;
        for (size_t x = 0; j->slots && x < (size_t)l->kv_heads * j->k; x++)
            if (j->slots[x] >= j->old)
                return -EINVAL;
        staged += al(sizeof(uint64_t) * l->n_pages) + (j->slots ? al(kb) : 0);
        keeps += al(kb);
        if (j->order)
            rets += al(sizeof(uint32_t) * l->kv_heads);
        if (j->pos_back)
            rets += al(kb);
        tmps += al(kern_cuda_compact_many_tmp(l->kv_heads, l->head_dim, j->k, j->win_len,
                                              j->order ? j->pos_span : 0));
        max_rows = j->k + j->win_len > max_rows ? j->k + j->win_len : max_rows;
    }
    int rc = reserve(c, staged + rets + keeps + tmps, staged + rets);
    if (rc)
        return rc;
    struct kern_cuda_compact_job *kj = (struct kern_cuda_compact_job *)c->hbuf;
    size_t at = al(sizeof(*kj) * n), rat = staged, kat = staged + rets, tat = staged + rets + keeps;
    for (uint32_t i = 0; i < n; i++) {
        const struct gpu_select *j = &jobs[i];
        const struct gpu_layer *l = &j->l;
        size_t kb = sizeof(uint32_t) * l->kv_heads * j->k;
        uint64_t *po = (uint64_t *)(c->hbuf + at);
        for (uint32_t p = 0; p < l->n_pages; p++)
            po[p] = (uint64_t)l->pages[p] * l->page_bytes;
        kj[i] = (struct kern_cuda_compact_job){
            .page_off = (const uint64_t *)(c->dbuf + at), .ind = j->ind_dev, .tmp = c->dbuf + tat,
            .old = j->old, .k = j->k, .win = j->win_len, .fill = j->fill && !j->slots,
            .pos = j->pos_dev, .pos_stride = j->pos_stride, .pos_init = j->pos_init,
            .order = j->order, .pos_span = j->pos_span,
        };
        at += al(sizeof(uint64_t) * l->n_pages);
        if (j->slots) { /* the host's choice */
            memcpy(c->hbuf + at, j->slots, kb);
            kj[i].slots = (const uint32_t *)(c->dbuf + at);
            at += al(kb);
        }
        kj[i].keep = (uint32_t *)(c->dbuf + kat);
        kat += al(kb);
        if (j->order) {
            kj[i].n_sorted = (uint32_t *)(c->dbuf + rat);
            rat += al(sizeof(uint32_t) * l->kv_heads);
        }
        if (j->pos_back) {
            kj[i].pos_out = (uint32_t *)(c->dbuf + rat);
            rat += al(kb);
        }
        tat += al(kern_cuda_compact_many_tmp(l->kv_heads, l->head_dim, j->k, j->win_len,
                                              j->order ? j->pos_span : 0));
    }
    struct kern_cuda_layout lay = {
        .dtype = l0->dtype, .kv_heads = l0->kv_heads, .head_dim = l0->head_dim,
        .tokens_per_page = l0->tokens_per_page, .base = l0->base,
        .v_offset_bytes = l0->v_offset_bytes,
    };
    /* (the kernels' time from here: the long rows' top-k come before the jobs' upload, which
     * carries the marks they leave) */
    time_kernels(c, t0, 0);
    c->fl_tabs = staged; /* what comes back, at the same offset in both buffers */
    rc = kern_cuda_compact_split(kj, n, l0->kv_heads, c->stream);
    if (rc >= 0)
        rc = cudaMemcpyAsync(c->dbuf, c->hbuf, staged, cudaMemcpyHostToDevice, c->stream) == cudaSuccess
                 ? 0 : -EIO;
    if (!rc)
        rc = kern_cuda_compact_many(&lay, (const struct kern_cuda_compact_job *)c->dbuf, n, max_rows,
                                    c->stream);
    time_kernels(c, t0, 1);
    if (!rc && rets && /* the order jobs' counts, the positions asked for */
        cudaMemcpyAsync(c->hbuf + staged, c->dbuf + staged, rets, cudaMemcpyDeviceToHost,
                        c->stream) != cudaSuccess)
        rc = -EIO;
    if (!rc && cudaEventRecord(c->done, c->stream) != cudaSuccess)
        rc = -EIO;
    return rc ? (rc == -ENOMEM || rc == -EAGAIN ? -EIO : rc) : 0;
}

/* After compact_issue's work is done: the order jobs' counts and the positions asked for,
 * the timing. */
static void compact_land(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n)
{
    size_t rat = c->fl_tabs;
    for (uint32_t i = 0; i < n; i++) {
        const struct gpu_select *j = &jobs[i];
        uint32_t hkv = j->l.kv_heads;
        if (j->order) {
            memcpy(j->n_sorted, c->hbuf + rat, sizeof(uint32_t) * hkv);
            rat += al(sizeof(uint32_t) * hkv);
        }
        if (j->pos_back) {
            for (uint32_t g = 0; g < hkv; g++)
                memcpy(j->pos_back + g * j->pos_back_pitch,
                       c->hbuf + rat + sizeof(uint32_t) * g * j->k, sizeof(uint32_t) * j->k);
            rat += al(sizeof(uint32_t) * hkv * j->k);
        }
    }
    time_done(c, c->fl_t0);
}

int gpuctx_select_compact_many(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n)
{
    if (!n)
        return 0;
    int rc = compact_issue(c, jobs, n);
    if (rc == -EAGAIN || rc == -ENOMEM)
        return -ENOMEM;
    if ((rc = finish(c, rc)))
        return rc;
    compact_land(c, jobs, n);
    ran_set(c->g, RAN_STAGE);
    return 0;
}

int gpuctx_select_compact_many_launch(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n)
{
    if (!n)
        return -EINVAL;
    if (!has_run(c->g, RAN_STAGE))
        return -EAGAIN; /* the first (the kernels' loading) on a worker */
    cudaSetDevice(c->g->device); /* the loop's thread: any GPU's sequences */
    c->no_grow = 1;
    int rc = compact_issue(c, jobs, n);
    c->no_grow = 0;
    if (rc && rc != -ENOMEM && rc != -EAGAIN && rc != -EINVAL)
        return finish(c, rc); /* what was issued is done before the context goes back */
    return rc;
}

int gpuctx_select_compact_many_land(struct gpuctx *c, const struct gpu_select *jobs, uint32_t n)
{
    int rc = finish(c, 0); /* done already (gpuctx_ready): returns at once, or the error */
    if (!rc)
        compact_land(c, jobs, n);
    return rc;
}

/* Device and staging bytes one eviction needs, and where its pieces go. */
struct evict_plan {
    size_t pg, rg, ws, ib, qb, kb, tb, xb, dev, host;
};

static struct evict_plan plan_evict(const struct gpu_evict *e)
{
    const struct gpu_layer *l = &e->l;
    const struct gpu_ring *r = &e->ring;
    uint32_t S = l->n_tokens - r->w;
    size_t row = (size_t)l->head_dim * 2;
    struct evict_plan p = {
        .pg = al(sizeof(uint64_t) * l->n_pages), .rg = al(sizeof(uint64_t) * r->n_pages),
        .ws = al(rank_ws(l, r->q_heads, e->n_q, S, e->rk.pool)),
        .ib = al(sizeof(float) * l->kv_heads * S), .qb = al(row * r->q_heads * e->n_q),
        .kb = al(sizeof(uint32_t) * l->kv_heads * (e->order_n ? S : e->k)), /* S: the order's */
        .tb = al(2 * (size_t)l->kv_heads * ((e->order_n ? S : e->k) + r->w) * row),
        .xb = al(kern_cuda_topk_workspace(l->kv_heads, S)),
    };
    p.dev = p.pg + p.rg + p.ws + p.ib + p.qb + p.kb + p.tb + p.xb, p.host = p.pg + p.rg + p.kb;
    return p;
}

static int evict_one(const struct gpu_evict *e, const struct evict_plan *p, uint8_t *db,
                     uint8_t *hb, cudaStream_t st)
{
    const struct gpu_layer *l = &e->l;
    uint32_t w = e->ring.w, S = l->n_tokens - w;
    size_t row = (size_t)l->head_dim * 2;
    struct kern_cuda_kv kv;
    upload_pages_at(l, hb, db, st, &kv);
    uint8_t *ws = db + p->pg + p->rg;
    float *ind = (float *)(ws + p->ws);
    uint8_t *q = (uint8_t *)ind + p->ib;
    uint32_t *keep = (uint32_t *)(q + p->qb);
    uint8_t *tmp = (uint8_t *)keep + p->kb;
    int rc = 0;
    if (e->order_n) /* a prefix the one launch filled: back in position order first */
        if (!(rc = kern_cuda_order_expand(keep, e->order, e->order_n, e->order_cap, l->kv_heads, S, st)))
            rc = kern_cuda_compact(&kv, keep, S, S, w, tmp, st);
    /* the ring's rows, oldest first, as [q_heads][n_q][d] */
    if (!rc)
        rc = gather_ring(&e->ring, row, e->first, e->n_q, hb + p->pg, db + p->pg, q, st);
    if (!rc)
        rc = rank_layer(&kv, q, NULL, NULL, e->ring.q_heads, e->n_q, S, &e->rk, ind, NULL, ws, p->ws,
                        st);
    if (!rc)
        rc = kern_cuda_topk_ws(ind, l->kv_heads, S, e->k, keep, tmp + p->tb, p->xb, st);
    if (!rc)
        rc = kern_cuda_compact(&kv, keep, e->k, S, w, tmp, st);
    if (!rc && e->lse && /* this way keeps no log-sum-exps: the next step computes them */
        cudaMemsetAsync(e->lse, 0xff, sizeof(float) * e->ring.q_heads * w, st) != cudaSuccess)
        rc = -EIO;
    if (!rc && e->k && /* the kept slots, for the sequence's positions: after p->pg + p->rg */
        cudaMemcpyAsync(hb + p->pg + p->rg, keep, sizeof(uint32_t) * l->kv_heads * e->k,
                        cudaMemcpyDeviceToHost, st) != cudaSuccess)
        rc = -EIO;
    return rc;
}

void gpuexec_set_timing(struct gpuexec *g, int on)
{
    cudaSetDevice(g->device);
    for (int i = 0; i < g->n; i++) {
        struct gpuctx *c = &g->ctx[i];
        if (on && !c->ev0) {
            cudaEvent_t a = NULL, b = NULL;
            if (cudaEventCreate(&a) != cudaSuccess || cudaEventCreate(&b) != cudaSuccess) {
                if (a)
                    cudaEventDestroy(a);
                cudaGetLastError();
                continue; /* no timing for this context */
            }
            c->ev0 = a, c->ev1 = b;
        }
        c->timing = on;
    }
}

void gpuctx_times(const struct gpuctx *c, struct gpu_times *t)
{
    *t = c->times;
}

/* A decode step's layers in one launch (kern_cuda_decode_evict), not waited for: -ENOTSUP
 * where they differ in shapes or ranking or the kernel does not take them (the caller runs
 * them layer by layer), or -ENOMEM, with nothing launched (*issued 0); else the launch's
 * result with work on the stream (*issued 1), c->done recorded after it. The job table and
 * every page table go up in one copy, the removed slots come back to hbuf + c->fl_tabs in
 * one (fused_land takes them out). */
static int fused_launch(struct gpuctx *c, const struct gpu_evict *ev, uint32_t n, int *issued)
{
    const struct gpu_evict *a = &ev[0];
    *issued = 0;
    c->fl_t0 = c->timing ? clock_now_s() * 1e6 : 0;
    const struct gpu_rank *rk = &a->rk;
    if (rk->last || rk->position || rk->shared || a->layerwise)
        return -ENOTSUP;
    struct kern_cuda_evict ke = {
        .dtype = a->l.dtype, .q_heads = a->ring.q_heads, .kv_heads = a->l.kv_heads,
        .head_dim = a->l.head_dim, .tokens_per_page = a->l.tokens_per_page, .w = a->ring.w,
        .base = a->l.base, .v_offset_bytes = a->l.v_offset_bytes,
        .ring_rows_per_page = a->ring.rows_per_page, .ring_heads_per_page = a->ring.heads_per_page,
        .ring_pages_per_head = a->ring.pages_per_head, .first = a->first, .n_q = a->n_q,
        .gamma = rk->gamma, .var_only = rk->var_only, .pool = rk->pool, .radius = rk->radius,
    };
    uint32_t max_S = 0;
    size_t tabs = al(sizeof(struct kern_cuda_evict_job) * n), evb = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct gpu_evict *e = &ev[i];
        if (e->l.dtype != ke.dtype || e->l.kv_heads != ke.kv_heads || e->l.head_dim != ke.head_dim ||
            e->l.tokens_per_page != ke.tokens_per_page || e->l.base != ke.base ||
            e->l.v_offset_bytes != ke.v_offset_bytes || e->ring.base != ke.base ||
            e->ring.q_heads != ke.q_heads || e->ring.w != ke.w ||
            e->ring.rows_per_page != ke.ring_rows_per_page ||
            e->ring.heads_per_page != ke.ring_heads_per_page ||
            e->ring.pages_per_head != ke.ring_pages_per_head || e->first != ke.first ||
            e->n_q != ke.n_q || memcmp(&e->rk, rk, sizeof(*rk)))
            return -ENOTSUP;
        uint32_t S = e->l.n_tokens - ke.w;
        max_S = S > max_S ? S : max_S;
        tabs += al(sizeof(uint64_t) * e->l.n_pages) + al(sizeof(uint64_t) * e->ring.n_pages) +
                (e->lse_new ? al(sizeof(float) * ke.q_heads) : 0);
        evb += sizeof(uint32_t) * ke.kv_heads * (S - e->k);
    }
    if (kern_cuda_decode_evict_check(&ke, max_S))
        return -ENOTSUP;
    int rc = reserve(c, tabs + evb, tabs + evb);
    if (rc)
        return rc;
    /* staging and device alike: the jobs, longest prefix first (the blocks of a long layer
     * set the step's time: they start in the first wave), each job's page offsets and ring
     * offsets; then the removed slots (device, then back) in the caller's order */
    struct kern_cuda_evict_job *jobs = (struct kern_cuda_evict_job *)c->hbuf;
    size_t at = al(sizeof(*jobs) * n), out = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct gpu_evict *e = &ev[i];
        uint32_t j = i; /* insertion by n_tokens, descending (the window is the same) */
        while (j > 0 && jobs[j - 1].n_tokens < e->l.n_tokens) {
            jobs[j] = jobs[j - 1];
            j--;
        }
        uint64_t *po = (uint64_t *)(c->hbuf + at), *ro;
        for (uint32_t p = 0; p < e->l.n_pages; p++)
            po[p] = (uint64_t)e->l.pages[p] * e->l.page_bytes;
        jobs[j].page_off = (const uint64_t *)(c->dbuf + at);
        at += al(sizeof(uint64_t) * e->l.n_pages);
        ro = (uint64_t *)(c->hbuf + at);
        for (uint32_t p = 0; p < e->ring.n_pages; p++)
            ro[p] = (uint64_t)e->ring.pages[p] * e->ring.page_bytes;
        jobs[j].ring_off = (const uint64_t *)(c->dbuf + at);
        at += al(sizeof(uint64_t) * e->ring.n_pages);
        jobs[j].lse_new = NULL;
        if (e->lse_new && e->carry) { /* the engine's newest row, beside the tables */
            memcpy(c->hbuf + at, e->lse_new, sizeof(float) * ke.q_heads);
            jobs[j].lse_new = (const float *)(c->dbuf + at);
        }
        at += e->lse_new ? al(sizeof(float) * ke.q_heads) : 0;
        jobs[j].n_tokens = e->l.n_tokens, jobs[j].k = e->k, jobs[j].ind = NULL;
        jobs[j].lse = e->lse, jobs[j].carry = e->carry;
        jobs[j].order = e->order, jobs[j].order_n = e->order_n, jobs[j].order_cap = e->order_cap;
        jobs[j].evicted = (uint32_t *)(c->dbuf + tabs + out);
        out += sizeof(uint32_t) * ke.kv_heads * (e->l.n_tokens - ke.w - e->k);
    }
    c->fl_tabs = tabs;
    *issued = 1;
    rc = cudaMemcpyAsync(c->dbuf, c->hbuf, tabs, cudaMemcpyHostToDevice, c->stream) == cudaSuccess
             ? 0 : -EIO;
    time_kernels(c, c->fl_t0, 0);
    if (!rc)
        rc = kern_cuda_decode_evict(&ke, (const struct kern_cuda_evict_job *)c->dbuf, n, max_S,
                                    c->stream);
    time_kernels(c, c->fl_t0, 1);
    if (!rc && evb &&
        cudaMemcpyAsync(c->hbuf + tabs, c->dbuf + tabs, evb, cudaMemcpyDeviceToHost, c->stream) != cudaSuccess)
        rc = -EIO;
    if (!rc && cudaEventRecord(c->done, c->stream) != cudaSuccess)
        rc = -EIO;
    return rc == -ENOTSUP ? -EIO : rc; /* launched: no second try layer by layer */
}

/* After fused_launch's work is done: the removed slots to each ev[i].evicted, the timing. */
static void fused_land(struct gpuctx *c, struct gpu_evict *ev, uint32_t n)
{
    size_t out = 0;
    for (uint32_t i = 0; i < n; i++) {
        ev[i].fused = 1;
        size_t b = sizeof(uint32_t) * ev[i].l.kv_heads * (ev[i].l.n_tokens - ev[i].ring.w - ev[i].k);
        memcpy(ev[i].evicted, c->hbuf + c->fl_tabs + out, b);
        out += b;
    }
    time_done(c, c->fl_t0);
}

/* The removed slots of each head's first S from its kept ones keep [hkv][k] (ascending). */
static void kept_to_evicted(const uint32_t *keep, uint32_t hkv, uint32_t k, uint32_t S, uint32_t *ev)
{
    for (uint32_t g = 0; g < hkv; g++) {
        const uint32_t *kp = keep + (size_t)g * k;
        uint32_t *o = ev + (size_t)g * (S - k), i = 0;
        for (uint32_t j = 0; j < S; j++) {
            if (i < k && kp[i] == j)
                i++;
            else
                *o++ = j;
        }
    }
}

/* Both entries' start: the context's timing cleared; -EINVAL where an eviction is out of
 * range, else 0 with what the layer-by-layer way needs (device and staging bytes) in *dev
 * and *host. */
static int evict_check(struct gpuctx *c, const struct gpu_evict *ev, uint32_t n, size_t *dev,
                       size_t *host)
{
    c->times = (struct gpu_times){0};
    *dev = *host = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct gpu_evict *e = &ev[i];
        uint32_t w = e->ring.w;
        if (e->l.n_tokens <= w || e->first >= w || !e->n_q || e->n_q > w ||
            e->k > e->l.n_tokens - w || e->order_n > e->l.n_tokens - w ||
            (e->order && (e->k > e->order_cap || e->order_n > e->order_cap)) || (!e->order && e->order_n))
            return -EINVAL;
        struct evict_plan p = plan_evict(e);
        *dev += p.dev, *host += p.host;
    }
    return 0;
}

int gpuctx_decode_evict(struct gpuctx *c, struct gpu_evict *ev, uint32_t n)
{
    size_t dev, host;
    if (evict_check(c, ev, n, &dev, &host))
        return -EINVAL;
    if (!n)
        return 0;
    int issued, rc = fused_launch(c, ev, n, &issued);
    if (issued) {
        if ((rc = finish(c, rc)))
            return rc;
        fused_land(c, ev, n);
        ran_set(c->g, RAN_EVICT);
        return 0;
    }
    if (rc != -ENOTSUP)
        return rc;
    if (reserve(c, dev, host))
        return -ENOMEM;
    rc = 0;
    size_t d = 0, h = 0;
    for (uint32_t i = 0; i < n && !rc; i++) {
        struct evict_plan p = plan_evict(&ev[i]);
        ev[i].fused = 0;
        rc = evict_one(&ev[i], &p, c->dbuf + d, c->hbuf + h, c->sub[i % SUBSTREAMS]);
        d += p.dev, h += p.host;
    }
    for (int j = 0; j < SUBSTREAMS; j++)
        if (cudaStreamSynchronize(c->sub[j]) != cudaSuccess && !rc)
            rc = -EIO;
    cudaGetLastError();
    h = 0;
    for (uint32_t i = 0; i < n && !rc; i++) {
        struct evict_plan p = plan_evict(&ev[i]);
        kept_to_evicted((const uint32_t *)(c->hbuf + h + p.pg + p.rg), ev[i].l.kv_heads, ev[i].k,
                        ev[i].l.n_tokens - ev[i].ring.w, ev[i].evicted);
        h += p.host;
    }
    return rc;
}

int gpuctx_decode_evict_launch(struct gpuctx *c, const struct gpu_evict *ev, uint32_t n)
{
    size_t dev, host;
    if (evict_check(c, ev, n, &dev, &host))
        return -EINVAL;
    if (!n)
        return -ENOTSUP;
    if (!has_run(c->g, RAN_EVICT))
        return -EAGAIN; /* the first one (the kernel's loading) on a worker */
    cudaSetDevice(c->g->device); /* the loop's thread: any GPU's sequences */
    c->no_grow = 1;
    int issued, rc = fused_launch(c, ev, n, &issued);
    c->no_grow = 0;
    if (issued && rc)
        return finish(c, rc); /* what was issued is done before the context goes back */
    return rc;
}

int gpuctx_ready(struct gpuctx *c)
{
    cudaError_t e = cudaEventQuery(c->done);
    if (e == cudaErrorNotReady)
        return 0;
    if (e == cudaSuccess)
        return 1;
    cudaGetLastError(); /* not left sticky for the next job */
    return -EIO;
}

int gpuctx_decode_evict_land(struct gpuctx *c, struct gpu_evict *ev, uint32_t n)
{
    int rc = finish(c, 0); /* done already (gpuctx_ready): returns at once, or the error */
    if (!rc)
        fused_land(c, ev, n);
    return rc;
}

/* ---- H2O ---------------------------------------------------------------------------- */

int gpuctx_h2o_init(struct gpuctx *c, float *acc, uint32_t cap, const float *src, uint32_t rows,
                    uint32_t n, float scale)
{
    int rc = cudaMemsetAsync(acc, 0, sizeof(float) * rows * cap, c->stream) == cudaSuccess ? 0 : -EIO;
    for (uint32_t g = 0; g < rows && !rc && n; g++)
        rc = kern_cuda_accumulate(acc + (size_t)g * cap, src + (size_t)g * n, n, scale, 0, c->stream);
    return finish(c, rc);
}

int gpuctx_h2o(struct gpuctx *c, const struct gpu_h2o *j)
{
    const struct gpu_layer *l = &j->l;
    const struct gpu_ring *r = &j->ring;
    uint32_t hkv = l->kv_heads, N = l->n_tokens, w = r->w, S1 = N - 1, S = N - w;
    int evict = j->k != UINT32_MAX;
    if (N < 2 || N > j->cap || (evict && (N <= w || j->k > S)))
        return -EINVAL;
    uint32_t k = evict ? j->k : 0;
    size_t row = (size_t)l->head_dim * 2, F = sizeof(float), cp = F * j->cap;
    size_t pg = al(sizeof(uint64_t) * l->n_pages), rg = al(sizeof(uint64_t) * r->n_pages);
    size_t qb = al(row * r->q_heads), ws = al(rank_ws(l, r->q_heads, 1, S1, KERN_POOL_NONE));
    size_t ib = al(F * hkv * S1), tb = al(F * hkv * (S + 1)), kb = al(sizeof(uint32_t) * hkv * (k + 1));
    size_t xb = al(kern_cuda_topk_workspace(hkv, S + 1)), cb = al(2 * (size_t)hkv * (k + w) * row);
    size_t gb = al(F * hkv * (k + 1)), wb = al(F * hkv * w);
    size_t dev = pg + rg + qb + ws + ib + tb + kb + xb + cb + gb + wb;
    if (reserve(c, dev, pg + rg + kb))
        return -ENOMEM;
    struct kern_cuda_kv kv;
    upload_pages(c, l, &kv);
    uint8_t *d = c->dbuf + pg + rg, *q = d;
    float *ind = (float *)(d + qb + ws), *tmp = (float *)((uint8_t *)ind + ib);
    uint32_t *keep = (uint32_t *)((uint8_t *)tmp + tb);
    uint8_t *xw = (uint8_t *)keep + kb, *ctmp = xw + xb;
    float *gat = (float *)(ctmp + cb), *win = (float *)((uint8_t *)gat + gb);
    cudaStream_t st = c->stream;
    int rc = 0;
    if (j->add) { /* the newest query's attention, its own column not counted */
        rc = gather_ring(r, row, j->newest, 1, c->hbuf + pg, c->dbuf + pg, q, st);
        if (!rc)
            rc = kern_cuda_score_layer_pool(&kv, q, NULL, r->q_heads, 1, S1, 0.0f, 0, KERN_POOL_NONE, 0, ind,
                                            NULL, NULL, q + qb, ws, st);
        for (uint32_t g = 0; g < hkv && !rc; g++)
            rc = kern_cuda_accumulate(j->acc + (size_t)g * j->cap, ind + (size_t)g * S1, S1, 1.0f, 0, st);
    }
#define CU2(x) (rc = rc ? rc : ((x) == cudaSuccess ? 0 : -EIO))
    if (evict && !rc) {
        CU2(cudaMemcpy2DAsync(tmp, F * S, j->acc, cp, F * S, hkv, cudaMemcpyDeviceToDevice, st));
        if (!rc)
            rc = kern_cuda_topk_ws(tmp, hkv, S, k, keep, xw, xb, st);
        if (!rc)
            rc = kern_cuda_compact(&kv, keep, k, S, w, ctmp, st);
        if (!rc && k)
            rc = kern_cuda_gather_rows_f32(tmp, hkv, S, keep, k, gat, st);
        CU2(cudaMemcpy2DAsync(win, F * w, j->acc + S, cp, F * w, hkv, cudaMemcpyDeviceToDevice, st));
        if (k)
            CU2(cudaMemcpy2DAsync(j->acc, cp, gat, F * k, F * k, hkv, cudaMemcpyDeviceToDevice, st));
        CU2(cudaMemcpy2DAsync(j->acc + k, cp, win, F * w, F * w, hkv, cudaMemcpyDeviceToDevice, st));
        if (j->cap > k + w)
            CU2(cudaMemset2DAsync(j->acc + k + w, cp, 0, F * (j->cap - k - w), hkv, st));
        if (k)
            CU2(cudaMemcpyAsync(c->hbuf + pg + rg, keep, sizeof(uint32_t) * hkv * k,
                                cudaMemcpyDeviceToHost, st));
    }
#undef CU2
    rc = finish(c, rc);
    if (!rc && evict && k)
        memcpy(j->keep, c->hbuf + pg + rg, sizeof(uint32_t) * hkv * k);
    return rc;
}
