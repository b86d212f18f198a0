/* Tenants: identity by (name, uid), caps, weighted shares, minimums. */
#include <criterion/criterion.h>

#include "cake/cake.h"
#include "tenant.h"

#define MB (1ull << 20)

Test(tenant, identity_is_name_and_uid)
{
    struct tenants ts = {0};
    struct tenant *a = tenant_get(&ts, "svc", 1000, 1), *b = tenant_get(&ts, "svc", 1001, 1);
    cr_assert_neq(a, b);
    cr_assert_eq(tenant_get(&ts, "svc", 1000, 0), a);
    cr_assert_null(tenant_get(&ts, "other", 1000, 0));
    /* configured without a uid: claimed by the first uid that attaches */
    cr_assert_eq(tenant_configure(&ts, "batch", -1, 3, 0, 10 * MB), 0);
    struct tenant *c = tenant_get(&ts, "batch", 42, 1);
    cr_assert_eq(c->weight, 3);
    cr_assert_eq(c->uid, 42);
    cr_assert_neq(tenant_get(&ts, "batch", 43, 1), c);
    tenants_fini(&ts);
}

Test(tenant, names)
{
    cr_assert(tenant_name_ok("engine-1.prod_a"));
    cr_assert(!tenant_name_ok(""));
    cr_assert(!tenant_name_ok("a b"));
    cr_assert(!tenant_name_ok("x/y"));
    cr_assert(!tenant_name_ok("0123456789012345678901234567890123456789012345678901234567890123"));
}

Test(tenant, admission_caps_shares_and_minimums)
{
    struct tenants ts = {0};
    uint64_t pool = 100 * MB;
    struct tenant *a = tenant_get(&ts, "a", 1, 1), *b = tenant_get(&ts, "b", 1, 1);
    a->clients = b->clients = 1;
    /* equal weights: half the pool each */
    cr_assert_eq(tenant_cap(&ts, a, pool), 50 * MB);
    cr_assert_eq(tenant_admit(&ts, a, 50 * MB, pool, pool), 0);
    cr_assert_eq(tenant_admit(&ts, a, 51 * MB, pool, pool), CAKE_EOOM);
    /* weights */
    b->weight = 3;
    cr_assert_eq(tenant_cap(&ts, a, pool), 25 * MB);
    /* an explicit maximum wins */
    a->max_bytes = 70 * MB;
    cr_assert_eq(tenant_cap(&ts, a, pool), 70 * MB);
    /* another tenant's unmet minimum is not ours to take */
    b->min_bytes = 40 * MB;
    a->used_bytes = 20 * MB;
    cr_assert_eq(tenant_admit(&ts, a, 40 * MB, 80 * MB, pool), 0);
    cr_assert_eq(tenant_admit(&ts, a, 41 * MB, 80 * MB, pool), CAKE_EOOM);
    /* but b may use its own minimum */
    cr_assert_eq(tenant_admit(&ts, b, 40 * MB, 80 * MB, pool), 0);
    /* never more than is free */
    cr_assert_eq(tenant_admit(&ts, b, 11 * MB, 10 * MB, pool), CAKE_EOOM);
    /* a minimum holds however heavy the others' weights: b's share is 10 MB, its minimum 40 */
    a->max_bytes = 0, a->weight = 9, b->weight = 1, b->used_bytes = 0;
    cr_assert_eq(tenant_cap(&ts, b, pool), 40 * MB);
    cr_assert_eq(tenant_admit(&ts, b, 40 * MB, 80 * MB, pool), 0);
    cr_assert_eq(tenant_admit(&ts, b, 41 * MB, 80 * MB, pool), CAKE_EOOM);
    tenants_fini(&ts);
}
