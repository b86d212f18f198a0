/* cake-parity - replays golden cases of the CAKE reference implementation.
 *
 *   cake-parity [--mode parity|fixed] [--device cpu|gpu] [--threads N] CASE_DIR...
 *   cake-parity --adjust FILE
 *
 * A CASE_DIR is a case (it holds meta.txt) or a folder of cases. Tolerances are those of
 * shared/golden/README.md. Prints one line per case (PASS, or FAIL with the first
 * differences) and last "N passed, M failed"; exits 0 only if all pass, 1 on a failure,
 * 2 on usage errors.
 *
 * parity mode checks scores, budgets (from the reference's preferences exactly, from our
 * own within the one-token rule) and kept sets. fixed mode checks the same scores, then
 * fixed mode's own guarantees on the case (budgets never rise between stages, the total
 * is min(T, sum of caps), each layer keeps exactly its budget in positional order, the
 * kept set is the top of the indicator) and prints how its budgets differ from parity's.
 * --device gpu scores with the CUDA kernels (fixed mode's f32 statistics; the golden cases'
 * model is f32, so both modes' scores agree with them within the same tolerance). */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef CAKE_HAVE_CUDA
#include <cuda_runtime.h>

#include "kern_cuda.h"
#endif

#include "cakeseq.h"
#include "golden.h"
#include "kern.h"
#include "policy.h"

#define MAX_NOTES 4
#define REL_TOL 1e-4       /* scores: f32 arithmetic in another order */
#define TIE_TOL 1e-5       /* kept sets: near-ties at the selection threshold */
#define INT_TOL 1e-3       /* budgets: f_l this close to an integer may round either way */

struct report {
    int fail;
    int notes;
    char text[2048];
    uint32_t swaps;
};

static void note(struct report *r, int is_fail, const char *fmt, ...)
{
    if (is_fail)
        r->fail = 1;
    if (r->notes >= MAX_NOTES || (!is_fail && r->fail))
        return;
    size_t len = strlen(r->text);
    va_list ap;
    va_start(ap, fmt);
    if (len + 3 < sizeof r->text) {
        if (len)
            strcat(r->text, "; ");
        vsnprintf(r->text + strlen(r->text), sizeof r->text - strlen(r->text), fmt, ap);
    }
    va_end(ap);
    r->notes += is_fail;
}

