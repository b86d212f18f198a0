/* Budget allocation: the reference's adjust_budgets vectors (shared/CAKE.md 1.5), parity
 * shares, and fixed mode's capped water-filling on random inputs. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "policy.h"
#include "testutil.h"

static void expect(const int64_t *got, const int64_t *want, uint32_t n)
{
    for (uint32_t l = 0; l < n; l++)
        cr_assert_eq(got[l], want[l], "b[%u] = %lld, want %lld", l, (long long)got[l],
                     (long long)want[l]);
}

Test(policy, adjust_budgets_vectors_from_cake_md)
{
    int64_t b[4];
    double f1[4] = {10.9, 10.9, 10.9, 10.9};
    policy_adjust_budgets(f1, 4, 46, 1000, b);
    expect(b, (int64_t[]){12, 12, 11, 11}, 4);
    double f2[4] = {149.99999776, 90.00000224, 30, 30};
    policy_adjust_budgets(f2, 4, 300, 100, b);
    expect(b, (int64_t[]){100, 107, 47, 46}, 4);
    /* the caller's clamp throws budget away: 293 of 300 */
    float P[4] = {0.5f, 0.3f, 0.1f, 0.1f};
    policy_budgets_parity(P, 4, 300, 100, b);
    expect(b, (int64_t[]){100, 100, 47, 46}, 4);
}

Test(policy, parity_cascading_stages_are_not_monotone)
{
    /* P = [1, 1, 0.01, 100], T = 300, S = 200: layer 2 rises 1 -> 31 */
    float P[4] = {1, 1, 0.01f, 100};
    int64_t want[4][4] = {{200}, {150, 150}, {150, 149, 1}, {35, 34, 31, 200}}, b[4];
    for (uint32_t m = 0; m < 4; m++) {
        policy_budgets_parity(P, m + 1, 300, 200, b);
        expect(b, want[m], m + 1);
    }
}

Test(policy, fixed_total_is_exact_and_caps_hold)
{
    tu_seed();
    for (int rep = 0; rep < 2000; rep++) {
        uint32_t n = 1 + tu_below(64);
        double P[64];
        int64_t cap[64], b[64], capsum = 0;
        for (uint32_t l = 0; l < n; l++) {
            P[l] = tu_below(5) == 0 ? 0.0 : tu_uniform(0, 10) * pow(10, tu_uniform(-3, 3));
            cap[l] = tu_below(4) == 0 ? 0 : tu_below(3000);
            capsum += cap[l];
        }
        int64_t T = tu_below(60000);
        policy_budgets_fixed(P, cap, n, T, b);
        int64_t sum = 0;
        for (uint32_t l = 0; l < n; l++) {
            cr_assert(b[l] >= 0 && b[l] <= cap[l], "b[%u]=%lld cap %lld", l, (long long)b[l],
                      (long long)cap[l]);
            sum += b[l];
        }
        cr_assert_eq(sum, T < capsum ? T : capsum);
    }
}

Test(policy, fixed_uncapped_is_proportional)
{
    tu_seed();
    for (int rep = 0; rep < 500; rep++) {
        uint32_t n = 1 + tu_below(40);
        double P[40], psum = 0;
        int64_t cap[40], b[40], T = tu_below(100000);
        for (uint32_t l = 0; l < n; l++) {
            P[l] = tu_uniform(0.01, 5);
            psum += P[l];
            cap[l] = INT64_C(1) << 40;
        }
        cr_assert_eq(policy_budgets_fixed(P, cap, n, T, b), 0);
        for (uint32_t l = 0; l < n; l++) {
            double f = P[l] / psum * (double)T;
            cr_assert(b[l] == (int64_t)floor(f) || b[l] == (int64_t)ceil(f),
                      "b[%u]=%lld share %.3f", l, (long long)b[l], f);
        }
    }
}

Test(policy, fixed_water_filling_respreads_capped_excess)
{
    /* one dominant layer capped at 100: the other three share the rest equally */
    double P[4] = {100, 1, 1, 1};
    int64_t cap[4] = {100, 1000, 1000, 1000}, b[4];
    policy_budgets_fixed(P, cap, 4, 400, b);
    expect(b, (int64_t[]){100, 100, 100, 100}, 4);
    /* largest remainder, ties to the lower layer */
    double Q[3] = {1, 1, 1};
    int64_t cap3[3] = {50, 50, 50};
    policy_budgets_fixed(Q, cap3, 3, 100, b);
    expect(b, (int64_t[]){34, 33, 33}, 3);
}

