/* Window scoring: kern_score_layer against the double-precision reference on fresh random
 * inputs, every dtype combination, paged and contiguous layouts, and thread invariance. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#include "kern.h"
#include "testutil.h"

struct layer {
    uint32_t H, Hkv, d, n, nq, tpp, npages;
    enum kern_dtype qt, kt;
    void *q;
    void **pages;
    struct kern_kv kv;
};

/* Random layer whose keys carry structure (a sink and heavy columns) so the softmax is not
 * flat, in the page layout with tokens_per_page tpp. */
static void make_layer(struct layer *L, uint32_t H, uint32_t Hkv, uint32_t d, uint32_t n,
                       uint32_t nq, uint32_t tpp, enum kern_dtype qt, enum kern_dtype kt)
{
    *L = (struct layer){H, Hkv, d, n, nq, tpp, (n + tpp - 1) / tpp, qt, kt, NULL, NULL, {0}};
    size_t qn = (size_t)H * nq * d;
    float *tmp = malloc(sizeof(float) * (qn > d ? qn : d));
    for (size_t i = 0; i < qn; i++)
        tmp[i] = (float)tu_uniform(-1.5, 1.5);
    L->q = malloc(qn * kern_dtype_size(qt));
    kern_from_f32(qt, tmp, L->q, qn);
    L->pages = calloc(L->npages, sizeof(void *));
    size_t page_bytes = 2 * (size_t)Hkv * tpp * d * kern_dtype_size(kt);
    for (uint32_t p = 0; p < L->npages; p++)
        L->pages[p] = calloc(1, page_bytes);
    L->kv = (struct kern_kv){kt, Hkv, d, tpp, n, L->pages, page_bytes / 2};
    for (uint32_t g = 0; g < Hkv; g++)
        for (uint32_t t = 0; t < n; t++) {
            double amp = (t == 0 || tu_below(17) == 0) ? 3.0 : 1.0;
            for (uint32_t x = 0; x < d; x++)
                tmp[x] = (float)(amp * tu_uniform(-1.0, 1.0));
            kern_from_f32(kt, tmp, kern_kv_key(&L->kv, g, t), d);
        }
    free(tmp);
}

static void free_layer(struct layer *L)
{
    for (uint32_t p = 0; p < L->npages; p++)
        free(L->pages[p]);
    free(L->pages), free(L->q);
}

/* make_layer with a random GQA shape (1 to 3 kv heads, groups of 1 to 4) and pages of 1 to
 * tpp_max tokens. */
static void make_gqa_layer(struct layer *L, uint32_t d, uint32_t n, uint32_t nq, uint32_t tpp_max,
                           enum kern_dtype qt, enum kern_dtype kt)
{
    uint32_t Hkv = 1 + tu_below(3), G = 1 + tu_below(4);
    make_layer(L, Hkv * G, Hkv, d, n, nq, 1 + tu_below(tpp_max), qt, kt);
}

static float *row_lse_without(const struct layer *L, const uint8_t *gone);
/* Each window row's log-sum-exp [H][nq] in double, as an engine's attention would give it
 * (computed here, apart from the kernels). */
static float *row_lse(const struct layer *L)
{
    return row_lse_without(L, NULL);
}

/* The same over the keys that stay: gone[g * n + j] marks kv head g's removed slot j. */
static float *row_lse_without(const struct layer *L, const uint8_t *gone)
{
    float *lse = malloc(sizeof(float) * L->H * L->nq);
    double scale = 1.0 / sqrt((double)L->d);
    for (uint32_t h = 0; h < L->H; h++)
        for (uint32_t i = 0; i < L->nq; i++) {
            uint32_t lim = L->n - L->nq + i + 1;
            double *z = malloc(sizeof(double) * lim), mx = -INFINITY, sum = 0.0;
            for (uint32_t j = 0; j < lim; j++) {
                const void *kp = kern_kv_key(&L->kv, h / (L->H / L->Hkv), j);
                double dot = 0.0;
                for (uint32_t x = 0; x < L->d; x++)
                    dot += (double)kern_load(L->qt, L->q, ((size_t)h * L->nq + i) * L->d + x) *
                           (double)kern_load(L->kt, kp, x);
                z[j] = dot * scale, mx = fmax(mx, z[j]);
            }
            for (uint32_t j = 0; j < lim; j++)
                if (!gone || !gone[(size_t)(h / (L->H / L->Hkv)) * L->n + j])
                    sum += exp(z[j] - mx);
            lse[h * L->nq + i] = (float)(mx + log(sum));
            free(z);
        }
    return lse;
}