static double rel(double a, double ref, double scale)
{
    double s = fabs(scale) > 0 ? fabs(scale) : 1e-30;
    return fabs(a - ref) / s;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int cmp_desc_f(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x > y ? -1 : x < y;
}

/* Compares a kept set (sorted ascending) with the reference's, allowing swaps at near-ties
 * of the reference indicator refind (one head, S values). */
static void compare_kept(struct report *r, uint32_t l, uint32_t g, const uint32_t *ours,
                         const int32_t *ref, uint32_t k, const float *refind, uint32_t S)
{
    if (k == 0)
        return;
    float *sorted = malloc(sizeof(float) * S);
    memcpy(sorted, refind, sizeof(float) * S);
    qsort(sorted, S, sizeof(float), cmp_desc_f);
    double thr = sorted[k - 1];
    free(sorted);
    uint32_t i = 0, j = 0, bad = 0, swaps = 0;
    while (i < k || j < k) {
        uint32_t a = i < k ? ours[i] : UINT32_MAX, b = j < k ? (uint32_t)ref[j] : UINT32_MAX;
        uint32_t x;
        if (a == b) {
            i++, j++;
            continue;
        }
        if (a < b)
            x = a, i++;
        else
            x = b, j++;
        if (x < S && fabs(refind[x] - thr) <= TIE_TOL * fabs(thr))
            swaps++;
        else if (!bad++)
            note(r, 1, "kept l%u g%u: position %u %s (ref indicator %.6g, threshold %.6g)", l,
                 g, x, a == x ? "kept but not in reference" : "in reference but dropped",
                 x < S ? refind[x] : NAN, thr);
    }
    r->swaps += swaps / 2;
}

/* Budgets from our own preferences: equal, or one token moved between two layers whose
 * shares lie within INT_TOL of an integer. */
static int budgets_close(const int64_t *ours, const int32_t *ref, uint32_t m, const float *P,
                         int64_t T)
{
    uint32_t diff[2], nd = 0;
    for (uint32_t l = 0; l < m; l++)
        if (ours[l] != ref[l]) {
            if (nd == 2 || llabs(ours[l] - ref[l]) != 1)
                return 0;
            diff[nd++] = l;
        }
    if (nd == 0)
        return 1;
    if (nd != 2 || (ours[diff[0]] - ref[diff[0]]) + (ours[diff[1]] - ref[diff[1]]) != 0)
        return 0;
    float sum = 0.0f;
    for (uint32_t l = 0; l < m; l++)
        sum += P[l];
    for (int i = 0; i < 2; i++) {
        double f = (double)(P[diff[i]] / sum * (float)T);
        if (fabs(f - nearbyint(f)) > INT_TOL)
            return 0;
    }
    return 1;
}

struct scored {
    double *E, *V, *P;
    float *ind; /* [L][Hkv][S] */
};

static int use_gpu;

#ifdef CAKE_HAVE_CUDA
/* One layer scored by the CUDA kernels (keys and queries copied to the device). */
static int score_gpu(const struct golden_case *c, uint32_t l, float *ind, double *E, double *V)
{
    uint32_t S = c->n - c->w;
    size_t kbytes = (size_t)c->Hkv * c->n * c->d * 2, qbytes = (size_t)c->H * c->w * c->d * 2;
    uint8_t *dk = NULL;
    uint64_t *doff = NULL, zero = 0;
    void *dq = NULL, *ws = NULL;
    float *dind = NULL;
    size_t wsb = kern_cuda_score_workspace(c->Hkv, c->H, c->w, c->n, S);
    int rc = -EIO, ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || !ndev)
        return -ENODEV; /* "No such device" in the report */
    if (cudaMalloc((void **)&dk, kbytes) || cudaMalloc((void **)&doff, 8) || cudaMalloc(&dq, qbytes) ||
        cudaMalloc((void **)&dind, sizeof(float) * c->Hkv * S + 4) || cudaMalloc(&ws, wsb) ||
        cudaMemcpy(dk, c->k + (size_t)l * c->Hkv * c->n * c->d, kbytes, cudaMemcpyHostToDevice) ||
        cudaMemcpy(doff, &zero, 8, cudaMemcpyHostToDevice) ||
        cudaMemcpy(dq, c->q + (size_t)l * c->H * c->w * c->d, qbytes, cudaMemcpyHostToDevice))
        goto out;
    struct kern_cuda_kv kv = {KERN_BF16, c->Hkv, c->d, c->n, c->n, dk, doff, 0};
    if ((rc = kern_cuda_score_layer(&kv, dq, c->H, c->w, S, c->gamma, dind, E, V, ws, wsb, NULL)))
        goto out;
    rc = cudaMemcpy(ind, dind, sizeof(float) * c->Hkv * S, cudaMemcpyDeviceToHost) ? -EIO : 0;
out:
    cudaFree(dk), cudaFree(doff), cudaFree(dq), cudaFree(dind), cudaFree(ws);
    return rc;
}
#endif