Test(policy, fixed_falls_back_to_uniform_on_unusable_preferences)
{
    int64_t cap[3] = {100, 100, 100}, b[3];
    double zero[3] = {0, 0, 0}, nan_[3] = {1, NAN, 1}, neg[3] = {1, -1, 1}, inf_[3] = {1, INFINITY, 1};
    cr_assert_eq(policy_budgets_fixed(zero, cap, 3, 90, b), 1);
    expect(b, (int64_t[]){30, 30, 30}, 3);
    cr_assert_eq(policy_budgets_fixed(nan_, cap, 3, 90, b), 1);
    expect(b, (int64_t[]){30, 30, 30}, 3);
    cr_assert_eq(policy_budgets_fixed(neg, cap, 3, 90, b), 1);
    cr_assert_eq(policy_budgets_fixed(inf_, cap, 3, 90, b), 1);
}

Test(policy, early_exit_and_decode_rules_per_mode)
{
    struct policy_cfg c;
    policy_cfg_default(&c, 4, 128);
    c.window = 32;
    c.mode = POLICY_PARITY;
    cr_assert(policy_prefill_early_exit(&c, 160));  /* n <= C + w */
    cr_assert(!policy_prefill_early_exit(&c, 161));
    cr_assert(policy_prefill_early_exit(&c, 1));    /* n <= w: nothing to score */
    c.mode = POLICY_FIXED;
    cr_assert(policy_prefill_early_exit(&c, 128));  /* n <= C */
    cr_assert(!policy_prefill_early_exit(&c, 129));
    c.decode_slack = 8;
    cr_assert(!policy_decode_should_evict(&c, 96, 136));
    cr_assert(policy_decode_should_evict(&c, 96, 137));
    c.mode = POLICY_PARITY; /* parity has no slack */
    cr_assert(policy_decode_should_evict(&c, 96, 129));
}

Test(policy, config_validation)
{
    struct policy_cfg c;
    policy_cfg_default(&c, 32, 1024);
    cr_assert_null(policy_cfg_check(&c));
    c.cache_size = 16;
    cr_assert_not_null(policy_cfg_check(&c));
    policy_cfg_default(&c, 0, 1024);
    cr_assert_not_null(policy_cfg_check(&c));
    policy_cfg_default(&c, 4, 1024);
    c.tau1 = 0;
    cr_assert_not_null(policy_cfg_check(&c));
}

/* Every kind resolves to its documented components; ablation overrides stay; bad
 * combinations are refused with a reason. */
Test(policy, kinds_resolve_and_validate)
{
    struct policy_cfg c;
    for (int k = 0; k < POLICY_KIND_COUNT; k++) {
        policy_cfg_default(&c, 8, 256);
        c.kind = (enum policy_kind)k;
        cr_assert_null(policy_cfg_check(&c), "%s: %s", policy_kind_name(c.kind), policy_cfg_check(&c));
        policy_cfg_resolve(&c);
        cr_assert_neq(c.alloc, POLICY_ALLOC_DEFAULT);
        cr_assert_neq(c.indicator, POLICY_IND_DEFAULT);
        cr_assert_eq(c.pool_kernel % 2, 1);
        cr_assert_eq(policy_kind_parse(policy_kind_name(c.kind)), k);
        struct policy_cfg again = c;
        policy_cfg_resolve(&again);
        cr_assert_eq(memcmp(&again, &c, sizeof(c)), 0, "resolve is idempotent");
    }
    policy_cfg_default(&c, 8, 256);
    c.kind = POLICY_CAKE, c.alloc = POLICY_ALLOC_PYRAMID, c.indicator = POLICY_IND_VAR;
    policy_cfg_resolve(&c);
    cr_assert_eq(c.alloc, POLICY_ALLOC_PYRAMID);
    cr_assert_eq(c.indicator, POLICY_IND_VAR);
    cr_assert_eq(c.pool, POLICY_POOL_AVG);
    cr_assert_eq(c.pool_kernel, 5);
    policy_cfg_default(&c, 8, 256);
    c.kind = POLICY_SNAPKV, c.mode = POLICY_PARITY;
    cr_assert_not_null(policy_cfg_check(&c));
    policy_cfg_default(&c, 8, 256);
    c.kind = POLICY_ADAKV, c.alloc = POLICY_ALLOC_PREFERENCE;
    cr_assert_not_null(policy_cfg_check(&c));
    policy_cfg_default(&c, 8, 256);
    c.kind = (enum policy_kind)99;
    cr_assert_not_null(policy_cfg_check(&c));
    policy_cfg_default(&c, 8, 256);
    c.pool_kernel = 4;
    cr_assert_not_null(policy_cfg_check(&c));
    cr_assert_eq(policy_kind_parse("nope"), -1);
}

