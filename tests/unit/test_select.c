/* Top-k selection against a sort-based reference: ties, NaN, both output orders. */
#include <criterion/criterion.h>
#include <math.h>

#include "kern.h"
#include "testutil.h"

struct ent {
    float v;
    uint32_t pos;
};

static int rank_cmp(const void *a, const void *b)
{
    const struct ent *x = a, *y = b;
    int xn = isnan(x->v), yn = isnan(y->v);
    if (xn != yn)
        return xn ? 1 : -1; /* NaN ranks lowest */
    if (!xn && x->v != y->v)
        return x->v > y->v ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static void check(const float *s, uint32_t n, uint32_t k)
{
    struct ent *e = malloc(sizeof(*e) * (n + 1));
    uint32_t *want = malloc(sizeof(uint32_t) * (n + 1)), *got = malloc(sizeof(uint32_t) * (n + 1));
    for (uint32_t i = 0; i < n; i++)
        e[i] = (struct ent){s[i], i};
    qsort(e, n, sizeof(*e), rank_cmp);
    uint32_t kk = k < n ? k : n;
    /* score order: exactly the sorted prefix */
    cr_assert_eq(kern_topk(s, n, k, KERN_ORDER_SCORE, got), kk);
    for (uint32_t i = 0; i < kk; i++)
        cr_assert_eq(got[i], e[i].pos, "score order: rank %u got %u want %u (n=%u k=%u)", i,
                     got[i], e[i].pos, n, k);
    /* position order: the same set, ascending */
    for (uint32_t i = 0; i < kk; i++)
        want[i] = e[i].pos;
    qsort(want, kk, sizeof(uint32_t), tu_cmp_u32);
    cr_assert_eq(kern_topk(s, n, k, KERN_ORDER_POSITION, got), kk);
    for (uint32_t i = 0; i < kk; i++)
        cr_assert_eq(got[i], want[i], "position order: %u got %u want %u", i, got[i], want[i]);
    free(e), free(want), free(got);
}

Test(select, random_with_ties)
{
    tu_seed();
    for (int rep = 0; rep < 50; rep++) {
        uint32_t n = 1 + tu_below(5000), k = tu_below(n + 3);
        float *s = malloc(sizeof(float) * n);
        int levels = rep % 3 == 0 ? 4 : 0; /* heavy ties every third round */
        for (uint32_t i = 0; i < n; i++)
            s[i] = levels ? (float)tu_below(levels) : (float)tu_uniform(-1e3, 1e3);
        check(s, n, k);
        free(s);
    }
}

Test(select, special_values)
{
    float s[] = {NAN, 0.0f, -0.0f, INFINITY, -INFINITY, 1e-40f, -1e-40f, 3.0f, NAN, 3.0f};
    for (uint32_t k = 0; k <= 11; k++)
        check(s, 10, k);
}

Test(select, all_equal_keeps_lowest_positions)
{
    float s[100];
    uint32_t idx[100];
    for (int i = 0; i < 100; i++)
        s[i] = 0.5f;
    cr_assert_eq(kern_topk(s, 100, 7, KERN_ORDER_POSITION, idx), 7);
    for (uint32_t i = 0; i < 7; i++)
        cr_assert_eq(idx[i], i);
}