static int score_case(const struct golden_case *c, enum policy_mode mode, int threads,
                      struct scored *out, struct report *r)
{
    uint32_t L = c->L, S = c->n - c->w;
    struct policy_cfg cfg;
    policy_cfg_default(&cfg, L, c->C);
    cfg.mode = mode, cfg.window = c->w, cfg.tau1 = c->tau1, cfg.tau2 = c->tau2;
    cfg.gamma = c->gamma, cfg.model_dtype = KERN_F32;
    out->E = calloc(L, sizeof(double));
    out->V = calloc(L, sizeof(double));
    out->P = calloc(L, sizeof(double));
    out->ind = malloc(sizeof(float) * (size_t)L * c->Hkv * S);
    if (!out->E || !out->V || !out->P || !out->ind)
        return -ENOMEM;
    for (uint32_t l = 0; l < L; l++) {
        void *page = c->k + (size_t)l * c->Hkv * c->n * c->d;
        struct kern_kv kv = {
            .dtype = KERN_BF16, .kv_heads = c->Hkv, .head_dim = c->d,
            .tokens_per_page = c->n, .n_tokens = c->n, .pages = &page,
        };
        struct kern_score_args a = {
            .q = c->q + (size_t)l * c->H * c->w * c->d, .q_dtype = KERN_BF16,
            .q_heads = c->H, .n_q = c->w, .kv = &kv, .n_scored = S, .gamma = c->gamma,
            .stats = mode == POLICY_PARITY ? KERN_STATS_REF : KERN_STATS_FP32,
            .round_dtype = KERN_F32, .n_threads = threads,
        };
        float *ind = out->ind + (size_t)l * c->Hkv * S;
        struct kern_score_out o = {.indicator = ind};
        int rc;
#ifdef CAKE_HAVE_CUDA
        if (use_gpu)
            rc = score_gpu(c, l, ind, &o.entropy, &o.variance);
        else
#endif
            rc = kern_score_layer(&a, &o);
        if (rc)
            return rc;
        out->E[l] = o.entropy, out->V[l] = o.variance;
        out->P[l] = policy_preference(&cfg, o.entropy, o.variance);
        if (rel(o.entropy, c->entropy[l], c->entropy[l]) > REL_TOL)
            note(r, 1, "entropy[%u] %.7g vs %.7g", l, o.entropy, c->entropy[l]);
        if (rel(o.variance, c->variance[l], c->variance[l]) > REL_TOL)
            note(r, 1, "variance[%u] %.7g vs %.7g", l, o.variance, c->variance[l]);
        if (rel(out->P[l], c->pref[l], c->pref[l]) > REL_TOL)
            note(r, 1, "pref[%u] %.7g vs %.7g", l, out->P[l], c->pref[l]);
        for (uint32_t g = 0; g < c->Hkv; g++) {
            const float *ri = c->indicator + ((size_t)l * c->Hkv + g) * S, *oi = ind + (size_t)g * S;
            float mx = 0.0f;
            for (uint32_t j = 0; j < S; j++)
                mx = fmaxf(mx, fabsf(ri[j]));
            for (uint32_t j = 0; j < S; j++)
                if (rel(oi[j], ri[j], mx) > REL_TOL) {
                    note(r, 1, "indicator l%u g%u j%u %.7g vs %.7g (head max %.7g)", l, g, j,
                         oi[j], ri[j], mx);
                    break;
                }
        }
    }
    return 0;
}

/* Runs the controller over all layers with the given preferences. */
static struct cakeseq *replay(const struct golden_case *c, enum policy_mode mode,
                              const double *P, const float *ind)
{
    struct policy_cfg cfg;
    policy_cfg_default(&cfg, c->L, c->C);
    cfg.mode = mode, cfg.window = c->w, cfg.tau1 = c->tau1, cfg.tau2 = c->tau2;
    cfg.gamma = c->gamma, cfg.cascading = c->cascading, cfg.model_dtype = KERN_F32;
    struct cakeseq *s;
    const char *why = NULL;
    if (cakeseq_create(&cfg, c->Hkv, c->n, &s, &why))
        return NULL;
    struct cakeseq_evict ev[POLICY_MAX_LAYERS];
    uint32_t nev, S = c->n - c->w;
    for (uint32_t l = 0; l < c->L; l++)
        if (cakeseq_prefill_layer(s, l, P[l], ind + (size_t)l * c->Hkv * S, ev, &nev)) {
            cakeseq_destroy(s);
            return NULL;
        }
    return s;
}