/* What cachectl seq shows: every component as the policy runs, the kind's own filled in. */
static const char *describe(enum policy_kind k, uint32_t run_width, enum policy_decode d)
{
    static char buf[POLICY_DESCRIBE_MAX];
    struct policy_cfg c;
    policy_cfg_default(&c, 8, 256);
    c.kind = k, c.run_width = run_width, c.decode = d;
    cr_assert_null(policy_cfg_check(&c));
    policy_cfg_resolve(&c);
    return policy_describe(&c, buf, sizeof buf);
}

Test(policy, describe_names_every_component)
{
    cr_assert_str_eq(describe(POLICY_CAKE, 0, 0), "alloc preference (tau 1/1, gamma 200), "
                     "indicator mean+var, pool avg 5, decode evict, window 32");
    cr_assert_str_eq(describe(POLICY_SNAPKV, 15, POLICY_DECODE_EVICT), "alloc uniform, "
                     "indicator mean, pool max 7, decode evict, window 32, runs of 15");
    cr_assert_str_eq(describe(POLICY_ADAKV, 0, 0), "alloc uniform, indicator mean, pool max 7, "
                     "decode prefill-only, window 32, per-head budgets (alpha 0.2)");
    cr_assert_str_eq(describe(POLICY_STREAMING, 0, 0), "alloc uniform, indicator position, "
                     "pool none, decode evict, window 32, sinks 4");
    cr_assert_str_eq(describe(POLICY_H2O, 0, 0), "alloc uniform, indicator mean accumulated, "
                     "pool none, decode evict, window 32");
    cr_assert_str_eq(describe(POLICY_TOVA, 0, 0), "alloc uniform, indicator last, pool none, "
                     "decode evict, window 32, one set for all heads");
    cr_assert_str_eq(describe(POLICY_PYRAMIDKV, 0, 0), "alloc pyramid (beta 20), indicator "
                     "mean, pool max 7, decode prefill-only, window 32");
    struct policy_cfg c;
    policy_cfg_default(&c, 8, 256);
    c.tau1 = 0.5f, c.tau2 = 4.0f, c.cascading = 0, c.decode_slack = 8;
    policy_cfg_resolve(&c);
    char buf[POLICY_DESCRIBE_MAX];
    cr_assert_str_eq(policy_describe(&c, buf, sizeof buf), "alloc preference (tau 0.5/4, "
                     "gamma 200, no cascade), indicator mean+var, pool avg 5, decode evict "
                     "(slack 8), window 32");
    char small[16];
    memset(small, 'x', sizeof small);
    cr_assert_str_eq(policy_describe(&c, small, sizeof small), "alloc prefer...",
                     "a short buffer is cut and says so");
}

/* run_width reshapes a scored prefill selection: odd, up to 255, fixed mode, and only where
 * the kept set is one top of a score that the prefill fixes. */
Test(policy, run_width_validates)
{
    struct policy_cfg c;
    static const enum policy_kind ok[] = {POLICY_CAKE, POLICY_SNAPKV, POLICY_PYRAMIDKV,
                                          POLICY_TOVA, POLICY_FULL};
    static const enum policy_kind refused[] = {POLICY_ADAKV, POLICY_H2O, POLICY_STREAMING};
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        policy_cfg_default(&c, 8, 256);
        c.kind = ok[i], c.run_width = 15;
        cr_assert_null(policy_cfg_check(&c), "%s: %s", policy_kind_name(c.kind), policy_cfg_check(&c));
    }
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        policy_cfg_default(&c, 8, 256);
        c.kind = refused[i], c.run_width = 15;
        cr_assert_not_null(policy_cfg_check(&c), "%s", policy_kind_name(c.kind));
        c.run_width = 1; /* off */
        cr_assert_null(policy_cfg_check(&c));
    }
    static const uint32_t bad[] = {2, 14, 257, 0xffffffffu};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        policy_cfg_default(&c, 8, 256);
        c.run_width = bad[i];
        cr_assert_not_null(policy_cfg_check(&c), "run_width %u", bad[i]);
    }
    policy_cfg_default(&c, 8, 256);
    c.run_width = 255;
    cr_assert_null(policy_cfg_check(&c));
    c.mode = POLICY_PARITY;
    cr_assert_not_null(policy_cfg_check(&c));
    policy_cfg_default(&c, 8, 256);
    c.indicator = POLICY_IND_POSITION, c.run_width = 3;
    cr_assert_not_null(policy_cfg_check(&c));
}

