/* Decode-phase eviction per mode against a brute-force ranking of the double-precision
 * scores. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "evict.h"
#include "testutil.h"

struct ent {
    double v;
    uint32_t pos;
};

static int rank_cmp(const void *a, const void *b)
{
    const struct ent *x = a, *y = b;
    if (x->v != y->v)
        return x->v > y->v ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static void run(enum policy_mode mode)
{
    uint32_t Hkv = 1 + tu_below(3), G = 1 + tu_below(3), H = Hkv * G, d = 32, w = 4 + tu_below(12);
    uint32_t N = w + 20 + tu_below(400), budget = 1 + tu_below(N - w), nq = mode == POLICY_FIXED ? w : 1 + tu_below(w);
    size_t kvn = (size_t)Hkv * N * d;
    float *kf = malloc(sizeof(float) * 2 * kvn), *qf = malloc(sizeof(float) * H * nq * d);
    for (size_t i = 0; i < 2 * kvn; i++)
        kf[i] = (float)tu_uniform(-2, 2);
    for (size_t i = 0; i < (size_t)H * nq * d; i++)
        qf[i] = (float)tu_uniform(-2, 2);
    void *page = kf;
    struct kern_kv kv = {KERN_F32, Hkv, d, N, N, &page, kvn * 4};
    struct policy_cfg cfg;
    policy_cfg_default(&cfg, 1, w + budget);
    cfg.mode = mode, cfg.window = w, cfg.model_dtype = KERN_F32;
    uint32_t S = N - w;
    uint32_t *slots = malloc(sizeof(uint32_t) * Hkv * S);
    float *ind = malloc(sizeof(float) * Hkv * S), *ref = malloc(sizeof(float) * Hkv * S);
    int kept = evict_decode_select(&cfg, budget, &kv, qf, NULL, KERN_F32, H, nq, slots, ind, 2);
    cr_assert_eq(kept, (int)budget);
    /* the expected scores: parity = last query only, mean; fixed = all nq rows, mean+g*var */
    const float *qsel = qf;
    float *last = NULL;
    uint32_t rows = nq;
    if (mode == POLICY_PARITY) {
        last = malloc(sizeof(float) * H * d);
        for (uint32_t h = 0; h < H; h++)
            memcpy(last + h * d, qf + ((size_t)h * nq + nq - 1) * d, sizeof(float) * d);
        qsel = last, rows = 1;
    }
    struct kern_score_args a = {
        .q = qsel, .q_dtype = KERN_F32, .q_heads = H, .n_q = rows, .kv = &kv, .n_scored = S,
        .gamma = mode == POLICY_PARITY ? 0.0f : cfg.gamma,
    };
    struct kern_score_out o = {.indicator = ref};
    cr_assert_eq(kern_score_layer_ref(&a, &o), 0);
    struct ent *e = malloc(sizeof(*e) * S);
    for (uint32_t g = 0; g < Hkv; g++) {
        double mx = 0;
        for (uint32_t j = 0; j < S; j++)
            e[j] = (struct ent){ref[g * S + j], j}, mx = fmax(mx, ref[g * S + j]);
        qsort(e, S, sizeof(*e), rank_cmp);
        const uint32_t *got = slots + g * budget;
        if (mode == POLICY_FIXED) {
            for (uint32_t i = 1; i < budget; i++)
                cr_assert(got[i] > got[i - 1], "fixed keeps positional order");
        } else {
            for (uint32_t i = 1; i < budget; i++) /* parity keeps descending-score order */
                cr_assert(ind[g * S + got[i]] <= ind[g * S + got[i - 1]]);
        }
        /* the same set up to near-ties at the threshold (float vs double): every kept token
         * at or above the cut, every dropped one at or below it, within 1e-5 of the largest
         * score (a swap of two near-ties shifts every position between them in the sorted
         * lists, so the sets are compared, not the lists) */
        uint8_t *in = calloc(S, 1);
        for (uint32_t i = 0; i < budget; i++) {
            cr_assert(got[i] < S && !in[got[i]], "head %u: slot %u out of range or twice", g, got[i]);
            in[got[i]] = 1;
        }
        double thr = e[budget - 1].v, eps = 1e-5 * mx;
        for (uint32_t j = 0; j < S; j++)
            cr_assert(in[j] ? ref[g * S + j] >= thr - eps : ref[g * S + j] <= thr + eps,
                      "head %u: slot %u (%.9g) %s, the cut at %.9g", g, j, ref[g * S + j],
                      in[j] ? "kept below" : "dropped above", thr);
        free(in);
    }
    free(e), free(last), free(kf), free(qf), free(slots), free(ind), free(ref);
}

