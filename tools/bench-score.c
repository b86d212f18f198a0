/* bench-score - one layer's CAKE score + select + compact on the CPU.
 *
 *   bench-score [--sizes 4096,32768,131072] [--threads N] [--reps R] [--no-torch]
 *               [--keep K] [--mode fixed|parity] [--runs W]
 *
 * Llama-3.1-8B shapes: 32 query heads, 8 kv heads, head_dim 128, window 32, bf16 keys
 * and values. For each prompt length n it times kern_score_layer + kern_topk per kv head
 * (keep K = 992 prefix tokens: C = 1024 with the window) + in-place compaction of K and V,
 * and prints tokens/s (n / time). In the same run it times the same computation written in
 * PyTorch (tools/bench_score_torch.py, the reference's code path) on the same cores and
 * prints the ratio; without torch that column says why it is empty. Best of R runs.
 * --runs W: the selection keeps runs of W (cake_policy.run_width): each head's indicator is
 * ranked by policy_runs_rank before its top K, and that ranking's own time (the heads one
 * after another, on one thread) is printed beside the layer's. Last, a decode step's scoring
 * of one layer three ways (both passes; the older rows' log-sum-exps carried; the newest
 * row's from the engine too: daemon/seq_host.c), side by side. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kern.h"
#include "policy.h"
#include "util.h"

#define H 32
#define HKV 8
#define D 128
#define W 32

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float frand(void) /* xorshift, uniform in [-1, 1) */
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 40) * (2.0 / 16777216.0) - 1.0);
}

/* Times one layer; returns seconds (best of reps). */
static double time_layer(uint32_t n, uint32_t keep, int threads, int reps, enum kern_stats st,
                         uint32_t runs, double *runs_s)
{
    uint32_t S = n - W;
    size_t kv_elems = (size_t)HKV * n * D;
    uint16_t *page = malloc(kv_elems * 2 * 2); /* K then V */
    uint16_t *pristine = malloc(kv_elems * 2 * 2);
    uint16_t *q = malloc(sizeof(uint16_t) * H * W * D);
    float *ind = malloc(sizeof(float) * HKV * S);
    uint32_t *idx = malloc(sizeof(uint32_t) * S);
    uint64_t *key = malloc(sizeof(uint64_t) * 2 * S);
    uint8_t *taken = malloc(S);
    if (!page || !pristine || !q || !ind || !idx || !key || !taken) {
        fprintf(stderr, "bench-score: out of memory at n=%u\n", n);
        exit(1);
    }
    /* keys with a little structure: a few heavy positions per head */
    for (size_t i = 0; i < kv_elems * 2; i++)
        pristine[i] = kern_f32_to_bf16(frand());
    for (size_t i = 0; i < (size_t)H * W * D; i++)
        q[i] = kern_f32_to_bf16(frand() * 2.0f);
    void *pages[1] = {page};
    struct kern_kv kv = {
        .dtype = KERN_BF16, .kv_heads = HKV, .head_dim = D, .tokens_per_page = n,
        .n_tokens = n, .pages = pages, .v_offset_bytes = kv_elems * 2,
    };
    double best = INFINITY;
    *runs_s = INFINITY;
    for (int r = 0; r < reps; r++) {
        memcpy(page, pristine, kv_elems * 2 * 2);
        double t0 = util_now_s();
        struct kern_score_args a = {
            .q = q, .q_dtype = KERN_BF16, .q_heads = H, .n_q = W, .kv = &kv, .n_scored = S,
            .gamma = 200.0f, .stats = st, .round_dtype = KERN_BF16, .n_threads = threads,
        };
        struct kern_score_out o = {.indicator = ind};
        if (kern_score_layer(&a, &o)) {
            fprintf(stderr, "bench-score: scoring failed\n");
            exit(1);
        }
        double r0 = util_now_s();
        for (uint32_t g = 0; g < HKV && runs > 1; g++)
            policy_runs_rank(ind + (size_t)g * S, S, runs, key, taken);
        double rt = util_now_s() - r0;
        if (runs > 1 && rt < *runs_s)
            *runs_s = rt;
        for (uint32_t g = 0; g < HKV; g++) {
            uint32_t k = kern_topk(ind + (size_t)g * S, S, keep, KERN_ORDER_POSITION, idx);
            kern_compact_head(&kv, g, idx, k, S, W, NULL);
        }
        double t = util_now_s() - t0;
        if (t < best)
            best = t;
    }
    free(page), free(pristine), free(q), free(ind), free(idx), free(key), free(taken);
    return best;
}