/* kern_score_layer (with lse: the engine's normalizers, one pass) against the reference
 * (which computes its own). */
static void check_args(struct layer *L, uint32_t S, float gamma, int threads, double tol,
                       int var_only, enum kern_pool pool, uint32_t pool_kernel, const float *lse)
{
    struct kern_score_args a = {
        .q = L->q, .q_dtype = L->qt, .q_heads = L->H, .n_q = L->nq, .kv = &L->kv,
        .n_scored = S, .gamma = gamma, .stats = KERN_STATS_FP32, .n_threads = threads,
        .var_only = var_only, .pool = pool, .pool_kernel = pool_kernel,
    };
    float *got = malloc(sizeof(float) * L->Hkv * (S + 1)), *want = malloc(sizeof(float) * L->Hkv * (S + 1));
    struct kern_score_out o = {.indicator = got}, r = {.indicator = want};
    cr_assert_eq(kern_score_layer_ref(&a, &r), 0);
    a.lse = lse;
    cr_assert_eq(kern_score_layer(&a, &o), 0);
    if (S) {
        cr_assert(fabs(o.entropy - r.entropy) <= tol * fabs(r.entropy),
                  "entropy %.9g vs %.9g (n=%u S=%u q=%s k=%s)", o.entropy, r.entropy, L->n, S,
                  kern_dtype_name(L->qt), kern_dtype_name(L->kt));
        cr_assert(fabs(o.variance - r.variance) <= tol * fabs(r.variance) + 1e-30,
                  "variance %.9g vs %.9g", o.variance, r.variance);
    }
    for (uint32_t g = 0; g < L->Hkv; g++) {
        double mx = 0;
        for (uint32_t j = 0; j < S; j++)
            mx = fmax(mx, fabs(want[g * S + j]));
        for (uint32_t j = 0; j < S; j++)
            cr_assert(fabs(got[g * S + j] - want[g * S + j]) <= tol * mx,
                      "indicator g%u j%u: %.9g vs %.9g (max %.9g, q=%s k=%s)", g, j,
                      got[g * S + j], want[g * S + j], mx, kern_dtype_name(L->qt),
                      kern_dtype_name(L->kt));
    }
    free(got), free(want);
}

static void check_against_ref(struct layer *L, uint32_t S, float gamma, int threads, double tol)
{
    check_args(L, S, gamma, threads, tol, 0, KERN_POOL_AVG, 0, NULL);
}

/* The baseline policies' indicators: mean alone (gamma 0), variance alone, max / avg / no
 * pooling with other kernel sizes, every one against the reference, GQA groups of 1..4. */
