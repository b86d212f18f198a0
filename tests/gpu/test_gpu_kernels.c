/* GPU kernels against the C reference on fresh random inputs (bf16 and fp16, contiguous
 * and paged layouts): scoring within tolerance of the double-precision version (both
 * scoring kernels: the mma.sync passes over every group shape they take - one to eight
 * slices of query columns, padded windows, heads over two slices - and the WMMA passes,
 * forced, on the same inputs; each also in one pass with the engine's log-sum-exps), the same
 * bytes on a second run, top-k and compaction exactly
 * equal to the CPU kernels on the same data; a decode step's eviction in one launch and a
 * cascading stage's compactions in one pass against the same references. Exit 77 without
 * a GPU. */
#include <cuda_runtime.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kern.h"
#include "kern_cuda.h"
#include "../../proto/shm.h"

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                       \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static uint64_t rs;
static double urand(void)
{
    rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
    return (rs >> 11) * (1.0 / 9007199254740992.0);
}

static int failures;
static double q_amp = 1.0; /* query scale: larger makes attention peaked, logits far apart */
static size_t page_pad;     /* run_case's bytes between pages: offsets off the 256-byte rows TMA reads */
/* CAKE_GPU_TEST_ONLY=topk,score,...: only those parts (topk, score, attn, ring, evict,
 * compact) run, for a short device call after a change to one of them; unset, all run.
 * in_list: whether the comma-separated list holds name. */
static int in_list(const char *list, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = list; *p; p += strcspn(p, ","), p += *p == ',')
        if (strcspn(p, ",") == n && !strncmp(p, name, n))
            return 1;
    return 0;
}

static int part(const char *name)
{
    const char *only = getenv("CAKE_GPU_TEST_ONLY");
    return !only || !*only || in_list(only, name);
}

/* every name CAKE_GPU_TEST_ONLY gives is a part (a misspelt one would skip everything and
 * pass) */
static int parts_known(const char *only)
{
    static const char *const names[] = {"topk", "score", "attn", "ring", "evict", "compact"};
    for (const char *p = only; *p; p += strcspn(p, ","), p += *p == ',') {
        char one[16] = "";
        size_t n = strcspn(p, ",");
        if (n && n < sizeof one)
            memcpy(one, p, n);
        int known = 0;
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            known |= !strcmp(one, names[i]);
        if (!known)
            return 0;
    }
    return 1;
}

#define EXPECT(c, ...) do { if (!(c)) { failures++; fprintf(stderr, "FAIL: " __VA_ARGS__); fputc('\n', stderr); } } while (0)

/* worst |got - ref| over the rows, each relative to its row's largest |ref| (NaN: infinite) */
static double rel_err(const float *ref, const float *got, uint32_t rows, uint32_t S)
{
    double worst = 0;
    for (uint32_t g = 0; g < rows; g++) {
        double mx = 0;
        for (uint32_t j = 0; j < S; j++)
            mx = fmax(mx, fabs(ref[g * S + j]));
        for (uint32_t j = 0; j < S; j++) {
            double e = fabs(got[g * S + j] - ref[g * S + j]) / mx;
            worst = isnan(e) ? INFINITY : fmax(worst, e);
        }
    }
    return worst;
}

/* Each window row's log-sum-exp [H][nq] in double from the layer's own bytes (what an
 * engine's attention returns), apart from every kernel. */
static float *host_lse(const struct kern_kv *kv, const void *q, enum kern_dtype dt, uint32_t H,
                       uint32_t nq)
{
    uint32_t n = kv->n_tokens, d = kv->head_dim, G = H / kv->kv_heads;
    float *lse = malloc(sizeof(float) * H * nq);
    double *z = malloc(sizeof(double) * n);
    for (uint32_t h = 0; h < H; h++)
        for (uint32_t i = 0; i < nq; i++) {
            uint32_t lim = n - nq + i + 1;
            double mx = -INFINITY, sum = 0;
            for (uint32_t j = 0; j < lim; j++) {
                const void *kp = kern_kv_key(kv, h / G, j);
                double dot = 0;
                for (uint32_t x = 0; x < d; x++)
                    dot += (double)kern_load(dt, q, ((size_t)h * nq + i) * d + x) *
                           (double)kern_load(dt, kp, x);
                z[j] = dot / sqrt((double)d), mx = fmax(mx, z[j]);
            }
            for (uint32_t j = 0; j < lim; j++)
                sum += exp(z[j] - mx);
            lse[h * nq + i] = (float)(mx + log(sum));
        }
    free(z);
    return lse;
}

/* kern_cuda_score_layer_pool_dev (the statistics left on the device, as caked's loop takes
 * them) against the host's call just made (E, V, its indicator got): the same doubles and
 * the same bytes; then accumulating onto what the buffer holds. */
