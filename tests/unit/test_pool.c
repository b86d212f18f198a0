/* The host pool: sealed memfd, page allocator against a model, contiguous runs. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pool.h"
#include "testutil.h"

Test(pool, sealed_against_resizing)
{
    struct pool p;
    const char *why = NULL;
    cr_assert_eq(pool_init(&p, 1 << 20, 65536, 0, &why), 0, "%s", why ? why : "");
    cr_assert_eq(p.pages, 16);
    /* what a client receives: the same fd; neither shrinking nor growing is allowed */
    cr_assert_eq(ftruncate(p.fd, 4096), -1);
    cr_assert_eq(errno, EPERM);
    cr_assert_eq(ftruncate(p.fd, 1 << 22), -1);
    cr_assert_eq(errno, EPERM);
    cr_assert_eq(fcntl(p.fd, F_ADD_SEALS, F_SEAL_WRITE), -1); /* seals are sealed */
    int seals = fcntl(p.fd, F_GET_SEALS);
    cr_assert(seals & F_SEAL_SHRINK && seals & F_SEAL_GROW && seals & F_SEAL_SEAL);
    /* a second mapping sees the daemon's writes */
    void *m = mmap(NULL, p.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, p.fd, 0);
    cr_assert_neq(m, MAP_FAILED);
    memcpy(pool_ptr(&p, 3), "cake", 4);
    cr_assert_eq(memcmp((char *)m + 3 * 65536, "cake", 4), 0);
    munmap(m, p.bytes);
    pool_fini(&p);
}

Test(pool, rejects_bad_sizes)
{
    struct pool p;
    const char *why;
    cr_assert_eq(pool_init(&p, 1 << 20, 3000, 0, &why), -EINVAL);
    cr_assert_eq(pool_init(&p, 1000, 4096, 0, &why), -EINVAL);
}

Test(pool, allocator_matches_a_model)
{
    tu_seed();
    struct pool p;
    const char *why;
    uint32_t N = 1000; /* not a multiple of 64: the tail bits must never be handed out */
    cr_assert_eq(pool_init(&p, (uint64_t)N * 4096, 4096, 0, &why), 0);
    uint8_t *owned = calloc(N, 1);
    uint32_t used = 0;
    struct { uint32_t first, n; } runs[4096];
    uint32_t nr = 0;
    for (int step = 0; step < 20000; step++) {
        if (nr && (tu_below(2) || nr == 4096)) {
            uint32_t i = tu_below(nr);
            pool_free_run(&p, runs[i].first, runs[i].n);
            for (uint32_t k = 0; k < runs[i].n; k++)
                owned[runs[i].first + k] = 0;
            used -= runs[i].n;
            runs[i] = runs[--nr];
        } else {
            uint32_t n = 1 + tu_below(tu_below(4) ? 3 : 40);
            int64_t f = pool_alloc_run(&p, n);
            if (f < 0) {
                /* refused: then no free run of n pages may exist */
                uint32_t run = 0, best = 0;
                for (uint32_t k = 0; k < N; k++)
                    run = owned[k] ? 0 : run + 1, best = run > best ? run : best;
                cr_assert_lt(best, n, "a run of %u was free but refused", n);
                continue;
            }
            cr_assert(f >= 0 && f + n <= N);
            for (uint32_t k = 0; k < n; k++) {
                cr_assert_eq(owned[f + k], 0, "page %u handed out twice", (uint32_t)f + k);
                owned[f + k] = 1;
            }
            runs[nr].first = (uint32_t)f, runs[nr].n = n, nr++;
            used += n;
        }
        cr_assert_eq(p.used, used);
    }
    free(owned);
    pool_fini(&p);
}