static void check_parity(const struct golden_case *c, const struct scored *sc, struct report *r)
{
    uint32_t L = c->L, S = c->n - c->w;
    int64_t T = ((int64_t)c->C - c->w) * L;
    /* 1. budgets from the reference's own preferences: exact */
    double *P = calloc(L, sizeof(double));
    for (uint32_t l = 0; l < L; l++)
        P[l] = c->pref[l];
    struct cakeseq *s = replay(c, POLICY_PARITY, P, c->indicator);
    if (!s) {
        note(r, 1, "replay failed");
        free(P);
        return;
    }
    for (uint32_t m = 0; m < L; m++) {
        const int64_t *row = cakeseq_stage_budgets(s, m);
        for (uint32_t l = 0; l < L; l++)
            if (row[l] != c->stage[m * L + l]) {
                note(r, 1, "stage %u budget[%u] %lld vs %d (reference prefs)", m, l,
                     (long long)row[l], c->stage[m * L + l]);
                break;
            }
    }
    for (uint32_t l = 0; l < L; l++) {
        if (cakeseq_budget(s, l) != (uint32_t)c->budgets[l])
            note(r, 1, "budget[%u] %u vs %d (reference prefs)", l, cakeseq_budget(s, l),
                 c->budgets[l]);
        if (cakeseq_prefix_len(s, l) != c->kept_len[l])
            note(r, 1, "kept count l%u %u vs %u (reference prefs)", l, cakeseq_prefix_len(s, l),
                 c->kept_len[l]);
    }
    cakeseq_destroy(s);
    free(P);

    /* 2. budgets from our preferences: equal up to the one-token rule */
    s = replay(c, POLICY_PARITY, sc->P, sc->ind);
    if (!s) {
        note(r, 1, "replay failed");
        return;
    }
    float Pf[POLICY_MAX_LAYERS];
    for (uint32_t l = 0; l < L; l++)
        Pf[l] = (float)sc->P[l];
    for (uint32_t m = 0; m < L; m++) {
        const int64_t *row = cakeseq_stage_budgets(s, m);
        int allocated = c->n > c->C + c->w && (c->cascading || m == L - 1);
        if (!budgets_close(row, c->stage + m * L, m + 1, Pf, T) || (!allocated && row[0] != c->stage[m * L]))
            note(r, 1, "stage %u budgets differ from reference beyond one near-integer token", m);
    }
    /* 3. kept sets: top k_l of our indicator vs the reference's */
    uint32_t *top = malloc(sizeof(uint32_t) * (S ? S : 1));
    for (uint32_t l = 0; l < L; l++) {
        uint32_t k = c->kept_len[l];
        int same_count = cakeseq_prefix_len(s, l) == k;
        for (uint32_t g = 0; g < c->Hkv; g++) {
            const float *oi = sc->ind + ((size_t)l * c->Hkv + g) * S;
            const float *ri = c->indicator + ((size_t)l * c->Hkv + g) * S;
            const int32_t *ref = c->kept[l] + (size_t)g * k;
            kern_topk(oi, S, k, KERN_ORDER_POSITION, top);
            compare_kept(r, l, g, top, ref, k, ri, S);
            if (same_count && k) { /* what the controller actually kept, end to end */
                memcpy(top, cakeseq_positions(s, l, g), sizeof(uint32_t) * k);
                qsort(top, k, sizeof(uint32_t), cmp_u32);
                uint32_t sw = r->swaps;
                compare_kept(r, l, g, top, ref, k, ri, S);
                r->swaps = sw;
            }
        }
    }
    free(top);
    cakeseq_destroy(s);
}