static void check_dev_stats(const struct kern_cuda_kv *dkv, const void *dq, const float *dlse,
                            uint32_t H, uint32_t nq, uint32_t S, int pool, uint32_t radius,
                            void *ws, size_t wsb, float *dind, const float *got, double E, double V,
                            const char *what)
{
    uint32_t Hkv = dkv->kv_heads;
    double *dst, sv[2], base[2] = {1.5, -2.25};
    float *got2 = malloc(sizeof(float) * Hkv * S);
    CK(cudaMalloc((void **)&dst, sizeof sv));
    CK(cudaMemset(dst, 0xff, sizeof sv));
    CK(cudaMemset(dind, 0xff, sizeof(float) * Hkv * S));
    int rc = kern_cuda_score_layer_pool_dev(dkv, dq, dlse, H, nq, S, 200.0f, 0, pool, radius, dind,
                                            dst, 0, ws, wsb, NULL);
    CK(cudaMemcpy(sv, dst, sizeof sv, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(got2, dind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
    EXPECT(rc == 0 && sv[0] == E && sv[1] == V && !memcmp(got, got2, sizeof(float) * Hkv * S),
           "%s: statistics on the device rc %d, entropy %.17g vs %.17g, variance %.17g vs %.17g, "
           "indicator %s", what, rc, sv[0], E, sv[1], V,
           memcmp(got, got2, sizeof(float) * Hkv * S) ? "differs" : "equal");
    CK(cudaMemcpy(dst, base, sizeof base, cudaMemcpyHostToDevice));
    rc = kern_cuda_score_layer_pool_dev(dkv, dq, dlse, H, nq, S, 200.0f, 0, pool, radius, dind,
                                        dst, 1, ws, wsb, NULL);
    CK(cudaMemcpy(sv, dst, sizeof sv, cudaMemcpyDeviceToHost));
    EXPECT(rc == 0 && fabs(sv[0] - (base[0] + E)) <= 1e-12 * fabs(base[0] + E) + 1e-12 &&
               fabs(sv[1] - (base[1] + V)) <= 1e-12 * fabs(base[1] + V) + 1e-12,
           "%s: statistics accumulated rc %d, %.17g / %.17g vs %.17g / %.17g", what, rc, sv[0],
           sv[1], base[0] + E, base[1] + V);
    cudaFree(dst);
    free(got2);
}

static void run_case(enum kern_dtype dt, uint32_t H, uint32_t Hkv, uint32_t d, uint32_t n, uint32_t nq,
                     uint32_t tpp, uint32_t keep)
{
    if (!part("score"))
        return;
    uint32_t npages = (n + tpp - 1) / tpp, S = n - nq;
    size_t page_bytes = 2 * (size_t)Hkv * tpp * d * 2, half = page_bytes / 2;
    size_t pool = (page_bytes + page_pad) * npages;
    uint8_t *host = malloc(pool);
    void **pages = malloc(sizeof(void *) * npages);
    uint64_t *off = malloc(sizeof(uint64_t) * npages);
    for (uint32_t p = 0; p < npages; p++) /* pages in reverse order: a real page table */
        off[p] = (uint64_t)(npages - 1 - p) * (page_bytes + page_pad), pages[p] = host + off[p];
    struct kern_kv kv = {dt, Hkv, d, tpp, n, pages, half};
    float *row = malloc(sizeof(float) * d);
    memset(host, 0, pool);
    for (uint32_t g = 0; g < Hkv; g++)
        for (uint32_t t = 0; t < n; t++) {
            double amp = (t == 0 || urand() < 0.03) ? 3.0 : 1.0;
            for (uint32_t x = 0; x < d; x++)
                row[x] = (float)(amp * (2 * urand() - 1));
            kern_from_f32(dt, row, kern_kv_key(&kv, g, t), d);
            for (uint32_t x = 0; x < d; x++)
                row[x] = (float)(2 * urand() - 1);
            kern_from_f32(dt, row, (char *)kern_kv_key(&kv, g, t) + half, d);
        }
    size_t qn = (size_t)H * nq * d;
    float *qf = malloc(sizeof(float) * qn);
    uint16_t *q = malloc(qn * 2);
    for (size_t i = 0; i < qn; i++)
        qf[i] = (float)(q_amp * (3 * urand() - 1.5));
    kern_from_f32(dt, qf, q, qn);
    /* reference */
    float *ref = malloc(sizeof(float) * Hkv * S), *got = malloc(sizeof(float) * Hkv * S);
    struct kern_score_args a = {.q = q, .q_dtype = dt, .q_heads = H, .n_q = nq, .kv = &kv,
                                .n_scored = S, .gamma = 200.0f, .stats = KERN_STATS_FP32};
    struct kern_score_out ro = {.indicator = ref};
    kern_score_layer_ref(&a, &ro);
    /* device */
    uint8_t *dbase;
    uint64_t *doff;
    void *dq, *ws;
    float *dind;
    CK(cudaMalloc((void **)&dbase, pool));
    CK(cudaMalloc((void **)&doff, sizeof(uint64_t) * npages));
    CK(cudaMalloc(&dq, qn * 2));
    CK(cudaMalloc((void **)&dind, sizeof(float) * Hkv * S));
    CK(cudaMemcpy(dbase, host, pool, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(doff, off, sizeof(uint64_t) * npages, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dq, q, qn * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(dind, 0xff, sizeof(float) * Hkv * S)); /* poison: NaN everywhere */
    size_t wsb = kern_cuda_score_workspace(Hkv, H, nq, n, S);
    CK(cudaMalloc(&ws, wsb));
    struct kern_cuda_kv dkv = {dt, Hkv, d, tpp, n, dbase, doff, half};
    double E, V, E2, V2;
    const char *name = dt == KERN_BF16 ? "bf16" : "f16";
    for (int mode = 2; mode >= 0; mode--) { /* the WMMA passes, mma.sync, the default (wgmma where it fits) */
        int wmma = mode == 2;
        kern_cuda_score_set_wmma(wmma), kern_cuda_score_set_wgmma(mode == 0);
        int rc = kern_cuda_score_layer(&dkv, dq, H, nq, S, 200.0f, dind, &E, &V, ws, wsb, NULL);
        EXPECT(rc == 0, "score rc %d", rc);
        CK(cudaMemcpy(got, dind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
        /* cake-parity's rule for the layer statistics (they set the budgets): 1e-4 */
        EXPECT(fabs(E - ro.entropy) <= 1e-4 * fabs(ro.entropy), "%s n=%u mode=%d entropy %.9g vs %.9g", name, n,
               mode, E, ro.entropy);
        EXPECT(fabs(V - ro.variance) <= 1e-4 * fabs(ro.variance), "%s n=%u mode=%d variance %.9g vs %.9g", name,
               n, mode, V, ro.variance);
        double worst = rel_err(ref, got, Hkv, S);
        EXPECT(worst <= 1e-3, "%s n=%u mode=%d indicator rel err %.3g", name, n, mode, worst);
        check_dev_stats(&dkv, dq, NULL, H, nq, S, KERN_POOL_AVG, 2, ws, wsb, dind, got, E, V,
                        name);
        if (wmma)
            printf("%-5s H=%u Hkv=%u d=%u n=%u w=%u tpp=%u, WMMA passes: entropy rel %.2e, variance rel %.2e, "
                   "indicator rel %.2e\n", name, H, Hkv, d, n, nq, tpp, fabs(E - ro.entropy) / fabs(ro.entropy),
                   fabs(V - ro.variance) / fabs(ro.variance), worst);
    }
    /* one pass with the engine's log-sum-exps (computed apart, in double): both kernels,
     * CAKE's pooling and SnapKV's max over 7 (one query head of a group at a time) */
    float *lse = host_lse(&kv, q, dt, H, nq), *dlse;
    CK(cudaMalloc((void **)&dlse, sizeof(float) * H * nq));
    CK(cudaMemcpy(dlse, lse, sizeof(float) * H * nq, cudaMemcpyHostToDevice));
    {
        size_t lwsb = kern_cuda_score_pool_workspace(Hkv, H, nq, n, S, KERN_POOL_MAX);
        void *lws;
        CK(cudaMalloc(&lws, lwsb));
        for (int mode = 2; mode >= 0; mode--) /* WMMA, mma.sync, the default (wgmma) */
            for (int max7 = 0; max7 < 2; max7++) {
                int wmma = mode == 2;
                struct kern_score_args b = a;
                b.pool = max7 ? KERN_POOL_MAX : KERN_POOL_AVG, b.pool_kernel = max7 ? 7 : 5;
                struct kern_score_out lo = {.indicator = ref};
                kern_score_layer_ref(&b, &lo);
                kern_cuda_score_set_wmma(wmma), kern_cuda_score_set_wgmma(mode == 0);
                CK(cudaMemset(dind, 0xff, sizeof(float) * Hkv * S));
                int rc = kern_cuda_score_layer_pool(&dkv, dq, dlse, H, nq, S, 200.0f, 0, b.pool,
                                                    b.pool_kernel / 2, dind, &E, &V, lws, lwsb, NULL);
                EXPECT(rc == 0, "lse score rc %d", rc);
                CK(cudaMemcpy(got, dind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
                double e = rel_err(ref, got, Hkv, S);
                EXPECT(fabs(E - lo.entropy) <= 1e-4 * fabs(lo.entropy) &&
                           fabs(V - lo.variance) <= 1e-4 * fabs(lo.variance) && e <= 1e-3,
                       "%s n=%u mode=%d max7=%d with lse: entropy %.9g vs %.9g, variance %.9g vs "
                       "%.9g, indicator rel err %.3g", name, n, mode, max7, E, lo.entropy, V,
                       lo.variance, e);
                check_dev_stats(&dkv, dq, dlse, H, nq, S, b.pool, b.pool_kernel / 2, lws, lwsb, dind,
                                got, E, V, max7 ? "with lse, max over 7" : "with lse");
            }
        kern_cuda_score_set_wmma(0);
        cudaFree(lws);
    }
    free(lse);
    cudaFree(dlse);
    kern_score_layer_ref(&a, &ro);
    /* the baselines' indicators: other poolings (SnapKV's max over 7, none, a wider average),
     * the mean alone (gamma 0), each against the double reference; then one ranking for every
     * kv head (TOVA) and StreamingLLM's positions against the C code's */
    static const struct { int pool; uint32_t k; float gamma; int var_only; } pv[] = {
        {KERN_POOL_MAX, 7, 0.0f, 0}, {KERN_POOL_NONE, 1, 0.0f, 0}, {KERN_POOL_AVG, 7, 200.0f, 0},
        {KERN_POOL_MAX, 3, 200.0f, 0}, {KERN_POOL_AVG, 5, 200.0f, 1}, /* the variance alone */
    };
    void *pws;
    size_t pwsb = kern_cuda_score_pool_workspace(Hkv, H, nq, n, S, KERN_POOL_MAX);
    CK(cudaMalloc(&pws, pwsb));
    for (size_t v = 0; v < sizeof pv / sizeof pv[0]; v++) {
        struct kern_score_args b = a;
        b.pool = (enum kern_pool)pv[v].pool, b.pool_kernel = pv[v].k, b.gamma = pv[v].gamma;
        b.var_only = pv[v].var_only;
        kern_score_layer_ref(&b, &ro);
        EXPECT(kern_cuda_score_layer_pool(&dkv, dq, NULL, H, nq, S, pv[v].gamma, pv[v].var_only,
                                          pv[v].pool, pv[v].k / 2, dind, NULL, NULL, pws, pwsb,
                                          NULL) == 0, "pool rc");
        CK(cudaMemcpy(got, dind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
        double e = rel_err(ref, got, Hkv, S);
        EXPECT(e <= 1e-3, "%s n=%u pool %d/%u gamma %g%s: indicator rel err %.3g", name, n,
               pv[v].pool, pv[v].k, pv[v].gamma, pv[v].var_only ? " (variance alone)" : "", e);
    }
    cudaFree(pws);
    CK(cudaMemcpy(ref, dind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
    for (uint32_t j = 0; j < S; j++) { /* indicator.c's shared_heads */
        double m = 0;
        for (uint32_t g = 0; g < Hkv; g++)
            m += ref[(size_t)g * S + j];
        for (uint32_t g = 0; g < Hkv; g++)
            ref[(size_t)g * S + j] = (float)(m / Hkv);
    }
    EXPECT(kern_cuda_rows_mean(dind, Hkv, S, NULL) == 0, "rows mean rc");
    CK(cudaMemcpy(got, dind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
    EXPECT(!memcmp(ref, got, sizeof(float) * Hkv * S), "%s n=%u rows mean differs", name, n);
    uint32_t sinks = 1 + (uint32_t)(urand() * 8);
    EXPECT(kern_cuda_position_indicator(dind, Hkv, S, sinks, NULL) == 0, "position rc");
    CK(cudaMemcpy(got, dind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
    int pos_ok = 1;
    for (uint32_t g = 0; g < Hkv; g++)
        for (uint32_t j = 0; j < S; j++)
            pos_ok &= got[(size_t)g * S + j] == (j < sinks ? FLT_MAX : (float)j);
    EXPECT(pos_ok, "%s n=%u position indicator differs", name, n);
    /* back to CAKE's indicator for what follows */
    kern_score_layer_ref(&a, &ro);
    EXPECT(kern_cuda_score_layer(&dkv, dq, H, nq, S, 200.0f, dind, &E, &V, ws, wsb, NULL) == 0, "rc");
    CK(cudaMemcpy(got, dind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
    /* reproducible: a second run gives the same bytes */
    float *again = malloc(sizeof(float) * Hkv * S);
    EXPECT(kern_cuda_score_layer(&dkv, dq, H, nq, S, 200.0f, dind, &E2, &V2, ws, wsb, NULL) == 0, "score rc");
    CK(cudaMemcpy(again, dind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
    EXPECT(!memcmp(again, got, sizeof(float) * Hkv * S) && E == E2 && V == V2, "%s n=%u second run differs", name, n);
    free(again);
    double worst = rel_err(ref, got, Hkv, S); /* the default kernel's, checked above */
    /* top-k on the GPU's own indicator: exactly the CPU's choice */
    uint32_t *didx, *idx = malloc(sizeof(uint32_t) * Hkv * keep), *cidx = malloc(sizeof(uint32_t) * keep);
    CK(cudaMalloc((void **)&didx, sizeof(uint32_t) * Hkv * keep));
    EXPECT(kern_cuda_topk(dind, Hkv, S, keep, didx, NULL) == 0, "topk rc");
    CK(cudaMemcpy(idx, didx, sizeof(uint32_t) * Hkv * keep, cudaMemcpyDeviceToHost));
    for (uint32_t g = 0; g < Hkv; g++) {
        kern_topk(got + (size_t)g * S, S, keep, KERN_ORDER_POSITION, cidx);
        EXPECT(!memcmp(cidx, idx + (size_t)g * keep, sizeof(uint32_t) * keep), "%s n=%u topk head %u differs", name, n, g);
    }
    /* the indicator following its kept tokens: the CPU's gather */
    float *dgat, *gat = malloc(sizeof(float) * Hkv * keep), *cgat = malloc(sizeof(float) * keep);
    CK(cudaMalloc((void **)&dgat, sizeof(float) * Hkv * keep));
    EXPECT(kern_cuda_gather_rows_f32(dind, Hkv, S, didx, keep, dgat, NULL) == 0, "gather rc");
    CK(cudaMemcpy(gat, dgat, sizeof(float) * Hkv * keep, cudaMemcpyDeviceToHost));
    for (uint32_t g = 0; g < Hkv; g++) {
        kern_gather_f32(got + (size_t)g * S, idx + (size_t)g * keep, keep, cgat);
        EXPECT(!memcmp(cgat, gat + (size_t)g * keep, sizeof(float) * keep), "%s n=%u gather head %u differs", name, n, g);
    }
    cudaFree(dgat), free(gat), free(cgat);
    /* compaction: same bytes as the CPU's */
    void *tmp;
    CK(cudaMalloc(&tmp, 2 * (size_t)Hkv * (keep + nq) * d * 2));
    EXPECT(kern_cuda_compact(&dkv, didx, keep, S, nq, tmp, NULL) == 0, "compact rc");
    CK(cudaDeviceSynchronize());
    uint8_t *back = malloc(pool);
    CK(cudaMemcpy(back, dbase, pool, cudaMemcpyDeviceToHost));
    for (uint32_t g = 0; g < Hkv; g++)
        kern_compact_head(&kv, g, idx + (size_t)g * keep, keep, S, nq, NULL);
    int same = 1;
    for (uint32_t g = 0; g < Hkv && same; g++)
        for (uint32_t t = 0; t < keep + nq && same; t++) {
            size_t o = (size_t)((uint8_t *)kern_kv_key(&kv, g, t) - host);
            same = !memcmp(back + o, host + o, d * 2) && !memcmp(back + o + half, host + o + half, d * 2);
        }
    EXPECT(same, "%s n=%u compaction bytes differ", name, n);
    printf("%-5s H=%u Hkv=%u d=%u n=%u w=%u tpp=%u pad=%zu q x%.0f: entropy rel %.2e, variance rel %.2e, indicator rel %.2e, "
           "topk %s, compaction %s\n", name, H, Hkv, d, n, nq, tpp, page_pad, q_amp, fabs(E - ro.entropy) / fabs(ro.entropy),
           fabs(V - ro.variance) / fabs(ro.variance), worst, failures ? "?" : "equal", same ? "equal" : "DIFFERS");
    cudaFree(dbase), cudaFree(doff), cudaFree(dq), cudaFree(dind), cudaFree(ws), cudaFree(didx), cudaFree(tmp);
    free(host), free(pages), free(off), free(row), free(qf), free(q), free(ref), free(got), free(idx), free(cidx), free(back);
}

/* The many-blocks top-k against the CPU's, on long rows with many ties (quantized scores)
 * and k from 1 to n: the cluster path (Hopper) and the launch-per-step one, and rows past the
 * cluster path's 256K keys. */
static void run_topk_many(void)
{
    if (!part("topk"))
        return;
    int was = kern_cuda_topk_set_cluster(1);
    for (int rep = 0; rep < 14; rep++) {
        int cl = rep < 6 || rep >= 12; /* 6-11: the launch-per-step path on the same kinds of rows */
        kern_cuda_topk_set_cluster(cl);
        uint32_t rows = 1 + (uint32_t)(urand() * 8), n = 4097 + (uint32_t)(urand() * 140000);
        if (rep == 12) /* rows a cluster does not take (past 256K keys): the other path */
            rows = 2, n = 8 * 32768 + 1 + (uint32_t)(urand() * 5000);
        if (rep == 13) /* short segments (~513 keys a block of 1024 threads), NaN and infinities */
            n = 4097 + (uint32_t)(urand() * 16);
        uint32_t k = rep % 6 == 0 ? n : rep % 6 == 1 ? 1 : 1 + (uint32_t)(urand() * (n - 1));
        int levels = rep % 2 ? 40 : 1 << 20;
        float *s = malloc(sizeof(float) * rows * n);
        for (size_t i = 0; i < (size_t)rows * n; i++)
            s[i] = (float)(floor(urand() * levels) / levels * 1e-3);
        for (size_t i = 0; rep == 13 && i < (size_t)rows * n; i += 37)
            s[i] = i % 3 == 0 ? NAN : i % 3 == 1 ? INFINITY : -INFINITY;
        float *ds;
        uint32_t *didx, *idx = malloc(sizeof(uint32_t) * rows * k), *cidx = malloc(sizeof(uint32_t) * k);
        size_t wsb = kern_cuda_topk_workspace(rows, n);
        void *ws;
        CK(cudaMalloc((void **)&ds, sizeof(float) * rows * n));
        CK(cudaMalloc((void **)&didx, sizeof(uint32_t) * rows * k));
        CK(cudaMalloc(&ws, wsb));
        CK(cudaMemcpy(ds, s, sizeof(float) * rows * n, cudaMemcpyHostToDevice));
        EXPECT(kern_cuda_topk_ws(ds, rows, n, k, didx, ws, wsb, NULL) == 0, "topk_ws rc");
        CK(cudaMemcpy(idx, didx, sizeof(uint32_t) * rows * k, cudaMemcpyDeviceToHost));
        int same = 1;
        for (uint32_t r = 0; r < rows; r++) {
            kern_topk(s + (size_t)r * n, n, k, KERN_ORDER_POSITION, cidx);
            same &= !memcmp(cidx, idx + (size_t)r * k, sizeof(uint32_t) * k);
        }
        EXPECT(same, "many-block top-k differs from the CPU's: rows %u n %u k %u levels %d", rows,
               n, k, levels);
        printf("top-k over blocks (%s): rows %u n %u k %u (%s ties): %s\n", cl ? "clusters" : "a launch a step",
               rows, n, k, levels < 100 ? "many" : "few", same ? "equal" : "DIFFERS");
        cudaFree(ds), cudaFree(didx), cudaFree(ws), free(s), free(idx), free(cidx);
    }
    kern_cuda_topk_set_cluster(was);
}

/* Decode attention over several layers of different lengths, paged, against doubles, on the
 * tensor cores and on CUDA cores (kern_cuda_attn_set_simt); with holes, each (layer, kv
 * head) leaves a random run of slots out (Ada-KV's), one of them a whole split of the
 * kernel's and more. tpp tokens a page (a tile of 16 may straddle pages). */
static void run_attention(enum kern_dtype dt, int with_holes, uint32_t H, uint32_t HKV, uint32_t D,
                          uint32_t TPP)
{
    if (!part("attn"))
        return;
    enum { L = 3 };
    uint32_t ntok[L] = {1 + (uint32_t)(urand() * 100), 1000 + (uint32_t)(urand() * 600), 3000};
    int32_t *hl = calloc((size_t)L * HKV * 2, sizeof(int32_t)); /* [L][HKV][2] */
    for (int l = 0; l < L && with_holes; l++)
        for (uint32_t g = 0; g < HKV; g++)
            if (ntok[l] > 1 && g % 4 != 3) { /* every fourth head has none */
                uint32_t first = 1 + (uint32_t)(urand() * (ntok[l] - 1));
                hl[(l * HKV + g) * 2] = (int32_t)first;
                hl[(l * HKV + g) * 2 + 1] = (int32_t)(urand() * (ntok[l] - first));
            }
    if (with_holes) /* slots 512-1023 (a split at every length) all holes */
        hl[(2 * HKV) * 2] = 400, hl[(2 * HKV) * 2 + 1] = 1200;
    size_t page_bytes = 2 * (size_t)HKV * TPP * D * 2, half = page_bytes / 2;
    uint32_t npages[L], total = 0;
    for (int l = 0; l < L; l++)
        npages[l] = (ntok[l] + TPP - 1) / TPP, total += npages[l];
    uint8_t *host = malloc(page_bytes * total);
    uint64_t *off = malloc(sizeof(uint64_t) * total);
    for (uint32_t p = 0; p < total; p++) /* layers' pages interleaved in reverse */
        off[p] = (uint64_t)(total - 1 - p) * page_bytes;
    for (size_t i = 0; i < page_bytes * total / 2; i++) {
        float x = (float)(2 * urand() - 1);
        kern_from_f32(dt, &x, host + 2 * i, 1);
    }
    size_t qn = (size_t)L * H * D;
    float *qf = malloc(sizeof(float) * qn), *out = malloc(sizeof(float) * qn);
    uint16_t *q = malloc(qn * 2);
    double *o = malloc(sizeof(double) * D);
    for (size_t i = 0; i < qn; i++)
        qf[i] = (float)(4 * urand() - 2);
    kern_from_f32(dt, qf, q, qn);
    uint32_t first = 0;
    for (int l = 0; l < L; l++) {
        for (uint32_t h = 0; h < H; h++) {
            uint32_t g = h / (H / HKV);
            double *sc = malloc(sizeof(double) * ntok[l]), mx = -INFINITY, sum = 0;
            memset(o, 0, sizeof(double) * D);
            uint32_t h0 = (uint32_t)hl[(l * HKV + g) * 2], h1 = h0 + (uint32_t)hl[(l * HKV + g) * 2 + 1];
            for (uint32_t t = 0; t < ntok[l]; t++) {
                const uint8_t *k = host + off[first + t / TPP] + ((size_t)g * TPP + t % TPP) * D * 2;
                double dot = 0;
                if (t >= h0 && t < h1) {
                    sc[t] = -INFINITY;
                    continue;
                }
                for (uint32_t x = 0; x < D; x++)
                    dot += (double)kern_load(dt, q, ((size_t)l * H + h) * D + x) * kern_load(dt, k, x);
                sc[t] = dot / sqrt((double)D);
                mx = fmax(mx, sc[t]);
            }
            for (uint32_t t = 0; t < ntok[l]; t++) {
                const uint8_t *v = host + off[first + t / TPP] + ((size_t)g * TPP + t % TPP) * D * 2 + half;
                double w = exp(sc[t] - mx);
                sum += w;
                for (uint32_t x = 0; x < D; x++)
                    o[x] += w * kern_load(dt, v, x);
            }
            for (uint32_t x = 0; x < D; x++)
                out[((size_t)l * H + h) * D + x] = (float)(o[x] / sum);
            free(sc);
        }
        first += npages[l];
    }
    uint8_t *dbase;
    uint64_t *doff, *ptrs[L], **dptrs;
    uint32_t *dn;
    int32_t *dholes = NULL;
    void *dq, *ws;
    float *dout, *got = malloc(sizeof(float) * qn);
    CK(cudaMalloc((void **)&dbase, page_bytes * total));
    CK(cudaMalloc((void **)&doff, sizeof(uint64_t) * total));
    CK(cudaMemcpy(dbase, host, page_bytes * total, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(doff, off, sizeof(uint64_t) * total, cudaMemcpyHostToDevice));
    first = 0;
    for (int l = 0; l < L; l++)
        ptrs[l] = doff + first, first += npages[l];
    CK(cudaMalloc((void **)&dptrs, sizeof ptrs));
    CK(cudaMemcpy(dptrs, ptrs, sizeof ptrs, cudaMemcpyHostToDevice));
    CK(cudaMalloc((void **)&dn, sizeof ntok));
    CK(cudaMemcpy(dn, ntok, sizeof ntok, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&dq, qn * 2));
    CK(cudaMemcpy(dq, q, qn * 2, cudaMemcpyHostToDevice));
    CK(cudaMalloc((void **)&dout, sizeof(float) * qn));
    if (with_holes) {
        CK(cudaMalloc((void **)&dholes, sizeof(int32_t) * L * HKV * 2));
        CK(cudaMemcpy(dholes, hl, sizeof(int32_t) * L * HKV * 2, cudaMemcpyHostToDevice));
    }
    size_t wsb = kern_cuda_attn_workspace(L, H, D, 3000);
    CK(cudaMalloc(&ws, wsb));
    double rel[2];
    for (int simt = 0; simt < 2; simt++) { /* the tensor cores (d 64, 128), then CUDA cores */
        int was = kern_cuda_attn_set_simt(simt);
        CK(cudaMemset(dout, 0xff, sizeof(float) * qn));
        int rc = kern_cuda_decode_attention(dt, dbase, (const uint64_t *const *)dptrs, dn, dholes,
                                            3000, L, H, HKV, D, TPP, half, dq, dout, ws, wsb, NULL);
        kern_cuda_attn_set_simt(was);
        EXPECT(rc == 0, "attention rc %d", rc);
        CK(cudaMemcpy(got, dout, sizeof(float) * qn, cudaMemcpyDeviceToHost));
        double err = 0, nrm = 0;
        for (size_t i = 0; i < qn; i++)
            err += ((double)got[i] - out[i]) * ((double)got[i] - out[i]), nrm += (double)out[i] * out[i];
        rel[simt] = sqrt(err / nrm);
        EXPECT(rel[simt] <= 1e-4, "attention (%s) rel err %.3g", simt ? "CUDA cores" : "tensor cores",
               rel[simt]);
    }
    printf("%-5s decode attention H=%u Hkv=%u d=%u tpp=%u, %d layers of %u/%u/%u tokens, paged%s: "
           "rel err %.2e (%s), %.2e (CUDA cores forced)\n", dt == KERN_BF16 ? "bf16" : "f16", H,
           HKV, D, TPP, L, ntok[0], ntok[1], ntok[2], with_holes ? ", holes masked" : "", rel[0],
           D == 64 || D == 128 ? "tensor cores" : "CUDA cores: no tensor-core body at this d", rel[1]);
    cudaFree(dholes), cudaFree(dbase), cudaFree(doff), cudaFree(dptrs), cudaFree(dn), cudaFree(dq), cudaFree(dout), cudaFree(ws);
    free(host), free(off), free(qf), free(out), free(q), free(got), free(o), free(hl);
}

/* 0..n-1 in random order (Fisher-Yates): pages scattered over a buffer (malloc'd; free it). */
static int u32_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static uint32_t *shuffled(uint32_t n)
{
    uint32_t *perm = malloc(sizeof(uint32_t) * (n ? n : 1));
    for (uint32_t i = 0; i < n; i++)
        perm[i] = i;
    for (uint32_t i = n ? n - 1 : 0; i > 0; i--) {
        uint32_t j = (uint32_t)(urand() * (i + 1)), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    return perm;
}

/* The paged query ring (shm_ring) gathered oldest first, against the host's reading of the
 * same layout: pages scattered over a buffer in random order, random geometry (whole heads
 * a page, or a head over several pages; rows a multiple of 16 bytes or not), random start
 * and length; every byte equal. */
static void run_ring_gather(void)
{
    if (!part("ring"))
        return;
    for (int round = 0; round < 40; round++) {
        uint32_t H = 1 + (uint32_t)(urand() * 40), w = 1 + (uint32_t)(urand() * 300);
        uint32_t row = 2 * (1 + (uint32_t)(urand() * 130)); /* 2..262 bytes */
        uint64_t pb = round % 2 ? 4096 : 65536;
        struct shm_ring g = shm_ring_geom(H, w, row, pb);
        uint32_t P = g.pages + 3, first = (uint32_t)(urand() * w);
        uint32_t nq = 1 + (uint32_t)(urand() * w);
        uint8_t *host = malloc(pb * P), *want = malloc((size_t)H * nq * row + 1);
        uint8_t *got = malloc((size_t)H * nq * row + 1);
        uint64_t *off = malloc(sizeof(uint64_t) * g.pages);
        uint32_t *perm = shuffled(P);
        for (uint32_t i = 0; i < g.pages; i++)
            off[i] = perm[i] * pb;
        for (size_t i = 0; i < pb * P; i++)
            host[i] = (uint8_t)(urand() * 256);
        for (uint32_t h = 0; h < H; h++)
            for (uint32_t i = 0; i < nq; i++) {
                uint32_t pg, slot = (first + i) % w;
                uint64_t at = shm_ring_at(&g, w, row, h, slot, &pg);
                memcpy(want + ((size_t)h * nq + i) * row, host + off[pg] + at, row);
            }
        uint8_t *dbase, *ddst;
        uint64_t *doff;
        CK(cudaMalloc((void **)&dbase, pb * P));
        CK(cudaMalloc((void **)&ddst, (size_t)H * nq * row + 1));
        CK(cudaMalloc((void **)&doff, sizeof(uint64_t) * g.pages));
        CK(cudaMemcpy(dbase, host, pb * P, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(doff, off, sizeof(uint64_t) * g.pages, cudaMemcpyHostToDevice));
        int rc = kern_cuda_ring_gather(ddst, dbase, doff, H, w, row, g.rows_per_page,
                                       g.heads_per_page, g.pages_per_head, first, nq, NULL);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(got, ddst, (size_t)H * nq * row, cudaMemcpyDeviceToHost));
        EXPECT(rc == 0 && !memcmp(got, want, (size_t)H * nq * row),
               "ring gather H %u w %u row %u page %llu (%u pages, %u heads/page, %u pages/head) "
               "first %u n %u: rc %d, rows differ", H, w, row, (unsigned long long)pb, g.pages,
               g.heads_per_page, g.pages_per_head, first, nq, rc);
        cudaFree(dbase), cudaFree(ddst), cudaFree(doff);
        free(host), free(want), free(got), free(off), free(perm);
    }
    printf("ring gather: 40 random paged rings equal to the host's reading\n");
}

/* Each layer's page and ring offsets to the device and its evicted and indicator buffers of
 * cap[l] slots a kv head, all in one allocation (returned; cudaFree it): jobs[l]'s pointers.
 * The jobs' other fields are the caller's. */
static uint8_t *upload_evict_jobs(int L, uint64_t *const *off, const uint32_t *np, uint64_t *const *roff,
                                  uint32_t ring_pages, const uint32_t *cap, uint32_t Hkv,
                                  struct kern_cuda_evict_job *jobs)
{
    size_t tab = 0, at = 0;
    for (int l = 0; l < L; l++)
        tab += sizeof(uint64_t) * (np[l] + ring_pages) + (sizeof(uint32_t) + sizeof(float)) * Hkv * cap[l];
    uint8_t *dtab;
    CK(cudaMalloc((void **)&dtab, tab));
    for (int l = 0; l < L; l++) {
        CK(cudaMemcpy(dtab + at, off[l], sizeof(uint64_t) * np[l], cudaMemcpyHostToDevice));
        jobs[l].page_off = (const uint64_t *)(dtab + at), at += sizeof(uint64_t) * np[l];
        CK(cudaMemcpy(dtab + at, roff[l], sizeof(uint64_t) * ring_pages, cudaMemcpyHostToDevice));
        jobs[l].ring_off = (const uint64_t *)(dtab + at), at += sizeof(uint64_t) * ring_pages;
        jobs[l].evicted = (uint32_t *)(dtab + at), at += sizeof(uint32_t) * Hkv * cap[l];
        jobs[l].ind = (float *)(dtab + at), at += sizeof(float) * Hkv * cap[l];
    }
    return dtab;
}

/* A decode step's eviction in one launch (kern_cuda_decode_evict) against the C reference:
 * several layers of random lengths, K/V and query rings in scattered pages of one pool, the
 * window read from the ring at a random start (and part of a window), keeps from 0 to S - 1.
 * Per layer and kv head: the indicator within 1e-3 of the double reference, the removed
 * slots exactly the complement of the CPU's top-k of that indicator, the compacted K/V the
 * CPU compaction's bytes, the rings untouched; shapes and rankings it does not take are
 * refused with -ENOTSUP. */
static void run_decode_evict(enum kern_dtype dt, uint32_t H, uint32_t Hkv, uint32_t d, uint32_t w,
                             uint32_t nq, uint32_t tpp, int pool, uint32_t radius, float gamma,
                             int var_only)
{
    if (!part("evict"))
        return;
    enum { L = 7 };
    size_t row = (size_t)d * 2, half = (size_t)Hkv * tpp * row, pb = 2 * half;
    struct shm_ring rg = shm_ring_geom(H, w, (uint32_t)row, pb);
    uint32_t n[L], k[L], np[L], S[L], max_S = 0, first = (uint32_t)(urand() * w), P = 0;
    for (int l = 0; l < L; l++) {
        S[l] = 40 + (uint32_t)(urand() * 1500), n[l] = S[l] + w;
        k[l] = l == 0 ? 0 : l == 1 ? S[l] - 1 : (uint32_t)(urand() * S[l]);
        np[l] = (n[l] + tpp - 1) / tpp, P += np[l] + rg.pages;
        max_S = S[l] > max_S ? S[l] : max_S;
    }
    uint32_t *perm = shuffled(P);
    uint8_t *host = malloc(pb * P);
    for (size_t i = 0; i < pb * P / 2; i++) { /* values in [-1, 1): no NaN or inf bit patterns */
        float f = (float)(2 * urand() - 1);
        kern_from_f32(dt, &f, host + 2 * i, 1);
    }
    uint64_t *off[L], *roff[L];
    void **pages[L];
    struct kern_kv kv[L];
    for (uint32_t l = 0, at = 0; l < L; l++) {
        off[l] = malloc(sizeof(uint64_t) * np[l]), roff[l] = malloc(sizeof(uint64_t) * rg.pages);
        pages[l] = malloc(sizeof(void *) * np[l]);
        for (uint32_t i = 0; i < np[l]; i++)
            off[l][i] = perm[at++] * pb, pages[l][i] = host + off[l][i];
        for (uint32_t i = 0; i < rg.pages; i++)
            roff[l][i] = perm[at++] * pb;
        kv[l] = (struct kern_kv){dt, Hkv, d, tpp, n[l], pages[l], half};
    }
    uint8_t *dbase, *back = malloc(pb * P);
    CK(cudaMalloc((void **)&dbase, pb * P));
    CK(cudaMemcpy(dbase, host, pb * P, cudaMemcpyHostToDevice));
    struct kern_cuda_evict_job jobs[L] = {{0}}, *djobs;
    uint8_t *dtab = upload_evict_jobs(L, off, np, roff, rg.pages, S, Hkv, jobs);
    CK(cudaMalloc((void **)&djobs, sizeof(jobs)));
    for (int l = 0; l < L; l++)
        jobs[l].n_tokens = n[l], jobs[l].k = k[l];
    CK(cudaMemcpy(djobs, jobs, sizeof(jobs), cudaMemcpyHostToDevice));
    struct kern_cuda_evict ke = {
        .dtype = dt, .q_heads = H, .kv_heads = Hkv, .head_dim = d, .tokens_per_page = tpp, .w = w,
        .base = dbase, .v_offset_bytes = half, .ring_rows_per_page = rg.rows_per_page,
        .ring_heads_per_page = rg.heads_per_page, .ring_pages_per_head = rg.pages_per_head,
        .first = first, .n_q = nq, .gamma = gamma, .var_only = var_only, .pool = pool, .radius = radius,
    };
    /* bf16 runs with the blocks' clocks (bench-gpu's breakdown): the same results, and each
     * block's phases in order */
    unsigned long long *dpc = NULL, *pc = NULL;
    size_t pcb = sizeof(unsigned long long) * L * Hkv * KERN_EVICT_CLOCKS;
    if (dt == KERN_BF16) {
        CK(cudaMalloc((void **)&dpc, pcb));
        CK(cudaMemset(dpc, 0, pcb));
        ke.phase_clock = dpc;
    }
    int rc = kern_cuda_decode_evict(&ke, djobs, L, max_S, NULL);
    CK(cudaDeviceSynchronize());
    EXPECT(rc == 0, "decode evict rc %d", rc);
    if (dpc) {
        int ordered = 1, nsm = 0;
        CK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, 0));
        pc = malloc(pcb);
        CK(cudaMemcpy(pc, dpc, pcb, cudaMemcpyDeviceToHost));
        for (uint32_t b = 0; b < L * Hkv; b++) {
            const unsigned long long *c = pc + (size_t)b * KERN_EVICT_CLOCKS;
            for (int i = 1; i <= KERN_EVICT_PHASES; i++)
                ordered &= c[i] >= c[i - 1];
            ordered &= c[KERN_EVICT_PHASES] > 0 && c[KERN_EVICT_PHASES + 2] >= c[KERN_EVICT_PHASES + 1] &&
                       c[KERN_EVICT_PHASES + 1] > 0 && c[KERN_EVICT_PHASES + 3] < (unsigned long long)nsm;
        }
        EXPECT(ordered, "a block's phase clocks are missing or out of order, or its SM out of range");
        ke.phase_clock = NULL;
        cudaFree(dpc), free(pc);
    }
    CK(cudaMemcpy(back, dbase, pb * P, cudaMemcpyDeviceToHost));
    const char *name = dt == KERN_BF16 ? "bf16" : "f16";
    double worst = 0;
    int same_ev = 1, same_kv = 1, same_ring = 1;
    uint16_t *q = malloc((size_t)H * nq * row);
    for (int l = 0; l < L; l++) {
        for (uint32_t h = 0; h < H; h++) /* the window, oldest first, as the host reads the ring */
            for (uint32_t i = 0; i < nq; i++) {
                uint32_t pg;
                uint64_t o = shm_ring_at(&rg, w, (uint32_t)row, h, (first + i) % w, &pg);
                memcpy((uint8_t *)q + ((size_t)h * nq + i) * row, host + roff[l][pg] + o, row);
            }
        float *ref = malloc(sizeof(float) * Hkv * S[l]), *got = malloc(sizeof(float) * Hkv * S[l]);
        uint32_t *ev = malloc(sizeof(uint32_t) * Hkv * S[l] + 4), *keep = malloc(sizeof(uint32_t) * (k[l] + 1));
        struct kern_score_args a = {.q = q, .q_dtype = dt, .q_heads = H, .n_q = nq, .kv = &kv[l],
                                    .n_scored = S[l], .gamma = gamma, .var_only = var_only,
                                    .stats = KERN_STATS_FP32,
                                    .pool = (enum kern_pool)pool, .pool_kernel = 2 * radius + 1};
        struct kern_score_out ro = {.indicator = ref};
        kern_score_layer_ref(&a, &ro);
        CK(cudaMemcpy(got, jobs[l].ind, sizeof(float) * Hkv * S[l], cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(ev, jobs[l].evicted, sizeof(uint32_t) * Hkv * (S[l] - k[l]), cudaMemcpyDeviceToHost));
        double e = rel_err(ref, got, Hkv, S[l]);
        worst = e > worst ? e : worst;
        EXPECT(e <= 1e-3, "%s layer %d (S %u, k %u): indicator rel err %.3g", name, l, S[l], k[l], e);
        for (uint32_t g = 0; g < Hkv; g++) {
            kern_topk(got + (size_t)g * S[l], S[l], k[l], KERN_ORDER_POSITION, keep);
            for (uint32_t j = 0, i = 0, o = 0; j < S[l]; j++) { /* the complement, ascending */
                if (i < k[l] && keep[i] == j)
                    i++;
                else
                    same_ev &= ev[(size_t)g * (S[l] - k[l]) + o++] == j;
            }
            kern_compact_head(&kv[l], g, keep, k[l], S[l], w, NULL);
            for (uint32_t t = 0; t < k[l] + w; t++) {
                size_t o = (size_t)((uint8_t *)kern_kv_key(&kv[l], g, t) - host);
                same_kv &= !memcmp(back + o, host + o, row) && !memcmp(back + o + half, host + o + half, row);
            }
        }
        for (uint32_t i = 0; i < rg.pages; i++)
            same_ring &= !memcmp(back + roff[l][i], host + roff[l][i], pb);
        free(ref), free(got), free(ev), free(keep);
    }
    EXPECT(same_ev, "%s H %u Hkv %u d %u w %u nq %u: evicted slots differ from the CPU top-k's", name, H, Hkv, d, w, nq);
    EXPECT(same_kv, "%s H %u Hkv %u d %u w %u nq %u: compacted bytes differ", name, H, Hkv, d, w, nq);
    EXPECT(same_ring, "%s: a ring changed", name);
    printf("%-5s H=%u Hkv=%u d=%u w=%u nq=%u tpp=%u pool %d/%u gamma %g%s, %d layers in one launch: "
           "indicator rel %.2e, evicted %s, compaction %s\n", name, H, Hkv, d, w, nq, tpp, pool, radius,
           gamma, var_only ? " (variance alone)" : "", L, worst, same_ev ? "equal" : "DIFFER", same_kv ? "equal" : "DIFFERS");
    /* what the one launch does not take */
    struct kern_cuda_evict bad = ke;
    bad.pool = KERN_POOL_MAX;
    EXPECT(kern_cuda_decode_evict_check(&bad, max_S) == (H > Hkv ? -ENOTSUP : 0), "max pooling over a group");
    bad = ke, bad.head_dim = 48;
    EXPECT(kern_cuda_decode_evict_check(&bad, max_S) == -ENOTSUP, "head_dim 48");
    bad = ke, bad.q_heads = 33 * Hkv, bad.pool = KERN_POOL_AVG, bad.radius = 2; /* 33 heads of at
                                               least 8 padded rows a kv head: past the 256 rows */
    EXPECT(kern_cuda_decode_evict_check(&bad, max_S) == -ENOTSUP, "too many rows a kv head");
    bad = ke, bad.n_q = w + 1;
    EXPECT(kern_cuda_decode_evict_check(&bad, max_S) == -EINVAL, "more rows than the window");
    EXPECT(kern_cuda_decode_evict_check(&ke, 1u << 20) == -ENOTSUP, "a prefix beyond shared memory");
    for (int l = 0; l < L; l++)
        free(off[l]), free(roff[l]), free(pages[l]);
    cudaFree(dbase), cudaFree(dtab), cudaFree(djobs);
    free(host), free(back), free(perm), free(q);
}

/* Decode steps of one-launch evictions carrying the window rows' log-sum-exps (the job's lse
 * and carry): three layers, each step one new token (random K/V in its next slot) and one new
 * query row in the ring (the oldest row's slot), the launch evicting one token a head - four
 * in layer 2 at step 5, seven eighths of layer 1's prefix at step 8 (where the evicted keys
 * held more than half a row's weight, the kernel writes NaN and the next step recomputes).
 * Every step checks what run_decode_evict does (the indicator within 1e-3 of the double
 * reference over the cache the step found, the removed slots the CPU top-k's complement,
 * the compacted bytes) and each written log-sum-exp within 1e-4 of the double one over the
 * cache the step left (host_lse), or NaN exactly where that weight passed a half - and every
 * row NaN in layer 0 at step 9, which keeps all its slots (k = S: nothing to do). Step 3
 * first sets one older row's value of layer 0's second kv head to NaN (that head runs both
 * passes, still right); the last step adds 3 to one older row's value of layer 0's first
 * q head and that kv head's indicator must move (the carried values are what it read).
 *
 * With `fill` the steps also fill their holes (the job's order): layers 0 and 1 start with
 * their prefixes' slots shuffled (all of layer 0's, the first three quarters of layer 1's:
 * the order's later entries are the slots themselves), layer 2 in position order (order_n
 * 0). Then the indicator is in position order, checked against the double reference over
 * the layer put in position order; the removed slots are those of the ranks the CPU's top-k
 * of it drops; the bytes are the CPU's fill (the holes below k, ascending, take the kept
 * slots from k on, ascending; the window moves down to k) and the order the launch writes
 * is the kept tokens' slots after it, in position order.
 *
 * With `given` every step after the first also hands the launch the newest row's
 * log-sum-exps (the job's lse_new: the double ones over the cache the step finds, as an
 * engine's decode attention gives them), so no pass runs for that row; the last step adds 3
 * to layer 0's first q head's newest value instead of an older one's. */
static void *val_at(const struct kern_kv *kv, uint32_t g, uint32_t t)
{
    return (uint8_t *)kern_kv_key(kv, g, t) + kv->v_offset_bytes;
}

static void fill_model(const struct kern_kv *kv, uint32_t g, const uint32_t *ev, uint32_t m,
                       uint32_t S, uint32_t w, const uint32_t *ord, uint32_t *ord_out, const uint32_t *keep)
{
    uint32_t k = S - m, *dst_of = malloc(sizeof(uint32_t) * (S + 1)), at = 0, src = k;
    size_t row = (size_t)kv->head_dim * 2;
    for (uint32_t j = 0; j < S; j++)
        dst_of[j] = j;
    while (at < m && ev[at] < k)
        at++;
    for (uint32_t h = 0; h < m && ev[h] < k; h++) {
        while (at < m && ev[at] == src)
            src++, at++;
        dst_of[src] = ev[h];
        memcpy(kern_kv_key(kv, g, ev[h]), kern_kv_key(kv, g, src), row);
        memcpy(val_at(kv, g, ev[h]), val_at(kv, g, src), row);
        src++;
    }
    for (uint32_t i = 0; i < w; i++) {
        memmove(kern_kv_key(kv, g, k + i), kern_kv_key(kv, g, S + i), row);
        memmove(val_at(kv, g, k + i), val_at(kv, g, S + i), row);
    }
    for (uint32_t i = 0; i < k; i++)
        ord_out[i] = dst_of[ord[keep[i]]];
    free(dst_of);
}

static void run_decode_evict_carry(enum kern_dtype dt, uint32_t H, uint32_t Hkv, uint32_t d,
                                   uint32_t w, uint32_t tpp, int fill, int given)
{
    if (!part("evict"))
        return;
    enum { L = 3, STEPS = 12 };
    size_t row = (size_t)d * 2, half = (size_t)Hkv * tpp * row, pb = 2 * half;
    struct shm_ring rg = shm_ring_geom(H, w, (uint32_t)row, pb);
    uint32_t n[L], np[L], P = 0, first = (uint32_t)(urand() * w), G = H / Hkv, n_max = 0;
    for (int l = 0; l < L; l++) {
        n[l] = 200 + (uint32_t)(urand() * 1300) + w;
        np[l] = (n[l] + STEPS + tpp - 1) / tpp, P += np[l] + rg.pages;
        n_max = n[l] + STEPS > n_max ? n[l] + STEPS : n_max;
    }
    uint32_t *perm = shuffled(P);
    uint8_t *host = malloc(pb * P), *back = malloc(pb * P);
    for (size_t i = 0; i < pb * P / 2; i++) {
        float f = (float)(2 * urand() - 1);
        kern_from_f32(dt, &f, host + 2 * i, 1);
    }
    uint64_t *off[L], *roff[L];
    void **pages[L], **bpages[L];
    for (uint32_t l = 0, at = 0; l < L; l++) {
        off[l] = malloc(sizeof(uint64_t) * np[l]), roff[l] = malloc(sizeof(uint64_t) * rg.pages);
        pages[l] = malloc(sizeof(void *) * np[l]), bpages[l] = malloc(sizeof(void *) * np[l]);
        for (uint32_t i = 0; i < np[l]; i++)
            off[l][i] = perm[at++] * pb, pages[l][i] = host + off[l][i], bpages[l][i] = back + off[l][i];
        for (uint32_t i = 0; i < rg.pages; i++)
            roff[l][i] = perm[at++] * pb;
    }
    /* fill: each layer's order [Hkv][cap] (rank -> slot) on the host and the device; layers
     * 0 and 1 start with (part of) their prefixes' rows shuffled */
    uint32_t cap = n_max, on[L] = {0}, *ordh = calloc((size_t)L * Hkv * cap, sizeof(uint32_t)), *dord = NULL;
    for (int l = 0; fill && l < L; l++) {
        uint32_t S = n[l] - w;
        on[l] = l == 0 ? S : l == 1 ? S * 3 / 4 : 0;
        struct kern_kv kv = {dt, Hkv, d, tpp, n[l], pages[l], half};
        uint8_t *tmp = malloc(2 * row * (on[l] + 1));
        for (uint32_t g = 0; g < Hkv; g++) {
            uint32_t *sh = shuffled(on[l]), *o = ordh + ((size_t)l * Hkv + g) * cap;
            for (uint32_t r = 0; r < on[l]; r++) /* position r's row to slot sh[r] */
                memcpy(tmp + 2 * row * sh[r], kern_kv_key(&kv, g, r), row),
                    memcpy(tmp + 2 * row * sh[r] + row, val_at(&kv, g, r), row), o[r] = sh[r];
            for (uint32_t t = 0; t < on[l]; t++)
                memcpy(kern_kv_key(&kv, g, t), tmp + 2 * row * t, row),
                    memcpy(val_at(&kv, g, t), tmp + 2 * row * t + row, row);
            free(sh);
        }
        free(tmp);
    }
    if (fill) {
        CK(cudaMalloc((void **)&dord, sizeof(uint32_t) * L * Hkv * cap));
        CK(cudaMemcpy(dord, ordh, sizeof(uint32_t) * L * Hkv * cap, cudaMemcpyHostToDevice));
    }
    uint8_t *dbase;
    float *dlse;
    size_t lseb = sizeof(float) * H * w;
    CK(cudaMalloc((void **)&dbase, pb * P));
    CK(cudaMalloc((void **)&dlse, lseb * L));
    CK(cudaMemset(dlse, 0, lseb * L)); /* finite garbage: step 0 does not carry */
    struct kern_cuda_evict_job jobs[L] = {{0}}, *djobs;
    uint8_t *dtab = upload_evict_jobs(L, off, np, roff, rg.pages, n, Hkv, jobs);
    CK(cudaMalloc((void **)&djobs, sizeof(jobs)));
    for (int l = 0; l < L; l++) {
        jobs[l].lse = dlse + (size_t)l * H * w;
        if (fill)
            jobs[l].order = dord + (size_t)l * Hkv * cap, jobs[l].order_cap = cap;
    }
    const char *name = dt == KERN_BF16 ? "bf16" : "f16";
    uint16_t *q = malloc((size_t)H * w * row);
    float *lse = malloc(lseb), *ref = malloc(sizeof(float) * Hkv * n_max);
    double worst_ind = 0, worst_lse = 0;
    int same_ev = 1, same_kv = 1, same_ord = 1, nan_ok = 1, moved = 1, nans = 0;
    uint8_t *pv = malloc(pb * (n_max / tpp + 2)); /* a layer in position order (fill) */
    void **pvp = malloc(sizeof(void *) * (n_max / tpp + 2));
    for (uint32_t i = 0; i < n_max / tpp + 2; i++)
        pvp[i] = pv + pb * i;
    uint32_t *nord = malloc(sizeof(uint32_t) * cap), *evs = malloc(sizeof(uint32_t) * cap);
    float *newest = malloc(sizeof(float) * L * H), *dnew;
    CK(cudaMalloc((void **)&dnew, sizeof(float) * L * H));
    for (int step = 0; step < STEPS; step++) {
        if (step) { /* a token: its K/V in each layer's next slot, its queries in the ring */
            for (int l = 0; l < L; l++) {
                struct kern_kv kv = {dt, Hkv, d, tpp, n[l] + 1, pages[l], half};
                for (uint32_t g = 0; g < Hkv; g++)
                    for (uint32_t x = 0; x < d; x++) {
                        float f = (float)(2 * urand() - 1), v = (float)(2 * urand() - 1);
                        kern_from_f32(dt, &f, (uint8_t *)kern_kv_key(&kv, g, n[l]) + 2 * x, 1);
                        kern_from_f32(dt, &v, (uint8_t *)kern_kv_key(&kv, g, n[l]) + half + 2 * x, 1);
                    }
                n[l]++;
                for (uint32_t h = 0; h < H; h++) {
                    uint32_t pg;
                    uint64_t o = shm_ring_at(&rg, w, (uint32_t)row, h, first, &pg);
                    for (uint32_t x = 0; x < d; x++) {
                        float f = (float)(2 * urand() - 1);
                        kern_from_f32(dt, &f, host + roff[l][pg] + o + 2 * x, 1);
                    }
                }
            }
            first = (first + 1) % w;
        }
        CK(cudaMemcpy(dbase, host, pb * P, cudaMemcpyHostToDevice));
        uint32_t k[L];
        for (int l = 0; l < L; l++) {
            uint32_t S = n[l] - w;
            k[l] = l == 2 && step == 5 ? S - 4 : l == 1 && step == 8 ? S / 8 : l == 0 && step == 9 ? S : S - 1;
            jobs[l].n_tokens = n[l], jobs[l].k = k[l], jobs[l].carry = step > 0, jobs[l].order_n = on[l];
        }
        if (step == 3) { /* layer 0, kv head 1's first q head, its second-oldest row: NaN */
            float nan = NAN;
            CK(cudaMemcpy(dlse + (size_t)G * w + (first + 1) % w, &nan, sizeof nan, cudaMemcpyHostToDevice));
        }
        int poke = step == STEPS - 1; /* layer 0, q head 0, its oldest row (newest, given): 3 more */
        for (int l = 0; given && step && l < L; l++) { /* the newest row's, over the cache now */
            struct kern_kv kv = {dt, Hkv, d, tpp, n[l], pages[l], half};
            for (uint32_t h = 0; h < H; h++)
                for (uint32_t i = 0; i < w; i++) {
                    uint32_t pg;
                    uint64_t o = shm_ring_at(&rg, w, (uint32_t)row, h, (first + i) % w, &pg);
                    memcpy((uint8_t *)q + ((size_t)h * w + i) * row, host + roff[l][pg] + o, row);
                }
            float *now = host_lse(&kv, q, dt, H, w);
            for (uint32_t h = 0; h < H; h++)
                newest[(size_t)l * H + h] = now[h * w + w - 1] + (poke && l == 0 && h == 0 ? 3.0f : 0.0f);
            free(now);
            jobs[l].lse_new = dnew + (size_t)l * H;
        }
        if (given && step)
            CK(cudaMemcpy(dnew, newest, sizeof(float) * L * H, cudaMemcpyHostToDevice));
        if (poke && !given) {
            float v;
            CK(cudaMemcpy(&v, dlse + first, sizeof v, cudaMemcpyDeviceToHost));
            v += 3.0f;
            CK(cudaMemcpy(dlse + first, &v, sizeof v, cudaMemcpyHostToDevice));
        }
        CK(cudaMemcpy(djobs, jobs, sizeof(jobs), cudaMemcpyHostToDevice));
        struct kern_cuda_evict ke = {
            .dtype = dt, .q_heads = H, .kv_heads = Hkv, .head_dim = d, .tokens_per_page = tpp, .w = w,
            .base = dbase, .v_offset_bytes = half, .ring_rows_per_page = rg.rows_per_page,
            .ring_heads_per_page = rg.heads_per_page, .ring_pages_per_head = rg.pages_per_head,
            .first = first, .n_q = w, .gamma = 200.0f, .pool = KERN_POOL_AVG, .radius = 2,
        };
        uint32_t max_S = 0;
        for (int l = 0; l < L; l++)
            max_S = n[l] - w > max_S ? n[l] - w : max_S;
        int rc = kern_cuda_decode_evict(&ke, djobs, L, max_S, NULL);
        CK(cudaDeviceSynchronize());
        EXPECT(rc == 0, "%s carry step %d: rc %d", name, step, rc);
        CK(cudaMemcpy(back, dbase, pb * P, cudaMemcpyDeviceToHost));
        for (int l = 0; l < L; l++) {
            uint32_t S = n[l] - w;
            struct kern_kv kv = {dt, Hkv, d, tpp, n[l], pages[l], half}, pk = kv;
            uint32_t *ol = ordh + (size_t)l * Hkv * cap;
            if (fill) { /* the reference reads the layer in position order */
                pk.pages = pvp;
                for (uint32_t g = 0; g < Hkv; g++)
                    for (uint32_t t = 0; t < n[l]; t++) {
                        uint32_t from = t < on[l] ? ol[(size_t)g * cap + t] : t;
                        memcpy(kern_kv_key(&pk, g, t), kern_kv_key(&kv, g, from), row);
                    }
            }
            for (uint32_t h = 0; h < H; h++)
                for (uint32_t i = 0; i < w; i++) {
                    uint32_t pg;
                    uint64_t o = shm_ring_at(&rg, w, (uint32_t)row, h, (first + i) % w, &pg);
                    memcpy((uint8_t *)q + ((size_t)h * w + i) * row, host + roff[l][pg] + o, row);
                }
            float *got = malloc(sizeof(float) * Hkv * S);
            uint32_t *ev = malloc(sizeof(uint32_t) * Hkv * S + 4), *keep = malloc(sizeof(uint32_t) * (k[l] + 1));
            struct kern_score_args a = {.q = q, .q_dtype = dt, .q_heads = H, .n_q = w, .kv = &pk,
                                        .n_scored = S, .gamma = 200.0f, .stats = KERN_STATS_FP32,
                                        .pool = KERN_POOL_AVG, .pool_kernel = 5};
            struct kern_score_out ro = {.indicator = ref};
            kern_score_layer_ref(&a, &ro);
            CK(cudaMemcpy(got, jobs[l].ind, sizeof(float) * Hkv * S, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(ev, jobs[l].evicted, sizeof(uint32_t) * Hkv * (S - k[l]), cudaMemcpyDeviceToHost));
            for (uint32_t g = 0; g < Hkv; g++) {
                double e = rel_err(ref + (size_t)g * S, got + (size_t)g * S, 1, S);
                if (k[l] == S) /* nothing to do: no indicator, no slot removed */
                    e = 0;
                if (poke && l == 0 && g == 0)
                    moved = e > 1e-3;
                else
                    worst_ind = e > worst_ind ? e : worst_ind;
                kern_topk(got + (size_t)g * S, S, k[l], KERN_ORDER_POSITION, keep);
                uint32_t m = S - k[l], *og = ol + (size_t)g * cap;
                for (uint32_t j = 0, i = 0, o = 0; j < S; j++) { /* the dropped ranks' slots */
                    if (i < k[l] && keep[i] == j)
                        i++;
                    else
                        evs[o++] = fill && j < on[l] ? og[j] : j;
                }
                if (fill) /* ascending */
                    qsort(evs, m, sizeof(uint32_t), u32_cmp);
                for (uint32_t o = 0; o < m; o++)
                    same_ev &= ev[(size_t)g * m + o] == evs[o];
                if (!fill) {
                    kern_compact_head(&kv, g, keep, k[l], S, w, NULL);
                    continue;
                }
                for (uint32_t r = on[l]; r < S; r++) /* the order in full */
                    og[r] = r;
                if (m) {
                    fill_model(&kv, g, evs, m, S, w, og, nord, keep);
                    uint32_t *dv = malloc(sizeof(uint32_t) * (k[l] + 1));
                    CK(cudaMemcpy(dv, jobs[l].order + (size_t)g * cap, sizeof(uint32_t) * k[l], cudaMemcpyDeviceToHost));
                    same_ord &= !memcmp(dv, nord, sizeof(uint32_t) * k[l]);
                    memcpy(og, nord, sizeof(uint32_t) * k[l]);
                    free(dv);
                }
            }
            if (fill && k[l] < S)
                on[l] = k[l];
            for (uint32_t g = 0; g < Hkv; g++)
                for (uint32_t t = 0; t < k[l] + w; t++) {
                    size_t o = (size_t)((uint8_t *)kern_kv_key(&kv, g, t) - host);
                    same_kv &= !memcmp(back + o, host + o, row) && !memcmp(back + o + half, host + o + half, row);
                }
            /* the log-sum-exps over the cache left (the compaction's bytes, checked equal) */
            uint32_t nl = k[l] + w;
            struct kern_kv left = {dt, Hkv, d, tpp, nl, bpages[l], half}, before = kv;
            float *want = host_lse(&left, q, dt, H, w), *was = host_lse(&before, q, dt, H, w);
            CK(cudaMemcpy(lse, jobs[l].lse, lseb, cudaMemcpyDeviceToHost));
            for (uint32_t h = 0; h < H; h++)
                for (uint32_t i = 0; i < w; i++) {
                    float v = lse[h * w + (first + i) % w], x = want[h * w + i];
                    double gone = 1 - exp((double)x - was[h * w + i]); /* the evicted weight */
                    if (poke && l == 0 && h == 0 && i == (given ? w - 1 : 0))
                        continue;
                    if (k[l] == S) { /* nothing done: no row's value known */
                        nan_ok &= isnan(v);
                        continue;
                    }
                    if (isnan(v)) {
                        nans++;
                        nan_ok &= gone > 0.5 - 1e-3;
                    } else {
                        nan_ok &= gone < 0.5 + 1e-3;
                        double e = fabs((double)v - x);
                        worst_lse = e > worst_lse ? e : worst_lse;
                    }
                }
            free(want), free(was), free(got), free(ev), free(keep);
            n[l] = nl;
        }
        memcpy(host, back, pb * P);
    }
    EXPECT(worst_ind <= 1e-3, "%s carry: indicator rel err %.3g", name, worst_ind);
    EXPECT(worst_lse <= 1e-4, "%s carry: log-sum-exp err %.3g", name, worst_lse);
    EXPECT(same_ev, "%s carry: evicted slots differ from the CPU top-k's", name);
    EXPECT(same_kv, "%s carry: compacted bytes differ", name);
    EXPECT(nan_ok && nans, "%s carry: NaN not where the evicted weight passed a half (%d NaN)", name, nans);
    EXPECT(moved, "%s carry: a carried value changed, the indicator did not (not read?)", name);
    EXPECT(same_ord, "%s carry, holes filled: the order written differs from the CPU's", name);
    printf("%-5s H=%u Hkv=%u d=%u w=%u tpp=%u, %d layers x %d decode steps carrying the rows' "
           "log-sum-exps%s%s: indicator rel %.2e, log-sum-exp err %.2e (%d NaN where over half the "
           "weight went), evicted %s, compaction %s%s, a %s value %s\n", name, H, Hkv, d, w, tpp,
           L, STEPS, given ? ", the newest given" : "", fill ? ", filling holes" : "", worst_ind, worst_lse, nans, same_ev ? "equal" : "DIFFER",
           same_kv ? "equal" : "DIFFERS", fill ? (same_ord ? ", order equal" : ", order DIFFERS") : "",
           given ? "given" : "carried", moved ? "read" : "NOT READ");
    for (int l = 0; l < L; l++)
        free(off[l]), free(roff[l]), free(pages[l]), free(bpages[l]);
    cudaFree(dbase), cudaFree(dtab), cudaFree(djobs), cudaFree(dlse), cudaFree(dord);
    free(host), free(back), free(perm), free(q), free(lse), free(ref);
    free(ordh), free(pv), free(pvp), free(nord), free(evs), free(newest);
    cudaFree(dnew);
}

/* A cascading stage's compactions in one pass (kern_cuda_compact_many) against the CPU: nine
 * layers of one layout over pages scattered through one pool, prefixes from 40 to ~40,000
 * slots (the longest walks the block's list many times), keeps of none, all and some,
 * windows of 0 to 40; indicators with ties (quantized) and a NaN or two; two layers with the
 * host's own slots (Ada-KV's per-head choice, not a top-k; `fill` asked and ignored) and one
 * whose slots are a shuffle of all of them (k = old: a prefill's end restoring order). The
 * top-k layers fill their holes (`fill`: the long one among them) but layer 2, which keeps
 * order. Each head's keep must be kern_topk's kept slots in ascending order (or the host's),
 * or for a fill job the holes-filled map built from them (fill_map), the first k + win
 * slots the bytes kern_compact_head leaves with that keep, the indicator [kv_heads][k]
 * kern_gather_f32's by it, and the slots past them untouched. Every layer's positions
 * (random, at a stride beyond its prefix; layer 3's not yet written: slot i's is i) follow
 * keep, the rest of each row untouched, and land packed where asked (layers 0, 4, 7, 8). The
 * last two are order jobs (k = old, positions
 * distinct below a span and shuffled): keep must sort the prefix by position, n_sorted be
 * k - except layer 8's head 0, given a position twice, which must count fewer and move
 * nothing. With `split`, kern_cuda_compact_split takes the long row's top-k first (layer 0,
 * where clusters run: a compute capability 9.0 device). */
static void fill_map(const uint32_t *asc, uint32_t k, uint32_t *map)
{
    uint32_t c = 0, rank = 0, at = 0;
    while (c < k && asc[c] < k)
        c++;
    for (uint32_t h = 0; h < k; h++) {
        if (at < c && asc[at] == h)
            map[h] = h, at++;
        else
            map[h] = asc[c + rank++];
    }
}

/* The slots of pos[0..k) by ascending position (distinct). */
static void order_of(const uint32_t *pos, uint32_t k, uint32_t *keep)
{
    for (uint32_t i = 0; i < k; i++)
        keep[i] = i;
    for (uint32_t i = 1; i < k; i++) /* insertion sort: k is at most a few thousand */
        for (uint32_t j = i; j > 0 && pos[keep[j - 1]] > pos[keep[j]]; j--) {
            uint32_t t = keep[j];
            keep[j] = keep[j - 1], keep[j - 1] = t;
        }
}

static void run_compact_many(enum kern_dtype dt, uint32_t Hkv, uint32_t d, uint32_t tpp, int split)
{
    if (!part("compact"))
        return;
    enum { L = 9, ORDER = 7 };
    size_t row = (size_t)d * 2, half = (size_t)Hkv * tpp * row, pb = 2 * half;
    uint32_t old[L], k[L], win[L], np[L], P = 0, max_rows = 0;
    for (int l = 0; l < L; l++) {
        old[l] = l == 0 ? 30000 + (uint32_t)(urand() * 10000) : 40 + (uint32_t)(urand() * 3000);
        k[l] = l == 1 ? 0 : l == 2 || l >= 6 ? old[l] : (uint32_t)(urand() * old[l]);
        win[l] = l == 3 ? 0 : (uint32_t)(urand() * 41);
        np[l] = (old[l] + win[l] + tpp - 1) / tpp, P += np[l];
        max_rows = k[l] + win[l] > max_rows ? k[l] + win[l] : max_rows;
    }
    uint32_t *perm = shuffled(P);
    uint8_t *host = malloc(pb * P), *back = malloc(pb * P);
    for (size_t i = 0; i < pb * P / 2; i++) {
        float f = (float)(2 * urand() - 1);
        kern_from_f32(dt, &f, host + 2 * i, 1);
    }
    uint64_t *off[L];
    void **pages[L];
    float *ind[L];
    uint32_t *slots[L], *pos[L], stride[L], span[L];
    struct kern_kv kv[L];
    for (uint32_t l = 0, at = 0; l < L; l++) {
        off[l] = malloc(sizeof(uint64_t) * np[l]), pages[l] = malloc(sizeof(void *) * np[l]);
        for (uint32_t i = 0; i < np[l]; i++)
            off[l][i] = perm[at++] * pb, pages[l][i] = host + off[l][i];
        kv[l] = (struct kern_kv){dt, Hkv, d, tpp, old[l] + win[l], pages[l], half};
        ind[l] = malloc(sizeof(float) * Hkv * old[l] + 4);
        int levels = l % 2 ? 50 : 1 << 20; /* many ties, or few */
        for (size_t i = 0; i < (size_t)Hkv * old[l]; i++)
            ind[l][i] = (float)(floor(urand() * levels) / levels);
        ind[l][(size_t)(urand() * Hkv * old[l])] = NAN;
        stride[l] = old[l] + (uint32_t)(urand() * 100), span[l] = l >= ORDER ? old[l] + 1 + (uint32_t)(urand() * 3000) : 0;
        pos[l] = malloc(sizeof(uint32_t) * Hkv * stride[l]);
        for (uint32_t g = 0; g < Hkv; g++) {
            uint32_t *pg = pos[l] + (size_t)g * stride[l];
            for (uint32_t j = 0; j < stride[l]; j++)
                pg[j] = (uint32_t)(urand() * 4e9);
            if (l >= ORDER) { /* k distinct positions below the span, shuffled */
                uint32_t *sh = shuffled(span[l]);
                memcpy(pg, sh, sizeof(uint32_t) * k[l]);
                free(sh);
                if (l == ORDER + 1 && g == 0 && k[l] > 1)
                    pg[k[l] - 1] = pg[0]; /* a position twice: not sound */
            }
        }
        slots[l] = NULL;
        if (l == 6) { /* a permutation of every slot (a prefill's end restoring position order) */
            slots[l] = malloc(sizeof(uint32_t) * Hkv * k[l]);
            for (uint32_t g = 0; g < Hkv; g++) {
                uint32_t *sh = shuffled(k[l]);
                memcpy(slots[l] + (size_t)g * k[l], sh, sizeof(uint32_t) * k[l]);
                free(sh);
            }
        } else if (l >= 4 && l < ORDER && k[l]) { /* the host's choice: any k of the first old, ascending */
            slots[l] = malloc(sizeof(uint32_t) * Hkv * k[l]);
            for (uint32_t g = 0; g < Hkv; g++) {
                uint32_t *sp = slots[l] + (size_t)g * k[l], need = k[l];
                for (uint32_t j = 0; j < old[l] && need; j++)
                    if (urand() * (old[l] - j) < need)
                        sp[k[l] - need--] = j;
            }
        }
    }
    uint8_t *dbase, *dtab;
    CK(cudaMalloc((void **)&dbase, pb * P));
    CK(cudaMemcpy(dbase, host, pb * P, cudaMemcpyHostToDevice));
    size_t tab = 0;
    for (int l = 0; l < L; l++)
        tab += 16 * 9 + sizeof(uint64_t) * np[l] + sizeof(float) * Hkv * old[l] + sizeof(uint32_t) * Hkv * k[l] +
               2 * sizeof(uint32_t) * Hkv * k[l] + kern_cuda_compact_many_tmp(Hkv, d, k[l], win[l], span[l]) +
               sizeof(uint32_t) * Hkv * stride[l] + sizeof(uint32_t) * Hkv;
    CK(cudaMalloc((void **)&dtab, tab));
    struct kern_cuda_compact_job jobs[L], *djobs;
    CK(cudaMalloc((void **)&djobs, sizeof(jobs)));
    size_t at = 0;
#define TAKE(b) (at = (at + 15) & ~(size_t)15, at += (b), dtab + at - (b))
    for (int l = 0; l < L; l++) {
        jobs[l] = (struct kern_cuda_compact_job){.old = old[l], .k = k[l], .win = win[l],
                                                 .fill = l != 2 && l < ORDER, .pos_stride = stride[l],
                                                 .pos_init = l == 3, .order = l >= ORDER, .pos_span = span[l]};
        jobs[l].pos = (uint32_t *)TAKE(sizeof(uint32_t) * Hkv * stride[l]);
        CK(cudaMemcpy(jobs[l].pos, pos[l], sizeof(uint32_t) * Hkv * stride[l], cudaMemcpyHostToDevice));
        if (l >= ORDER)
            jobs[l].n_sorted = (uint32_t *)TAKE(sizeof(uint32_t) * Hkv);
        if (l >= ORDER || l == 0 || l == 4) /* the new positions packed too */
            jobs[l].pos_out = (uint32_t *)TAKE(sizeof(uint32_t) * Hkv * k[l]);
        uint8_t *x = TAKE(sizeof(uint64_t) * np[l]);
        CK(cudaMemcpy(x, off[l], sizeof(uint64_t) * np[l], cudaMemcpyHostToDevice));
        jobs[l].page_off = (const uint64_t *)x;
        jobs[l].ind = (float *)TAKE(sizeof(float) * Hkv * old[l]);
        CK(cudaMemcpy(jobs[l].ind, ind[l], sizeof(float) * Hkv * old[l], cudaMemcpyHostToDevice));
        if (slots[l]) {
            x = TAKE(sizeof(uint32_t) * Hkv * k[l]);
            CK(cudaMemcpy(x, slots[l], sizeof(uint32_t) * Hkv * k[l], cudaMemcpyHostToDevice));
            jobs[l].slots = (const uint32_t *)x;
        }
        jobs[l].keep = (uint32_t *)TAKE(sizeof(uint32_t) * Hkv * k[l]);
        jobs[l].tmp = TAKE(kern_cuda_compact_many_tmp(Hkv, d, k[l], win[l], span[l]));
    }
#undef TAKE
    /* split: the long top-k rows taken first, as caked's stages do (layer 0 alone is long) */
    int taken = split ? kern_cuda_compact_split(jobs, L, Hkv, NULL) : 0;
    if (split) {
        int dev = 0, major = 0;
        CK(cudaGetDevice(&dev));
        CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
        int on = kern_cuda_topk_set_cluster(1); /* the setting, read and put back as it was */
        kern_cuda_topk_set_cluster(on);
        int clusters = major >= 9 && on;
        EXPECT(taken == (clusters && k[0] > 0 && k[0] < old[0]), "the split took %d jobs", taken);
    }
    CK(cudaMemcpy(djobs, jobs, sizeof(jobs), cudaMemcpyHostToDevice));
    struct kern_cuda_layout lay = {.dtype = dt, .kv_heads = Hkv, .head_dim = d,
                                   .tokens_per_page = tpp, .base = dbase, .v_offset_bytes = half};
    int rc = kern_cuda_compact_many(&lay, djobs, L, max_rows, NULL);
    CK(cudaDeviceSynchronize());
    EXPECT(rc == 0, "compact many rc %d", rc);
    CK(cudaMemcpy(back, dbase, pb * P, cudaMemcpyDeviceToHost));
    int same_keep = 1, same_kv = 1, same_ind = 1, rest = 1, same_pos = 1, counted = 1;
    for (int l = 0; l < L; l++) {
        uint32_t *pos_got = malloc(sizeof(uint32_t) * Hkv * stride[l]), n_sorted[64] = {0};
        uint32_t *packed = malloc(sizeof(uint32_t) * Hkv * k[l] + 4);
        CK(cudaMemcpy(pos_got, jobs[l].pos, sizeof(uint32_t) * Hkv * stride[l], cudaMemcpyDeviceToHost));
        if (jobs[l].pos_out)
            CK(cudaMemcpy(packed, jobs[l].pos_out, sizeof(uint32_t) * Hkv * k[l], cudaMemcpyDeviceToHost));
        if (jobs[l].n_sorted)
            CK(cudaMemcpy(n_sorted, jobs[l].n_sorted, sizeof(uint32_t) * Hkv, cudaMemcpyDeviceToHost));
        uint32_t *got = malloc(sizeof(uint32_t) * Hkv * k[l] + 4), *keep = malloc(sizeof(uint32_t) * k[l] + 4);
        uint32_t *asc = malloc(sizeof(uint32_t) * k[l] + 4);
        uint8_t *scr = malloc(2 * row * k[l] + 16);
        float *gi = malloc(sizeof(float) * Hkv * k[l] + 4), *ci = malloc(sizeof(float) * k[l] + 4);
        CK(cudaMemcpy(got, jobs[l].keep, sizeof(uint32_t) * Hkv * k[l], cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(gi, jobs[l].ind, sizeof(float) * Hkv * k[l], cudaMemcpyDeviceToHost));
        for (uint32_t g = 0; g < Hkv; g++) {
            const uint32_t *p0 = pos[l] + (size_t)g * stride[l], *p1 = pos_got + (size_t)g * stride[l];
            int sound = !(l == ORDER + 1 && g == 0 && k[l] > 1);
            if (jobs[l].order) {
                if (sound)
                    order_of(p0, k[l], keep);
                else
                    for (uint32_t i = 0; i < k[l]; i++)
                        keep[i] = i;
                counted &= sound ? n_sorted[g] == k[l] : n_sorted[g] < k[l];
            } else if (slots[l])
                memcpy(keep, slots[l] + (size_t)g * k[l], sizeof(uint32_t) * k[l]);
            else if (!jobs[l].fill)
                kern_topk(ind[l] + (size_t)g * old[l], old[l], k[l], KERN_ORDER_POSITION, keep);
            else
                kern_topk(ind[l] + (size_t)g * old[l], old[l], k[l], KERN_ORDER_POSITION, asc),
                fill_map(asc, k[l], keep);
            same_keep &= !memcmp(keep, got + (size_t)g * k[l], sizeof(uint32_t) * k[l]);
            for (uint32_t i = 0; i < stride[l]; i++) /* the positions follow; the rest stays */
                same_pos &= p1[i] == (i >= k[l] ? p0[i] : jobs[l].pos_init ? keep[i] : p0[keep[i]]);
            if (jobs[l].pos_out) /* and land packed */
                same_pos &= !memcmp(packed + (size_t)g * k[l], p1, sizeof(uint32_t) * k[l]);
            kern_gather_f32(ind[l] + (size_t)g * old[l], keep, k[l], ci);
            same_ind &= !memcmp(ci, gi + (size_t)g * k[l], sizeof(float) * k[l]);
            EXPECT(kern_compact_head(&kv[l], g, keep, k[l], old[l], win[l], scr) == 0, "the CPU's compaction");
            for (uint32_t t = 0; t < old[l] + win[l]; t++) {
                size_t o = (size_t)((uint8_t *)kern_kv_key(&kv[l], g, t) - host);
                int eq = !memcmp(back + o, host + o, row) && !memcmp(back + o + half, host + o + half, row);
                if (t < k[l] + win[l])
                    same_kv &= eq;
                else
                    rest &= eq; /* kern_compact_head leaves them too */
            }
        }
        free(got), free(keep), free(gi), free(ci), free(asc), free(scr), free(pos_got), free(packed);
    }
    const char *name = dt == KERN_BF16 ? "bf16" : "f16";
    EXPECT(same_keep, "%s Hkv %u d %u tpp %u: kept slots differ from kern_topk's", name, Hkv, d, tpp);
    EXPECT(same_ind, "%s Hkv %u d %u tpp %u: the gathered indicator differs", name, Hkv, d, tpp);
    EXPECT(same_kv, "%s Hkv %u d %u tpp %u: compacted bytes differ", name, Hkv, d, tpp);
    EXPECT(rest, "%s Hkv %u d %u tpp %u: slots past the kept ones changed", name, Hkv, d, tpp);
    EXPECT(same_pos, "%s Hkv %u d %u tpp %u: the positions did not follow the tokens", name, Hkv, d, tpp);
    EXPECT(counted, "%s Hkv %u d %u tpp %u: an order job's distinct positions miscounted", name, Hkv, d, tpp);
    lay.head_dim = 4; /* rows of 8 bytes: not whole 16-byte pieces */
    EXPECT(kern_cuda_compact_many(&lay, djobs, L, max_rows, NULL) == -EINVAL, "head_dim 4 taken");
    printf("%-5s Hkv=%u d=%u tpp=%u, %d layers (prefixes up to %u; 2 put in position order) in "
           "one pass%s: kept slots %s, positions %s, indicator %s, compaction %s\n", name,
           Hkv, d, tpp, L, old[0], !split ? "" : taken ? ", the long row's top-k split first"
           : ", nothing split (no clusters here)", same_keep ? "equal" : "DIFFER",
           same_pos && counted ? "equal" : "DIFFER", same_ind ? "equal" : "DIFFERS",
           same_kv && rest ? "equal" : "DIFFERS");
    for (int l = 0; l < L; l++)
        free(off[l]), free(pages[l]), free(ind[l]), free(slots[l]), free(pos[l]);
    cudaFree(dbase), cudaFree(dtab), cudaFree(djobs);
    free(host), free(back), free(perm);
}

int main(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    setvbuf(stdout, NULL, _IOLBF, 0); /* a run cut by a timeout still shows how far it got */
    rs = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull | 1;
    printf("seed %llu\n", (unsigned long long)rs);
    const char *only = getenv("CAKE_GPU_TEST_ONLY");
    if (only && *only) {
        if (!parts_known(only)) {
            fprintf(stderr, "CAKE_GPU_TEST_ONLY=%s: parts are topk, score, attn, ring, evict, compact\n", only);
            return 2;
        }
        printf("CAKE_GPU_TEST_ONLY=%s: the other parts are skipped\n", only);
    }
    enum kern_dtype ts[2] = {KERN_BF16, KERN_F16};
    if (getenv("CAKE_GPU_TEST_QUICK")) { /* one scoring case a dtype, the one-launch eviction
                                             and the one-pass compaction (a check on a short
                                             device lease; ctest runs all) */
        printf("CAKE_GPU_TEST_QUICK: a subset\n");
        run_topk_many();
        for (int i = 0; i < 2; i++) {
            run_case(ts[i], 32, 8, 128, 3000 + (uint32_t)(urand() * 1000), 32, 16, 992);
            q_amp = 4.0; /* pass 1 raises its bases mid-chunk (wgmma's lazy base too) */
            run_case(ts[i], 32, 8, 128, 3000 + (uint32_t)(urand() * 1000), 32, 16, 300);
            q_amp = 1.0;
            run_case(ts[i], 32, 8, 128, 3000 + (uint32_t)(urand() * 1000), 32, 64, 500); /* 64-row boxes */
            page_pad = 16; /* pages 16 bytes apart: both passes copy by cp.async, not TMA */
            run_case(ts[i], 32, 8, 128, 2000 + (uint32_t)(urand() * 1000), 32, 16, 300);
            page_pad = 0;
            run_decode_evict(ts[i], 32, 8, 128, 32, 32, 16, KERN_POOL_AVG, 2, 200.0f, 0);
            run_decode_evict(ts[i], 4, 4, 128, 8, 8, 5, KERN_POOL_MAX, 3, 200.0f, 0);
            run_decode_evict(ts[i], 8, 2, 64, 16, 16, 16, KERN_POOL_AVG, 2, 200.0f, 1);
            run_decode_evict_carry(ts[i], 8, 2, 128, 32, 16, 0, 0);
            run_decode_evict_carry(ts[i], 6, 2, 64, 16, 7, 0, 0);
            run_decode_evict_carry(ts[i], 8, 2, 128, 32, 16, 1, 1);
            run_decode_evict_carry(ts[i], 6, 2, 64, 16, 7, 1, 0);
            kern_cuda_score_set_wgmma(0); /* passes 1 and 2 on mma.sync where wgmma takes them */
            run_decode_evict(ts[i], 32, 8, 128, 32, 32, 16, KERN_POOL_AVG, 2, 200.0f, 0);
            run_decode_evict_carry(ts[i], 8, 2, 128, 32, 16, 1, 1);
            kern_cuda_score_set_wgmma(1);
            run_attention(ts[i], 1, 32, 8, 128, 16);
            run_attention(ts[i], 1, 9, 3, 64, 85); /* SmolLM2's heads, pages of 85 tokens */
            run_compact_many(ts[i], 8, 128, 16, 0);
            run_compact_many(ts[i], 8, 128, 16, 1);
            run_compact_many(ts[i], 3, 64, 85, 1);
            run_compact_many(ts[i], 1, 8, 7, 0);
            run_compact_many(ts[i], 2, 256, 4, 0);
        }
        printf("%s\n", failures ? "FAILED" : "the subset passed");
        return failures ? 1 : 0;
    }
    for (int i = 0; i < 2; i++) {
        run_case(ts[i], 8, 2, 64, 3000 + (uint32_t)(urand() * 1000), 16, 3000 + 1000, 200);
        run_case(ts[i], 32, 8, 128, 5000 + (uint32_t)(urand() * 3000), 32, 16, 992);
        run_case(ts[i], 4, 4, 16, 300, 8, 7, 50);      /* WMMA only: head_dim 16 */
        run_case(ts[i], 8, 8, 128, 1500 + (uint32_t)(urand() * 1000), 32, 7, 300);   /* G=1: one slice */
        run_case(ts[i], 32, 4, 128, 3000 + (uint32_t)(urand() * 1000), 32, 512, 500); /* G=8: eight */
        run_case(ts[i], 12, 2, 128, 2500 + (uint32_t)(urand() * 500), 24, 16, 400);  /* window 24, padded */
        run_case(ts[i], 4, 2, 64, 2000 + (uint32_t)(urand() * 500), 64, 33, 300);    /* a head over 2 slices */
        run_case(ts[i], 16, 2, 128, 1500 + (uint32_t)(urand() * 500), 4, 64, 200);   /* window 4: 4 heads a slice */
        run_case(ts[i], 1, 1, 64, 28, 8, 5, 10); /* short prompt: peaked attention, variance from cancellation */
        q_amp = 4.0; /* logits over a range of ~2^17: pass 1 raises its exponent bases mid-chunk (wgmma's lazily) */
        run_case(ts[i], 32, 8, 128, 3000 + (uint32_t)(urand() * 1000), 32, 16, 300);
        q_amp = 1.0;
        run_case(ts[i], 6, 2, 64, 700 + (uint32_t)(urand() * 300), 40, 16, 100);   /* window 40: a padded 2nd segment */
        run_case(ts[i], 32, 8, 128, 3000 + (uint32_t)(urand() * 1000), 32, 64, 500); /* TMA's 64-row boxes */
        page_pad = 16; /* page offsets off TMA's 256-byte rows: both passes by cp.async */
        run_case(ts[i], 32, 8, 128, 2000 + (uint32_t)(urand() * 1000), 32, 16, 300);
        page_pad = 0;
        run_attention(ts[i], 0, 32, 8, 128, 16), run_attention(ts[i], 1, 32, 8, 128, 16);
        run_attention(ts[i], 1, 9, 3, 64, 85);   /* SmolLM2's heads, a tile across two pages */
        run_attention(ts[i], 1, 16, 2, 256, 4);  /* d 256 (CUDA cores), 8 heads a group */
        run_attention(ts[i], 0, 8, 8, 32, 1);    /* d 32, no group, a page a token */
        run_decode_evict(ts[i], 32, 8, 128, 32, 32, 16, KERN_POOL_AVG, 2, 200.0f, 0); /* CAKE at 8B shapes */
        run_decode_evict(ts[i], 8, 2, 64, 16, 11, 7, KERN_POOL_NONE, 0, 0.0f, 0);     /* part of a window */
        run_decode_evict(ts[i], 4, 4, 128, 8, 8, 5, KERN_POOL_MAX, 3, 200.0f, 0);     /* G = 1: max pooling */
        run_decode_evict(ts[i], 4, 2, 128, 40, 40, 64, KERN_POOL_AVG, 3, 200.0f, 0);  /* a head over 2 slices */
        run_decode_evict(ts[i], 32, 8, 128, 32, 32, 16, KERN_POOL_AVG, 2, 200.0f, 1); /* the variance alone */
        run_decode_evict_carry(ts[i], 8, 2, 128, 32, 16, 0, 0);  /* carried log-sum-exps, G = 4 */
        run_decode_evict_carry(ts[i], 6, 2, 64, 16, 7, 0, 0);    /* G = 3, window 16, pages across tokens */
        run_decode_evict_carry(ts[i], 16, 2, 128, 32, 32, 0, 0); /* G = 8: the newest rows over 2 slices */
        run_decode_evict_carry(ts[i], 8, 2, 128, 32, 16, 1, 1);  /* the same filling holes, the newest given */
        run_decode_evict_carry(ts[i], 6, 2, 64, 16, 7, 1, 0);
        run_decode_evict_carry(ts[i], 16, 2, 128, 32, 32, 1, 1);
        kern_cuda_score_set_wgmma(0); /* passes 1 and 2 on mma.sync where wgmma takes them */
        run_decode_evict(ts[i], 32, 8, 128, 32, 32, 16, KERN_POOL_AVG, 2, 200.0f, 0);
        run_decode_evict_carry(ts[i], 8, 2, 128, 32, 16, 0, 0);
        run_decode_evict_carry(ts[i], 8, 2, 128, 32, 16, 1, 1);
        kern_cuda_score_set_wgmma(1);
        run_compact_many(ts[i], 8, 128, 16, 0);  /* 8B shapes, caked's 64 KiB pages */
        run_compact_many(ts[i], 8, 128, 16, 1);  /* the same, the long row's top-k split first */
        run_compact_many(ts[i], 3, 64, 85, 0);   /* SmolLM2's kv heads, pages across tokens */
        run_compact_many(ts[i], 3, 64, 85, 1);
        run_compact_many(ts[i], 1, 8, 7, 1);     /* rows of 16 bytes (one head: one cluster) */
        run_compact_many(ts[i], 2, 256, 4, 0);   /* rows of 512 bytes: a block's pieces in two rounds */
    }
    run_topk_many();
    run_ring_gather();
    printf("%s\n", failures ? "FAILED" : "all GPU kernel checks passed");
    return failures ? 1 : 0;
}