/* The ranking worked by hand (width 3): 1 takes [0, 2]; 5 takes [4, 6]; 4 is taken; 8 takes
 * [7, 9]; 10 meets 9; 11 takes [10, 11] (clipped at the end); 3 is left, ranked last. */
Test(policy, runs_rank_worked_example)
{
    float v[12] = {0.1f, 0.9f, 0.2f, 0.3f, 0.8f, 0.85f, 0.0f, 0.05f, 0.7f, 0.4f, 0.6f, 0.5f};
    static const float want[12] = {11, 12, 10, 1, 8, 9, 7, 5, 6, 4, 2, 3};
    uint64_t key[24];
    uint8_t taken[12];
    policy_runs_rank(v, 12, 3, key, taken);
    for (int j = 0; j < 12; j++)
        cr_assert_eq(v[j], want[j], "position %d: rank %g, want %g", j, v[j], want[j]);
    float one[1] = {-INFINITY};
    policy_runs_rank(one, 1, 255, key, taken); /* a run wider than the prefix */
    cr_assert_eq(one[0], 1.0f);
}

/* PyramidKV's arithmetic: the shared test vector below follows KVCache-Factory's formula by
 * hand (avg 96, beta 20: min 4, max 188, step 26 over 8 layers). */
Test(policy, pyramid_and_uniform_budgets)
{
    struct policy_cfg c;
    policy_cfg_default(&c, 8, 128);
    c.window = 32, c.alloc = POLICY_ALLOC_PYRAMID, c.pyramid_beta = 20.0f;
    int64_t b[8], want[8] = {188, 162, 136, 110, 84, 58, 32, 6};
    cr_assert(policy_budgets_static(&c, 10000, b));
    for (int l = 0; l < 8; l++)
        cr_assert_eq(b[l], want[l], "layer %d: %lld", l, (long long)b[l]);
    cr_assert(policy_budgets_static(&c, 150, b)); /* S < 2 avg: uniform */
    for (int l = 0; l < 8; l++)
        cr_assert_eq(b[l], 96);
    cr_assert(policy_budgets_static(&c, 100, b) && b[0] == 96);
    c.alloc = POLICY_ALLOC_NONE;
    cr_assert(policy_budgets_static(&c, 777, b) && b[7] == 777);
    c.alloc = POLICY_ALLOC_PREFERENCE;
    cr_assert_eq(policy_budgets_static(&c, 777, b), 0);
}

/* Ada-KV: budgets sum to heads * B, each within [0, S], and a head holding most of the
 * layer's top scores gets more than one holding none (but at least the floor). */
Test(policy, ada_head_budgets)
{
    struct policy_cfg c;
    policy_cfg_default(&c, 1, 64);
    c.kind = POLICY_ADAKV;
    policy_cfg_resolve(&c);
    enum { HK = 4, SS = 200 };
    /* heap, not stack: the test runner's stack is not aligned for AVX-512 stores */
    float *ind = malloc(sizeof(float) * HK * SS);
    for (int g = 0; g < HK; g++)
        for (int j = 0; j < SS; j++)
            ind[g * SS + j] = g == 1 ? 1.0f + (float)j : g == 2 ? 0.5f : 0.001f * (float)j;
    uint32_t bg[HK];
    cr_assert_eq(policy_head_budgets(&c, ind, HK, SS, 32, bg), 0);
    uint32_t sum = 0;
    for (int g = 0; g < HK; g++)
    {
        sum += bg[g];
        cr_assert_leq(bg[g], SS);
    }
    cr_assert_eq(sum, HK * 32);
    cr_assert_gt(bg[1], bg[0]);
    cr_assert_geq(bg[0], 6); /* floor(0.2 * 32) */
    cr_assert_geq(bg[3], 6);
    free(ind);
}
