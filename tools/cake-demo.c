/* cake-demo - CAKE on one synthetic multi-layer prompt, in process.
 *
 *   cake-demo [--layers L] [--heads H] [--kv-heads K] [--head-dim D] [--prompt N]
 *             [--cache C] [--window W] [--mode fixed|parity] [--no-cascading]
 *             [--threads T] [--seed S]
 *
 * Generates a prompt with structured attention (tools/synth.h), then prefills it layer by
 * layer as an engine would: score the layer, let the controller decide, compact K/V in
 * place. Prints per-layer preference, budget, kept fraction and how many planted heavy
 * hitters each layer kept, and the peak number of tokens held against the full cache. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cakeseq.h"
#include "kern.h"
#include "synth.h"
#include "util.h"

int main(int argc, char **argv)
{
    struct synth_cfg sc = {16, 16, 4, 64, 8192, 32, 1};
    uint32_t C = 512;
    int threads = 0, cascading = 1;
    enum policy_mode mode = POLICY_FIXED;
    static const struct option opts[] = {
        {"layers", 1, 0, 'L'}, {"heads", 1, 0, 'H'}, {"kv-heads", 1, 0, 'K'},
        {"head-dim", 1, 0, 'D'}, {"prompt", 1, 0, 'n'}, {"cache", 1, 0, 'C'},
        {"window", 1, 0, 'w'}, {"mode", 1, 0, 'm'}, {"no-cascading", 0, 0, 'x'},
        {"threads", 1, 0, 't'}, {"seed", 1, 0, 's'}, {0, 0, 0, 0},
    };
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'L': sc.layers = (uint32_t)atoi(optarg); break;
        case 'H': sc.q_heads = (uint32_t)atoi(optarg); break;
        case 'K': sc.kv_heads = (uint32_t)atoi(optarg); break;
        case 'D': sc.head_dim = (uint32_t)atoi(optarg); break;
        case 'n': sc.n = (uint32_t)atoi(optarg); break;
        case 'C': C = (uint32_t)atoi(optarg); break;
        case 'w': sc.window = (uint32_t)atoi(optarg); break;
        case 'm':
            if (policy_mode_parse(optarg) < 0) {
                fprintf(stderr, "cake-demo: unknown mode '%s'\n", optarg);
                return 2;
            }
            mode = (enum policy_mode)policy_mode_parse(optarg);
            break;
        case 'x': cascading = 0; break;
        case 't': threads = atoi(optarg); break;
        case 's': sc.seed = strtoull(optarg, NULL, 0); break;
        default: fprintf(stderr, "cake-demo: see the comment at the top of tools/cake-demo.c\n"); return 2;
        }
    }
    if (!sc.kv_heads || !sc.q_heads || sc.q_heads % sc.kv_heads || sc.head_dim % 2 || !sc.n) {
        fprintf(stderr, "cake-demo: heads must be a multiple of kv-heads, head-dim even\n");
        return 2;
    }
    struct policy_cfg cfg;
    policy_cfg_default(&cfg, sc.layers, C);
    cfg.mode = mode, cfg.window = sc.window, cfg.cascading = cascading;
    struct cakeseq *seq;
    const char *why = "";
    if (cakeseq_create(&cfg, sc.kv_heads, sc.n, &seq, &why)) {
        fprintf(stderr, "cake-demo: %s\n", why);
        return 2;
    }
    uint32_t L = sc.layers, Hkv = sc.kv_heads, n = sc.n, d = sc.head_dim, w = sc.window;
    uint32_t S = cakeseq_scored_len(seq);
    size_t half = (size_t)Hkv * n * d; /* elements of K (or V) of one layer */
    uint16_t **kv = calloc(L, sizeof(*kv)), *q = malloc(2 * (size_t)sc.q_heads * w * d);
    uint8_t *heavy = malloc((size_t)L * Hkv * n);
    uint32_t *held = calloc(L, sizeof(uint32_t));
    float *ind = malloc(sizeof(float) * Hkv * (S + 1));
    void *scratch = malloc(4 * (size_t)d * (S + 1));
    if (!kv || !q || !heavy || !held || !ind || !scratch) {
        fprintf(stderr, "cake-demo: out of memory\n");
        return 1;
    }
    printf("cake-demo: %u layers, %u q heads / %u kv heads, head_dim %u, prompt %u tokens, "
           "cache %u per layer (window %u), %s mode, %s\n", L, sc.q_heads, Hkv, d, n, C, w,
           policy_mode_name(mode), cascading ? "cascading" : "one-shot");
    uint64_t peak = 0;
    double t_score = 0, t0 = util_now_s();
    for (uint32_t l = 0; l < L; l++) {
        kv[l] = malloc(2 * half * sizeof(uint16_t));
        if (!kv[l]) {
            fprintf(stderr, "cake-demo: out of memory at layer %u\n", l);
            return 1;
        }
        synth_layer(&sc, l, kv[l], kv[l] + half, q, heavy + (size_t)l * Hkv * n);
        held[l] = n;
        void *page = kv[l];
        struct kern_kv v = {KERN_BF16, Hkv, d, n, n, &page, half * 2};
        struct kern_score_args a = {
            .q = q, .q_dtype = KERN_BF16, .q_heads = sc.q_heads, .n_q = w, .kv = &v,
            .n_scored = S, .gamma = cfg.gamma,
            .stats = mode == POLICY_FIXED ? KERN_STATS_FP32 : KERN_STATS_REF,
            .round_dtype = KERN_BF16, .n_threads = threads,
        };
        struct kern_score_out out = {.indicator = ind};
        double ts = util_now_s();
        if (S && kern_score_layer(&a, &out)) {
            fprintf(stderr, "cake-demo: scoring failed\n");
            return 1;
        }
        t_score += util_now_s() - ts;
        uint64_t tokens = 0;
        for (uint32_t m = 0; m <= l; m++)
            tokens += held[m];
        peak = tokens > peak ? tokens : peak;
        struct cakeseq_evict ev[1024];
        uint32_t nev = 0;
        double P = policy_preference(&cfg, out.entropy, out.variance);
        if (cakeseq_prefill_layer(seq, l, P, ind, ev, &nev)) {
            fprintf(stderr, "cake-demo: controller failed at layer %u\n", l);
            return 1;
        }
        for (uint32_t e = 0; e < nev; e++) { /* move K/V as the controller decided */
            uint32_t m = ev[e].layer;
            void *pm = kv[m];
            struct kern_kv vm = {KERN_BF16, Hkv, d, n, held[m], &pm, half * 2};
            for (uint32_t g = 0; g < Hkv; g++)
                kern_compact_head(&vm, g, ev[e].slots + (size_t)g * ev[e].kept, ev[e].kept,
                                  ev[e].old_prefix, w, scratch);
            held[m] = ev[e].kept + w;
        }
    }
    double elapsed = util_now_s() - t0;
    printf("%5s %12s %8s %9s %14s\n", "layer", "preference", "budget", "kept", "heavy kept");
    uint64_t total = 0;
    for (uint32_t l = 0; l < L; l++) {
        uint32_t k = cakeseq_prefix_len(seq, l), hk = 0, ht = 0;
        for (uint32_t g = 0; g < Hkv; g++) {
            const uint8_t *hv = heavy + ((size_t)l * Hkv + g) * n;
            const uint32_t *pos = cakeseq_positions(seq, l, g);
            for (uint32_t j = 0; j < S; j++)
                ht += hv[j];
            for (uint32_t i = 0; i < k; i++)
                hk += hv[pos[i]];
        }
        total += held[l];
        printf("%5u %12.5g %8u %8.2f%% %7.1f%% of %u\n", l, cakeseq_preference(seq, l),
               cakeseq_budget(seq, l), S ? 100.0 * k / S : 100.0, ht ? 100.0 * hk / ht : 100.0,
               ht / Hkv);
    }
    printf("held after prefill: %llu tokens per kv head over all layers (%.2f%% of the full "
           "cache %llu; budget C*L = %llu)\n", (unsigned long long)total,
           100.0 * total / ((double)n * L), (unsigned long long)n * L, (unsigned long long)C * L);
    printf("peak held during prefill: %llu tokens (full cache would peak at %llu)\n",
           (unsigned long long)peak, (unsigned long long)n * L);
    printf("scoring %.1f ms per layer, whole prefill %.2f s (synthesis included)\n",
           1e3 * t_score / L, elapsed);
    for (uint32_t l = 0; l < L; l++)
        free(kv[l]);
    free(kv), free(q), free(heavy), free(held), free(ind), free(scratch);
    cakeseq_destroy(seq);
    return 0;
}