Test(score, indicator_variants_match_reference)
{
    tu_seed();
    enum kern_pool pools[3] = {KERN_POOL_AVG, KERN_POOL_MAX, KERN_POOL_NONE};
    for (int rep = 0; rep < 9; rep++) {
        struct layer L;
        uint32_t nq = 2 + tu_below(20), n = nq + 20 + tu_below(3000), k = 1 + 2 * tu_below(5);
        make_gqa_layer(&L, 32, n, nq, 200, KERN_BF16, KERN_BF16);
        int var_only = rep % 3 == 2;
        float gamma = rep % 3 == 0 ? 0.0f : 200.0f;
        check_args(&L, n - nq, gamma, 1 + tu_below(3), 2e-4, var_only, pools[rep / 3], k, NULL);
        free_layer(&L);
    }
    /* an even kernel or an unknown pooling is refused */
    struct layer L;
    make_layer(&L, 2, 1, 16, 40, 4, 40, KERN_F32, KERN_F32);
    float ind[64];
    struct kern_score_args a = {.q = L.q, .q_dtype = L.qt, .q_heads = 2, .n_q = 4, .kv = &L.kv,
                                .n_scored = 36, .pool_kernel = 4};
    struct kern_score_out o = {.indicator = ind};
    cr_assert_eq(kern_score_layer(&a, &o), -EINVAL);
    a.pool_kernel = 3, a.pool = (enum kern_pool)7;
    cr_assert_eq(kern_score_layer(&a, &o), -EINVAL);
    free_layer(&L);
}

/* With the engine's log-sum-exp of each window row (computed apart, in double), one pass
 * gives the reference's indicator, entropy and variance: every dtype, GQA groups of 1..4,
 * paged layouts, CAKE's pooling and the SnapKV family's. And the lse is what is used: one
 * that is ln 2 too large halves every probability (gamma 0, no pooling: half the mean). */
Test(score, one_pass_with_the_engines_lse_matches_the_reference)
{
    tu_seed();
    enum kern_dtype ts[3] = {KERN_F32, KERN_F16, KERN_BF16};
    for (int rep = 0; rep < 9; rep++) {
        struct layer L;
        uint32_t nq = 1 + tu_below(32), n = nq + 20 + tu_below(2000);
        make_gqa_layer(&L, 64, n, nq, 300, ts[rep % 3], ts[rep / 3]);
        float *lse = row_lse(&L);
        int max7 = rep % 2;
        check_args(&L, n - nq, 200.0f, 1 + tu_below(3), 2e-4, 0,
                   max7 ? KERN_POOL_MAX : KERN_POOL_AVG, max7 ? 7 : 0, lse);
        free(lse);
        free_layer(&L);
    }
    struct layer L;
    make_layer(&L, 4, 2, 32, 500, 8, 64, KERN_F32, KERN_F32);
    float *lse = row_lse(&L), got[2 * 492], want[2 * 492];
    struct kern_score_args a = {.q = L.q, .q_dtype = L.qt, .q_heads = 4, .n_q = 8, .kv = &L.kv,
                                .n_scored = 492, .pool = KERN_POOL_NONE};
    struct kern_score_out o = {.indicator = got}, r = {.indicator = want};
    cr_assert_eq(kern_score_layer(&a, &r), 0);
    for (int i = 0; i < 4 * 8; i++)
        lse[i] += (float)M_LN2;
    a.lse = lse;
    cr_assert_eq(kern_score_layer(&a, &o), 0);
    for (int j = 0; j < 2 * 492; j++)
        cr_assert(fabsf(got[j] - want[j] / 2) <= 1e-4f * fabsf(want[j]) + 1e-9f,
                  "slot %d: %g, half of %g", j, got[j], want[j]);
    free(lse);
    free_layer(&L);
}

/* kern_score_lse (the first pass alone) against row_lse's doubles: every dtype pair, paged
 * layouts, GQA groups, 1 to 32 rows (causal), any thread count; bad arguments refused. */
