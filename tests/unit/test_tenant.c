/* Tenants: identity by (name, uid), caps, weighted shares, minimums. */
#include <criterion/criterion.h>
#include <errno.h>

#include "cake/cake.h"
#include "tenant.h"

#define MB (1ull << 20)

Test(tenant, identity_is_name_and_uid)
{
    struct tenants ts = {0};
    int err = 0;
    struct tenant *a = tenant_get(&ts, "svc", 1000, 1, &err), *b = tenant_get(&ts, "svc", 1001, 1, &err);
    cr_assert_neq(a, b);
    cr_assert_neq(a->id, b->id);
    cr_assert_eq(tenant_get(&ts, "svc", 1000, 0, &err), a);
    cr_assert_null(tenant_get(&ts, "other", 1000, 0, &err));
    tenants_fini(&ts);
}

/* A configured tenant names the uids that may be it: any other uid declaring the name is
 * refused (it was claimed by whichever uid attached first). */
Test(tenant, a_configured_name_admits_only_its_uids)
{
    struct tenants ts = {0};
    int err = 0;
    uint32_t uids[] = {42, 44};
    cr_assert_eq(tenant_configure(&ts, "batch", uids, 2, 3, 0, 10 * MB), 0);
    struct tenant *c = tenant_get(&ts, "batch", 42, 1, &err);
    cr_assert_not_null(c);
    cr_assert_eq(c->weight, 3);
    cr_assert_eq(tenant_get(&ts, "batch", 44, 1, &err), c, "both uids are the one tenant");
    cr_assert_null(tenant_get(&ts, "batch", 43, 1, &err));
    cr_assert_eq(err, -EPERM);
    /* a uid already attached under a name as its own tenant cannot be folded into another */
    struct tenant *x = tenant_get(&ts, "web", 7, 1, &err);
    cr_assert_not_null(x);
    uint32_t other[] = {8, 7};
    cr_assert_eq(tenant_configure(&ts, "web", other, 2, 1, 0, 0), -EEXIST);
    uint32_t same[] = {7};
    cr_assert_eq(tenant_configure(&ts, "web", same, 1, 5, 0, 0), 0);
    cr_assert_eq(x->weight, 5);
    cr_assert(x->configured);
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
    int err = 0;
    uint64_t pool = 100 * MB;
    struct tenant *a = tenant_get(&ts, "a", 1, 1, &err), *b = tenant_get(&ts, "b", 1, 1, &err);
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