static void check_fixed(const struct golden_case *c, const struct scored *sc, struct report *r)
{
    uint32_t L = c->L, S = c->n - c->w;
    int64_t T = ((int64_t)c->C - c->w) * L;
    struct cakeseq *s = replay(c, POLICY_FIXED, sc->P, sc->ind);
    if (!s) {
        note(r, 1, "replay failed");
        return;
    }
    int evicts = c->n > c->C;
    for (uint32_t m = 0; evicts && m < L; m++) {
        const int64_t *row = cakeseq_stage_budgets(s, m);
        if (!c->cascading && m < L - 1)
            continue;
        int64_t sum = 0, caps = 0;
        for (uint32_t l = 0; l <= m; l++) {
            sum += row[l];
            /* the cap of an earlier layer is what it kept at the stage before */
            caps += (c->cascading && m > 0 && l < m) ? cakeseq_stage_budgets(s, m - 1)[l] : S;
            if (c->cascading && m > 0 && l < m && row[l] > cakeseq_stage_budgets(s, m - 1)[l])
                note(r, 1, "stage %u: budget[%u] rose %lld -> %lld", m, l,
                     (long long)cakeseq_stage_budgets(s, m - 1)[l], (long long)row[l]);
        }
        if (sum != (T < caps ? T : caps))
            note(r, 1, "stage %u: total %lld, expected min(T=%lld, caps=%lld)", m,
                 (long long)sum, (long long)T, (long long)caps);
    }
    uint32_t *top = malloc(sizeof(uint32_t) * (S ? S : 1));
    int differ = 0;
    for (uint32_t l = 0; l < L; l++) {
        uint32_t k = cakeseq_prefix_len(s, l);
        if (evicts && k != cakeseq_budget(s, l))
            note(r, 1, "layer %u keeps %u but records budget %u", l, k, cakeseq_budget(s, l));
        if ((int64_t)cakeseq_budget(s, l) != c->budgets[l])
            differ++;
        for (uint32_t g = 0; g < c->Hkv; g++) {
            const uint32_t *pos = cakeseq_positions(s, l, g);
            for (uint32_t i = 1; i < k; i++)
                if (pos[i] <= pos[i - 1]) {
                    note(r, 1, "layer %u head %u: kept positions out of order", l, g);
                    break;
                }
            kern_topk(sc->ind + ((size_t)l * c->Hkv + g) * S, S, k, KERN_ORDER_POSITION, top);
            if (k && memcmp(top, pos, sizeof(uint32_t) * k))
                note(r, 1, "layer %u head %u: kept set is not the top %u of the indicator", l, g, k);
        }
    }
    if (differ) {
        char buf[512] = "budgets differ from parity:";
        for (uint32_t l = 0; l < L && strlen(buf) < sizeof buf - 32; l++)
            snprintf(buf + strlen(buf), sizeof buf - strlen(buf), " %u/%d", cakeseq_budget(s, l),
                     c->budgets[l]);
        note(r, 0, "%s", buf);
    }
    free(top);
    cakeseq_destroy(s);
}

static int run_case(const char *dir, enum policy_mode mode, int threads)
{
    struct golden_case c;
    char err[512];
    struct report r = {0};
    if (golden_load(dir, &c, err, sizeof err)) {
        printf("%s FAIL: %s\n", dir, err);
        return 1;
    }
    struct scored sc = {0};
    int rc = score_case(&c, mode, threads, &sc, &r);
    if (rc)
        note(&r, 1, "scoring failed: %s", strerror(-rc));
    else if (mode == POLICY_PARITY)
        check_parity(&c, &sc, &r);
    else
        check_fixed(&c, &sc, &r);
    if (r.fail)
        printf("%s FAIL: %s\n", c.name, r.text);
    else
        printf("%s PASS%s%s (swaps allowed at near-ties: %u)\n", c.name, r.text[0] ? ": " : "",
               r.text, r.swaps);
    free(sc.E), free(sc.V), free(sc.P), free(sc.ind);
    golden_free(&c);
    return r.fail;
}