Test(score, first_pass_lse_matches_doubles)
{
    tu_seed();
    enum kern_dtype ts[3] = {KERN_F32, KERN_F16, KERN_BF16};
    for (int rep = 0; rep < 9; rep++) {
        struct layer L;
        uint32_t Hkv = 1 + tu_below(3), G = 1 + tu_below(8), nq = rep < 3 ? 1 : 1 + tu_below(32);
        uint32_t n = nq + 1 + tu_below(3000);
        make_layer(&L, Hkv * G, Hkv, rep % 2 ? 128 : 64, n, nq, 1 + tu_below(300), ts[rep % 3],
                   ts[rep / 3]);
        float *want = row_lse(&L), *got = malloc(sizeof(float) * L.H * nq);
        struct kern_score_args a = {.q = L.q, .q_dtype = L.qt, .q_heads = L.H, .n_q = nq,
                                    .kv = &L.kv, .n_threads = 1 + (int)tu_below(3)};
        cr_assert_eq(kern_score_lse(&a, got), 0);
        for (uint32_t r = 0; r < L.H * nq; r++)
            cr_assert(fabsf(got[r] - want[r]) <= 2e-5f * fmaxf(1.0f, fabsf(want[r])),
                      "rep %d row %u: %.7g, doubles %.7g", rep, r, got[r], want[r]);
        free(want), free(got);
        free_layer(&L);
    }
    struct layer L;
    make_layer(&L, 4, 2, 32, 50, 4, 8, KERN_F32, KERN_F32);
    float out[16];
    struct kern_score_args a = {.q = L.q, .q_dtype = L.qt, .q_heads = 4, .n_q = 4, .kv = &L.kv};
    cr_assert_eq(kern_score_lse(&a, NULL), -EINVAL);
    a.q_heads = 3;
    cr_assert_eq(kern_score_lse(&a, out), -EINVAL, "q_heads not a multiple of kv_heads");
    a.q_heads = 4, a.n_q = 51;
    cr_assert_eq(kern_score_lse(&a, out), -EINVAL, "more rows than keys");
    free_layer(&L);
}

/* kern_lse_carry against the rows' log-sum-exps over the keys that stay, in doubles: a decode
 * step's one removed slot a head up to a fifth of the prefix, every dtype pair, paged layouts;
 * NaN where the removed keys held over half a row's weight, and for a NaN row; in place;
 * unsorted or out-of-range kept slots refused. */
Test(score, carried_lse_matches_the_cache_left)
{
    tu_seed();
    enum kern_dtype ts[3] = {KERN_F32, KERN_F16, KERN_BF16};
    for (int rep = 0; rep < 9; rep++) {
        struct layer L;
        uint32_t nq = 1 + tu_below(32), n = nq + 50 + tu_below(2000), S = n - nq;
        make_gqa_layer(&L, rep % 2 ? 128 : 64, n, nq, 200, ts[rep % 3], ts[rep / 3]);
        uint32_t Hkv = L.Hkv;
        uint32_t gone_n = rep < 3 ? 1 : 1 + tu_below(S / 5), k = S - gone_n;
        uint8_t *gone = calloc((size_t)Hkv * n, 1);
        uint32_t *kept = malloc(sizeof(uint32_t) * Hkv * (k + 1));
        for (uint32_t g = 0; g < Hkv; g++) {
            for (uint32_t m = 0; m < gone_n;) { /* gone_n distinct slots of the prefix */
                uint32_t j = tu_below(S);
                if (!gone[(size_t)g * n + j])
                    gone[(size_t)g * n + j] = 1, m++;
            }
            for (uint32_t j = 0, at = 0; j < S; j++)
                if (!gone[(size_t)g * n + j])
                    kept[(size_t)g * k + at++] = j;
        }
        float *before = row_lse(&L), *want = row_lse_without(&L, gone);
        float *got = malloc(sizeof(float) * L.H * nq);
        struct kern_score_args a = {.q = L.q, .q_dtype = L.qt, .q_heads = L.H, .n_q = nq, .kv = &L.kv,
                                    .n_scored = S};
        cr_assert_eq(kern_lse_carry(&a, before, kept, k, got), 0);
        for (uint32_t r = 0; r < L.H * nq; r++) {
            /* the removed keys' weight in doubles: over half, NaN; else the value left */
            double w = 1.0 - exp((double)want[r] - (double)before[r]);
            if (w > 0.5 + 1e-3) {
                cr_assert(isnan(got[r]), "rep %d row %u: removed weight %.4f, got %g", rep, r, w, got[r]);
            } else if (w < 0.5 - 1e-3) {
                cr_assert(fabsf(got[r] - want[r]) <= 1e-4f * fmaxf(1.0f, fabsf(want[r])),
                          "rep %d row %u: %.7g, doubles %.7g (before %.7g)", rep, r, got[r], want[r], before[r]);
            }
        }
        cr_assert_eq(kern_lse_carry(&a, before, kept, k, before), 0, "in place");
        cr_assert_eq(memcmp(before, got, sizeof(float) * L.H * nq), 0, "in place: the same values");
        if (k >= 2) {
            uint32_t t = kept[0];
            kept[0] = kept[1], kept[1] = t;
            cr_assert_eq(kern_lse_carry(&a, want, kept, k, got), -EINVAL, "kept slots not ascending");
            kept[1] = kept[0], kept[0] = t;
        }
        uint32_t last = kept[k - 1];
        kept[k - 1] = S;
        cr_assert_eq(kern_lse_carry(&a, want, kept, k, got), -EINVAL, "a kept slot past the prefix");
        kept[k - 1] = last;
        a.n_scored = n + 1;
        cr_assert_eq(kern_lse_carry(&a, want, kept, k, got), -EINVAL, "a prefix past the cache");
        a.n_scored = S;
        /* the NaN rule on its own: a row whose given value is 30 below the truth makes the
         * removed keys' terms e^30 times their weight (past half); a NaN row stays NaN */
        float *low = row_lse(&L);
        low[0] -= 30.0f, low[L.H * nq - 1] = NAN;
        cr_assert_eq(kern_lse_carry(&a, low, kept, k, got), 0);
        cr_assert(isnan(got[0]) && isnan(got[L.H * nq - 1]), "rep %d: %g, %g", rep, got[0], got[L.H * nq - 1]);
        free(low);
        free(before), free(want), free(got), free(gone), free(kept);
        free_layer(&L);
    }
}