/* A decode step's scoring of one layer (1025 prefix tokens before the window: C = 1024
 * plus the step's), the three ways a host sequence's eviction runs it: both passes over
 * the keys for the window's rows; the newest row's first pass (kern_score_lse) and one pass
 * with the older rows' log-sum-exps carried; one pass with the newest row's from the
 * engine too. The carried ways include carrying the rows' values over the step's eviction
 * (kern_lse_carry, one slot a kv head removed), as daemon/seq_host.c runs it. Best of reps,
 * seconds in t[3]. */
static void time_decode(int threads, int reps, double t[3])
{
    uint32_t n = 1025 + W, S = n - W;
    size_t kv_elems = (size_t)HKV * n * D;
    uint16_t *page = malloc(kv_elems * 2 * 2), *q = malloc(sizeof(uint16_t) * H * W * D);
    uint16_t *qn = malloc(sizeof(uint16_t) * H * D);
    float *ind = malloc(sizeof(float) * HKV * S), *lse = malloc(sizeof(float) * H * W);
    float *newest = malloc(sizeof(float) * H), *carried = malloc(sizeof(float) * H * W);
    uint32_t *kept = malloc(sizeof(uint32_t) * HKV * (S - 1)); /* slot 7 + g removed */
    if (!page || !q || !qn || !ind || !lse || !newest || !carried || !kept) {
        fprintf(stderr, "bench-score: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < kv_elems * 2; i++)
        page[i] = kern_f32_to_bf16(frand());
    for (size_t i = 0; i < (size_t)H * W * D; i++)
        q[i] = kern_f32_to_bf16(frand() * 2.0f);
    for (uint32_t h = 0; h < H; h++)
        memcpy(qn + (size_t)h * D, q + ((size_t)h * W + W - 1) * D, sizeof(uint16_t) * D);
    for (uint32_t g = 0; g < HKV; g++)
        for (uint32_t j = 0, at = 0; j < S; j++)
            if (j != 7 + g)
                kept[(size_t)g * (S - 1) + at++] = j;
    void *pages[1] = {page};
    struct kern_kv kv = {.dtype = KERN_BF16, .kv_heads = HKV, .head_dim = D, .tokens_per_page = n,
                         .n_tokens = n, .pages = pages, .v_offset_bytes = kv_elems * 2};
    struct kern_score_args a = {.q = q, .q_dtype = KERN_BF16, .q_heads = H, .n_q = W, .kv = &kv,
                                .n_scored = S, .gamma = 200.0f, .n_threads = threads};
    struct kern_score_args a1 = {.q = qn, .q_dtype = KERN_BF16, .q_heads = H, .n_q = 1, .kv = &kv,
                                 .n_threads = threads};
    struct kern_score_out o = {.indicator = ind};
    if (kern_score_lse(&a, lse)) { /* the rows' values, as carried */
        fprintf(stderr, "bench-score: first pass failed\n");
        exit(1);
    }
    for (int way = 0; way < 3; way++) {
        t[way] = INFINITY;
        for (int r = 0; r < reps; r++) {
            double t0 = util_now_s();
            int rc = 0;
            if (way == 0) {
                a.lse = NULL;
            } else {
                if (way == 1 && (rc = kern_score_lse(&a1, newest)) == 0)
                    for (uint32_t h = 0; h < H; h++)
                        lse[(size_t)h * W + W - 1] = newest[h];
                a.lse = lse;
            }
            if (rc || kern_score_layer(&a, &o) || (way && kern_lse_carry(&a, lse, kept, S - 1, carried))) {
                fprintf(stderr, "bench-score: decode scoring failed\n");
                exit(1);
            }
            double dt = util_now_s() - t0;
            t[way] = dt < t[way] ? dt : t[way];
        }
    }
    free(page), free(q), free(qn), free(ind), free(lse), free(newest), free(carried), free(kept);
}

/* Runs the PyTorch version; returns seconds or a negative value (reason in why). */
static double time_torch(const char *self_dir, uint32_t n, uint32_t keep, int threads, int reps,
                         char *why, size_t wl)
{
    char cmd[4096], line[512];
    snprintf(cmd, sizeof cmd, "python3 '%s/bench_score_torch.py' --n %u --keep %u --threads %d "
             "--reps %d 2>&1", self_dir, n, keep, threads, reps);
    FILE *p = popen(cmd, "r");
    if (!p) {
        snprintf(why, wl, "cannot run python3");
        return -1;
    }
    double t = -1;
    snprintf(why, wl, "no output from bench_score_torch.py");
    while (fgets(line, sizeof line, p)) {
        line[strcspn(line, "\n")] = 0;
        if (sscanf(line, "seconds %lf", &t) == 1)
            break;
        snprintf(why, wl, "%.200s", line);
    }
    pclose(p);
    return t;
}

int main(int argc, char **argv)
{
    uint32_t sizes[8] = {4096, 32768, 131072}, ns = 3, keep = 992, runs = 0;
    int threads = 0, reps = 5, torch = 1;
    enum kern_stats st = KERN_STATS_FP32;
    static const struct option opts[] = {
        {"sizes", required_argument, 0, 's'}, {"threads", required_argument, 0, 't'},
        {"reps", required_argument, 0, 'r'}, {"no-torch", no_argument, 0, 'n'},
        {"keep", required_argument, 0, 'k'}, {"mode", required_argument, 0, 'm'},
        {"runs", required_argument, 0, 'w'}, {0, 0, 0, 0},
    };
    int o;
    while ((o = getopt_long(argc, argv, "s:t:r:nk:m:w:", opts, NULL)) != -1) {
        switch (o) {
        case 's': {
            ns = 0;
            for (char *t = strtok(optarg, ","); t && ns < 8; t = strtok(NULL, ","))
                sizes[ns++] = (uint32_t)strtoul(t, NULL, 0);
            break;
        }
        case 't': threads = atoi(optarg); break;
        case 'r': reps = atoi(optarg) > 0 ? atoi(optarg) : 1; break;
        case 'n': torch = 0; break;
        case 'k': keep = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'm': st = strcmp(optarg, "parity") ? KERN_STATS_FP32 : KERN_STATS_REF; break;
        case 'w': runs = (uint32_t)strtoul(optarg, NULL, 0); break;
        default:
            fprintf(stderr, "usage: bench-score [--sizes N,..] [--threads N] [--reps R] "
                            "[--no-torch] [--keep K] [--mode fixed|parity] [--runs W]\n");
            return 2;
        }
    }
    threads = kern_threads(threads);
    /* the python script sits beside this program's source; the build records where */
    const char *dir = getenv("CAKE_TOOLS_DIR") ? getenv("CAKE_TOOLS_DIR") : CAKE_TOOLS_DIR;
    printf("bench-score: one layer, H=%d Hkv=%d d=%d w=%d bf16, keep %u, %d threads, "
           "stats %s, best of %d\n", H, HKV, D, W, keep, threads,
           st == KERN_STATS_FP32 ? "fixed" : "parity", reps);
    printf("%8s %12s %14s %12s %14s %8s\n", "n", "caked_ms", "caked_tok/s", "torch_ms",
           "torch_tok/s", "ratio");
    for (uint32_t i = 0; i < ns; i++) {
        uint32_t n = sizes[i];
        if (n <= W + keep) {
            printf("%8u skipped: n must exceed keep + window\n", n);
            continue;
        }
        double rs = 0, t = time_layer(n, keep, threads, reps, st, runs, &rs);
        char why[256] = "";
        double tt = torch ? time_torch(dir, n, keep, threads, n > 40000 ? 1 : reps, why,
                                       sizeof why) : -1;
        if (!torch)
            snprintf(why, sizeof why, "--no-torch");
        if (tt > 0)
            printf("%8u %12.2f %14.0f %12.2f %14.0f %7.1fx\n", n, t * 1e3, n / t, tt * 1e3,
                   n / tt, tt / t);
        else
            printf("%8u %12.2f %14.0f %12s %14s %8s  (torch: %s)\n", n, t * 1e3, n / t, "-",
                   "-", "-", why);
        if (runs > 1)
            printf("%8s   of which the runs of %u ranking %.2f ms (%d kv heads on one thread)\n",
                   "", runs, rs * 1e3, HKV);
        fflush(stdout);
    }
    double td[3];
    time_decode(threads, reps, td);
    printf("decode step, one layer's scoring (1025 prefix tokens, window %d): both passes %.3f ms; "
           "the window's older rows carried (and carried over the step's eviction), the newest row's first pass %.3f ms (%.2fx); "
           "the newest row's from the engine too %.3f ms (%.2fx)\n", W, td[0] * 1e3, td[1] * 1e3,
           td[0] / td[1], td[2] * 1e3, td[0] / td[2]);
    return 0;
}