static int run_adjust(const char *path, unsigned *passed, unsigned *failed)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "cake-parity: %s: %s\n", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    unsigned lineno = 0;
    double fv[POLICY_MAX_LAYERS];
    int64_t want[POLICY_MAX_LAYERS], got[POLICY_MAX_LAYERS];
    while (getline(&line, &cap, f) > 0) {
        lineno++;
        if (line[0] == '#' || line[0] == '\n')
            continue;
        char *p = line, *end;
        long long T = strtoll(p, &end, 10), S = strtoll(end, &p, 10);
        unsigned long L = strtoul(p, &end, 10);
        int ok = end != p && L > 0 && L <= POLICY_MAX_LAYERS;
        p = end;
        for (unsigned long l = 0; ok && l < L; l++) {
            fv[l] = strtod(p, &end);
            ok = end != p, p = end;
        }
        p = ok ? strstr(p, "->") : NULL;
        if (p)
            p += 2;
        for (unsigned long l = 0; p && l < L; l++) {
            want[l] = strtoll(p, &end, 10);
            ok = ok && end != p, p = end;
        }
        if (!ok || !p) {
            printf("%s:%u FAIL: malformed line\n", path, lineno);
            (*failed)++;
            continue;
        }
        policy_adjust_budgets(fv, (uint32_t)L, T, S, got);
        if (memcmp(got, want, sizeof(int64_t) * L)) {
            unsigned long l = 0;
            while (got[l] == want[l])
                l++;
            printf("%s:%u FAIL: b[%lu] %lld vs %lld\n", path, lineno, l, (long long)got[l],
                   (long long)want[l]);
            (*failed)++;
        } else {
            (*passed)++;
        }
    }
    free(line);
    fclose(f);
    return 0;
}

static int is_case(const char *dir)
{
    char p[4096];
    struct stat st;
    snprintf(p, sizeof p, "%s/meta.txt", dir);
    return stat(p, &st) == 0;
}

static int by_name(const struct dirent **a, const struct dirent **b)
{
    return strcmp((*a)->d_name, (*b)->d_name);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: cake-parity [--mode parity|fixed] [--device cpu|gpu] [--threads N] CASE_DIR...\n"
               "       cake-parity --adjust FILE\n");
}

int main(int argc, char **argv)
{
    enum policy_mode mode = POLICY_PARITY;
    const char *adjust = NULL;
    int threads = 0;
    static const struct option opts[] = {
        {"mode", required_argument, 0, 'm'}, {"device", required_argument, 0, 'd'},
        {"adjust", required_argument, 0, 'a'}, {"threads", required_argument, 0, 't'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0},
    };
    int o;
    while ((o = getopt_long(argc, argv, "m:d:a:t:h", opts, NULL)) != -1) {
        switch (o) {
        case 'm': {
            int m = policy_mode_parse(optarg);
            if (m < 0) {
                fprintf(stderr, "cake-parity: unknown mode '%s' (parity or fixed)\n", optarg);
                return 2;
            }
            mode = (enum policy_mode)m;
            break;
        }
        case 'd':
            use_gpu = !strcmp(optarg, "gpu");
#ifndef CAKE_HAVE_CUDA
            if (use_gpu) {
                fprintf(stderr, "cake-parity: this build has no CUDA (nvcc was not found)\n");
                return 2;
            }
#endif
            if (strcmp(optarg, "cpu") && !use_gpu) {
                fprintf(stderr, "cake-parity: unknown device '%s' (cpu or gpu)\n", optarg);
                return 2;
            }
            break;
        case 'a': adjust = optarg; break;
        case 't': threads = atoi(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    unsigned passed = 0, failed = 0;
    if (adjust) {
        if (run_adjust(adjust, &passed, &failed))
            return 2;
        printf("%u passed, %u failed\n", passed, failed);
        return failed ? 1 : 0;
    }
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    for (int i = optind; i < argc; i++) {
        if (is_case(argv[i])) {
            *(run_case(argv[i], mode, threads) ? &failed : &passed) += 1;
            continue;
        }
        struct dirent **ents;
        int ne = scandir(argv[i], &ents, NULL, by_name);
        if (ne < 0) {
            printf("%s FAIL: %s\n", argv[i], strerror(errno));
            failed++;
            continue;
        }
        int found = 0;
        for (int e = 0; e < ne; e++) {
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", argv[i], ents[e]->d_name);
            if (ents[e]->d_name[0] != '.' && is_case(p)) {
                found++;
                *(run_case(p, mode, threads) ? &failed : &passed) += 1;
            }
            free(ents[e]);
        }
        free(ents);
        if (!found) {
            printf("%s FAIL: no cases (no */meta.txt)\n", argv[i]);
            failed++;
        }
    }
    printf("%u passed, %u failed\n", passed, failed);
    return failed ? 1 : 0;
}