Test(score, matches_double_reference_all_dtypes)
{
    tu_seed();
    enum kern_dtype ts[3] = {KERN_F32, KERN_F16, KERN_BF16};
    for (int qi = 0; qi < 3; qi++)
        for (int ki = 0; ki < 3; ki++) {
            struct layer L;
            uint32_t n = 200 + tu_below(3000), w = 1 + tu_below(32);
            make_layer(&L, 8, 2, 64, n, w, n, ts[qi], ts[ki]);
            check_against_ref(&L, n - w, 200.0f, 2, 2e-4);
            free_layer(&L);
        }
}

Test(score, paged_layout_and_odd_shapes)
{
    tu_seed();
    for (int rep = 0; rep < 6; rep++) {
        struct layer L;
        uint32_t Hkv = 1 + tu_below(4), G = 1 + tu_below(4), d = 8 * (1 + tu_below(16));
        uint32_t nq = 2 + tu_below(31), n = nq + 1 + tu_below(5000), tpp = 1 + tu_below(300);
        make_layer(&L, Hkv * G, Hkv, d, n, nq, tpp, KERN_BF16, KERN_BF16);
        check_against_ref(&L, n - nq - tu_below(1 + (n - nq) / 2), (float)tu_uniform(0, 300),
                          1 + tu_below(3), 2e-4);
        free_layer(&L);
    }
}

Test(score, single_query_row_and_tiny_prompts)
{
    tu_seed();
    struct layer L;
    make_layer(&L, 4, 2, 32, 50, 1, 50, KERN_F16, KERN_F16); /* decode: one query, no var */
    check_against_ref(&L, 40, 200.0f, 1, 2e-4);
    free_layer(&L);
    make_layer(&L, 4, 4, 16, 3, 2, 3, KERN_F32, KERN_F32); /* S = 1: pooling of one */
    check_against_ref(&L, 1, 200.0f, 1, 2e-4);
    free_layer(&L);
    make_layer(&L, 2, 1, 16, 5, 5, 5, KERN_F32, KERN_F32); /* n = w: nothing scored */
    check_against_ref(&L, 0, 200.0f, 1, 2e-4);
    free_layer(&L);
}