Test(evict, parity_ranks_by_the_current_query)
{
    tu_seed();
    for (int rep = 0; rep < 40; rep++)
        run(POLICY_PARITY);
}

Test(evict, fixed_ranks_by_mean_plus_variance_of_recent_queries)
{
    tu_seed();
    for (int rep = 0; rep < 40; rep++)
        run(POLICY_FIXED);
}

Test(evict, refuses_a_layer_without_candidates)
{
    float k[2 * 4 * 8] = {0}, q[8] = {0};
    void *page = k;
    struct kern_kv kv = {KERN_F32, 1, 8, 4, 4, &page, sizeof k / 2};
    struct policy_cfg cfg;
    policy_cfg_default(&cfg, 1, 8);
    cfg.window = 4;
    uint32_t slots[4];
    float ind[4];
    cr_assert_eq(evict_decode_select(&cfg, 2, &kv, q, NULL, KERN_F32, 1, 1, slots, ind, 1), -EINVAL);
}

/* H2O's rule against a brute-force ranking: accumulated scores added, the top `kept` of the
 * first S by score in positional order (ties to the lower position), and the scores follow
 * the kept tokens, then the window's, zeros after. */
Test(evict, h2o_keeps_the_top_accumulated_and_the_scores_follow)
{
    tu_seed();
    for (int round = 0; round < 200; round++) {
        uint32_t Hkv = 1 + tu_below(4), w = 1 + tu_below(8), S = 1 + tu_below(300);
        uint32_t n = S + w - 1, cap = S + w + tu_below(5), kept = 1 + tu_below(S);
        float *acc = calloc((size_t)Hkv * cap, sizeof(float)), *ind = malloc(sizeof(float) * Hkv * n);
        float *want = malloc(sizeof(float) * Hkv * cap);
        for (uint32_t i = 0; i < Hkv * cap; i++)
            acc[i] = (float)tu_below(round % 2 ? 4 : 1000); /* few values: many ties */
        for (uint32_t i = 0; i < Hkv * n; i++)
            ind[i] = (float)tu_below(round % 2 ? 3 : 1000);
        for (uint32_t g = 0; g < Hkv; g++)
            for (uint32_t j = 0; j < cap; j++)
                want[g * cap + j] = acc[g * cap + j] + (j < n ? ind[g * n + j] : 0.0f);
        evict_h2o_add(acc, cap, ind, Hkv, n);
        for (uint32_t i = 0; i < Hkv * cap; i++)
            cr_assert_eq(acc[i], want[i]);
        for (uint32_t g = 0; g < Hkv; g++) {
            float *a = want + (size_t)g * cap;
            /* brute force: a token stays if fewer than `kept` beat it (higher, or equal and
             * earlier) */
            uint32_t ref[512], nr = 0;
            for (uint32_t j = 0; j < S; j++) {
                uint32_t beat = 0;
                for (uint32_t k = 0; k < S; k++)
                    beat += a[k] > a[j] || (a[k] == a[j] && k < j);
                if (beat < kept)
                    ref[nr++] = j;
            }
            cr_assert_eq(nr, kept);
            uint32_t slots[512];
            float *ag = acc + (size_t)g * cap;
            evict_h2o_keep(ag, cap, S, w, kept, slots);
            for (uint32_t i = 0; i < kept; i++) {
                cr_assert_eq(slots[i], ref[i], "round %d head %u: slot %u", round, g, i);
                cr_assert_eq(ag[i], a[ref[i]]);
            }
            for (uint32_t i = 0; i < w; i++)
                cr_assert_eq(ag[kept + i], a[S + i]);
            for (uint32_t i = kept + w; i < cap; i++)
                cr_assert_eq(ag[i], 0.0f);
        }
        free(acc), free(ind), free(want);
    }
}
