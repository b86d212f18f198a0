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
    struct tenant_quota q = {.weight = 3, .max_bytes = 10 * MB};
    cr_assert_eq(tenant_configure(&ts, "batch", uids, 2, &q), 0);
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
    struct tenant_quota one = {.weight = 1}, five = {.weight = 5};
    cr_assert_eq(tenant_configure(&ts, "web", other, 2, &one), -EEXIST);
    uint32_t same[] = {7};
    cr_assert_eq(tenant_configure(&ts, "web", same, 1, &five), 0);
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

/* The GPU pools have their own guarantees and caps (gpu-min, gpu-max), weighted shares
 * otherwise, and a tenant never takes another's unmet GPU minimum; host and GPU accounting
 * do not mix. */
Test(tenant, gpu_admission_has_its_own_minimums_and_caps)
{
    struct tenants ts = {0};
    uint32_t ua[] = {1}, ub[] = {2}, uc[] = {3};
    struct tenant_quota qa = {.weight = 1, .gpu_max_bytes = 30 * MB},
                        qb = {.weight = 3, .gpu_min_bytes = 40 * MB}, qc = {.weight = 1};
    cr_assert_eq(tenant_configure(&ts, "a", ua, 1, &qa), 0);
    cr_assert_eq(tenant_configure(&ts, "b", ub, 1, &qb), 0);
    cr_assert_eq(tenant_configure(&ts, "c", uc, 1, &qc), 0);
    int err;
    struct tenant *a = tenant_get(&ts, "a", 1, 0, &err), *b = tenant_get(&ts, "b", 2, 0, &err),
                  *c = tenant_get(&ts, "c", 3, 0, &err);
    const uint64_t pool = 100 * MB;
    cr_assert_eq(tenant_cap_gpu(&ts, a, pool), 30 * MB, "gpu-max caps");
    cr_assert_eq(tenant_cap_gpu(&ts, b, pool), 60 * MB, "weight 3 of 5");
    cr_assert_eq(tenant_cap_gpu(&ts, c, pool), 20 * MB, "weight 1 of 5");
    cr_assert_eq(tenant_admit_gpu(&ts, a, 31 * MB, pool, pool), CAKE_EOOM, "over gpu-max");
    cr_assert_eq(tenant_admit_gpu(&ts, a, 30 * MB, pool, pool), 0);
    tenant_charge_gpu(a, 30 * MB);
    /* 70 MB free, 40 MB of it b's unmet minimum: c may take 20 (its share), not 31 */
    cr_assert_eq(tenant_admit_gpu(&ts, c, 20 * MB, 70 * MB, pool), 0);
    tenant_charge_gpu(c, 20 * MB);
    cr_assert_eq(tenant_admit_gpu(&ts, c, 1 * MB, 50 * MB, pool), CAKE_EOOM, "over its share");
    qc.weight = 10; /* even with a larger share, c cannot reach into b's minimum */
    cr_assert_eq(tenant_configure(&ts, "c", uc, 1, &qc), 0);
    cr_assert_eq(tenant_admit_gpu(&ts, c, 11 * MB, 50 * MB, pool), CAKE_EOOM, "b's minimum");
    cr_assert_eq(tenant_admit_gpu(&ts, c, 10 * MB, 50 * MB, pool), 0);
    cr_assert_eq(tenant_admit_gpu(&ts, b, 40 * MB, 50 * MB, pool), 0, "b's own minimum");
    /* the host pool is not the GPU's: b's GPU minimum reserves nothing there */
    cr_assert_eq(tenant_admit(&ts, c, 70 * MB, 70 * MB, pool), 0);
    cr_assert_eq(tenant_admit_gpu(&ts, c, 70 * MB, 70 * MB, pool), CAKE_EOOM);
    tenant_charge_gpu(a, -(int64_t)(30 * MB));
    tenant_charge_gpu(c, -(int64_t)(20 * MB));
    tenants_fini(&ts);
}

/* tenant_room is what admission compares with (bytes fit exactly when bytes <= room), and
 * says which bound binds: the tenant's own cap, or the pool (what others' unmet minimums
 * leave of it) - pressure.c takes room from the tenant's own sequences in either case. */
Test(tenant, room_is_admission_and_names_its_bound)
{
    struct tenants ts = {0};
    int err = 0, own = -1;
    uint32_t u[] = {1};
    struct tenant_quota q = {.weight = 1, .max_bytes = 40 * MB};
    cr_assert_eq(tenant_configure(&ts, "capped", u, 1, &q), 0);
    struct tenant *a = tenant_get(&ts, "capped", 1, 1, &err);
    uint32_t v[] = {2};
    struct tenant_quota m = {.weight = 1, .min_bytes = 30 * MB};
    cr_assert_eq(tenant_configure(&ts, "reserved", v, 1, &m), 0);
    uint64_t pool = 100 * MB;
    tenant_charge(a, 25 * MB);
    /* free 100 - 25 = 75, of which 30 are the other's minimum: 45 left; a's cap leaves 15 */
    cr_assert_eq(tenant_room(&ts, a, 0, 75 * MB, pool, &own), 15 * MB);
    cr_assert_eq(own, 1, "its own cap binds");
    cr_assert_eq(tenant_admit(&ts, a, 15 * MB, 75 * MB, pool), 0);
    cr_assert_eq(tenant_admit(&ts, a, 15 * MB + 1, 75 * MB, pool), CAKE_EOOM);
    /* with 40 free the others' minimum leaves 10: the pool binds */
    cr_assert_eq(tenant_room(&ts, a, 0, 40 * MB, pool, &own), 10 * MB);
    cr_assert_eq(own, 0, "the pool binds");
    cr_assert_eq(tenant_admit(&ts, a, 10 * MB + 1, 40 * MB, pool), CAKE_EOOM);
    /* over its cap (a lowered maximum): no room, never a wrapped-around one */
    tenant_charge(a, 20 * MB);
    cr_assert_eq(tenant_room(&ts, a, 0, 75 * MB, pool, NULL), 0);
    /* the GPU pools have their own bounds */
    cr_assert_eq(tenant_room(&ts, a, 1, 75 * MB, pool, &own), 50 * MB,
                 "no GPU maximum: its weighted share (two configured tenants of weight 1)");
    cr_assert_eq(own, 1);
    tenant_charge(a, -45 * (int64_t)MB);
    tenants_fini(&ts);
}