Test(score, same_result_for_any_thread_count)
{
    tu_seed();
    struct layer L;
    make_layer(&L, 8, 4, 64, 9000, 32, 1024, KERN_BF16, KERN_BF16);
    uint32_t S = 9000 - 32;
    float *a1 = malloc(sizeof(float) * 4 * S), *a2 = malloc(sizeof(float) * 4 * S);
    struct kern_score_args a = {
        .q = L.q, .q_dtype = L.qt, .q_heads = 8, .n_q = 32, .kv = &L.kv, .n_scored = S,
        .gamma = 200.0f, .n_threads = 1,
    };
    struct kern_score_out o1 = {.indicator = a1}, o2 = {.indicator = a2};
    cr_assert_eq(kern_score_layer(&a, &o1), 0);
    a.n_threads = 3;
    cr_assert_eq(kern_score_layer(&a, &o2), 0);
    cr_assert_eq(o1.entropy, o2.entropy);
    cr_assert_eq(o1.variance, o2.variance);
    cr_assert_eq(memcmp(a1, a2, sizeof(float) * 4 * S), 0);
    free(a1), free(a2);
    free_layer(&L);
}

Test(score, parity_rounding_to_half_stays_close)
{
    /* parity mode with a half model dtype rounds probabilities and statistics the way the
     * reference stores them: close to the exact values at the dtype's precision, and not
     * identical to the unrounded result */
    tu_seed();
    struct layer L;
    make_layer(&L, 4, 2, 32, 700, 16, 700, KERN_F16, KERN_F16);
    uint32_t S = 700 - 16;
    float *x = malloc(sizeof(float) * 2 * S), *y = malloc(sizeof(float) * 2 * S);
    struct kern_score_args a = {
        .q = L.q, .q_dtype = L.qt, .q_heads = 4, .n_q = 16, .kv = &L.kv, .n_scored = S,
        .gamma = 200.0f, .stats = KERN_STATS_REF, .round_dtype = KERN_F16, .n_threads = 1,
    };
    struct kern_score_out o = {.indicator = x}, r = {.indicator = y};
    cr_assert_eq(kern_score_layer(&a, &o), 0);
    cr_assert_eq(kern_score_layer_ref(&a, &r), 0);
    cr_assert(fabs(o.entropy - r.entropy) <= 5e-3 * r.entropy);
    cr_assert(fabs(o.variance - r.variance) <= 2e-2 * r.variance);
    int differs = 0;
    for (uint32_t g = 0; g < 2; g++) {
        double mx = 0;
        for (uint32_t j = 0; j < S; j++)
            mx = fmax(mx, y[g * S + j]);
        for (uint32_t j = 0; j < S; j++) {
            cr_assert(fabs(x[g * S + j] - y[g * S + j]) <= 1e-2 * mx);
            differs |= x[g * S + j] != y[g * S + j];
            /* every stored value is representable in f16 */
            cr_assert_eq(x[g * S + j], kern_round_to(KERN_F16, x[g * S + j]));
        }
    }
    cr_assert(differs);
    free(x), free(y);
    free_layer(&L);
}

Test(score, rejects_inconsistent_arguments)
{
    struct layer L;
    tu_seed();
    make_layer(&L, 6, 4, 16, 40, 8, 40, KERN_F32, KERN_F32); /* 6 heads over 4 kv heads */
    float ind[4 * 40];
    struct kern_score_args a = {
        .q = L.q, .q_dtype = L.qt, .q_heads = 6, .n_q = 8, .kv = &L.kv, .n_scored = 32,
    };
    struct kern_score_out o = {.indicator = ind};
    cr_assert_eq(kern_score_layer(&a, &o), -EINVAL);
    a.q_heads = 8, a.n_scored = 33; /* S > n - n_q */
    cr_assert_eq(kern_score_layer(&a, &o), -EINVAL);
    a.n_scored = 32, a.n_q = 0;
    cr_assert_eq(kern_score_layer(&a, &o), -EINVAL);
    free_layer(&L);
}
