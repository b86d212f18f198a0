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

#define MB (1u << 20)

Test(pool, segments_are_sealed_memfds_given_out_on_first_use)
{
    struct pool p;
    const char *why = NULL;
    cr_assert_eq(pool_init(&p, 32 * MB, 65536, 0, 0, &why), 0, "%s", why ? why : "");
    cr_assert_eq(p.pages, 512);
    cr_assert_eq(p.seg_bytes, 4 * MB);
    cr_assert_eq(p.n_segs, 8);
    for (uint32_t i = 0; i < p.n_segs; i++)
        cr_assert_eq(p.seg[i].fd, -1, "no memory before a segment has an owner");
    int64_t pg = pool_alloc(&p, 1);
    cr_assert_geq(pg, 0);
    uint32_t sg = pool_seg_of(&p, (uint32_t)pg);
    int fd = p.seg[sg].fd;
    cr_assert_geq(fd, 0);
    cr_assert_eq(p.seg[sg].owner, 1);
    /* what a client receives: that fd; neither shrinking nor growing is allowed */
    cr_assert_eq(ftruncate(fd, 4096), -1);
    cr_assert_eq(errno, EPERM);
    cr_assert_eq(ftruncate(fd, 8 * MB), -1);
    cr_assert_eq(errno, EPERM);
    cr_assert_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), -1); /* seals are sealed */
    int seals = fcntl(fd, F_GET_SEALS);
    cr_assert(seals & F_SEAL_SHRINK && seals & F_SEAL_GROW && seals & F_SEAL_SEAL);
    /* a second mapping sees the daemon's writes at the same offset in the segment */
    uint8_t *m = mmap(NULL, p.seg_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert_neq(m, MAP_FAILED);
    memcpy(pool_ptr(&p, (uint32_t)pg), "cake", 4);
    cr_assert_eq(memcmp(m + ((uint64_t)pg * 65536 - (uint64_t)sg * p.seg_bytes), "cake", 4), 0);
    munmap(m, p.seg_bytes);
    /* the rest of the range holds no memory (a client reserving it the same way would fault) */
    cr_assert_eq(pool_owned_segs(&p, 1), 1);
    pool_fini(&p);
}

Test(pool, rejects_bad_sizes)
{
    struct pool p;
    const char *why;
    cr_assert_eq(pool_init(&p, 1 << 20, 3000, 0, 0, &why), -EINVAL);
    cr_assert_eq(pool_init(&p, 1000, 4096, 0, 0, &why), -EINVAL);
    cr_assert_eq(pool_init(&p, 32 * MB, 65536, 3 * MB, 0, &why), -EINVAL); /* not a power of two */
    cr_assert_eq(pool_init(&p, 32 * MB, 1 * MB, 4 * MB, 0, &why), -EINVAL); /* under 64 pages */
}

Test(pool, default_segments_stay_under_the_cap)
{
    cr_assert_eq(pool_default_seg_bytes(1ull << 30, 65536), 4 * MB);
    uint64_t s = pool_default_seg_bytes(100ull << 30, 65536);
    cr_assert_leq((100ull << 30) / s, POOL_MAX_SEGS);
    cr_assert_eq(s & (s - 1), 0);
    cr_assert_geq(pool_default_seg_bytes(1ull << 30, 1 * MB), 64 * MB); /* 64 pages at least */
}

/* An empty segment that changes owner gets a new memfd: the old owner's mapping (a client
 * that still maps it) neither sees the new owner's data nor keeps the old data. */
Test(pool, a_segment_changing_owner_gets_fresh_memory)
{
    struct pool p;
    const char *why;
    cr_assert_eq(pool_init(&p, 4 * MB, 65536, 0, 0, &why), 0); /* one segment */
    int64_t a = pool_alloc(&p, 1);
    cr_assert_eq(a, 0);
    memcpy(pool_ptr(&p, 0), "secret of 1", 12);
    uint8_t *old = mmap(NULL, 4 * MB, PROT_READ | PROT_WRITE, MAP_SHARED, p.seg[0].fd, 0);
    cr_assert_neq(old, MAP_FAILED);
    cr_assert_eq(pool_alloc(&p, 2), -1, "a segment in use is never another owner's");
    pool_free_run(&p, 0, 1);
    uint32_t gen = p.seg[0].gen;
    /* owner 1 takes it back cheaply: same memory, same generation */
    cr_assert_eq(pool_alloc(&p, 1), 0);
    cr_assert_eq(p.seg[0].gen, gen);
    pool_free_run(&p, 0, 1);
    int64_t b = pool_alloc(&p, 2);
    cr_assert_eq(b, 0);
    cr_assert_eq(p.seg[0].owner, 2);
    cr_assert_gt(p.seg[0].gen, gen);
    cr_assert_eq(p.recycled, 1);
    cr_assert_eq(memcmp(pool_ptr(&p, 0), "\0\0\0\0\0\0", 6), 0, "fresh memory starts zeroed");
    memcpy(pool_ptr(&p, 0), "secret of 2", 12);
    cr_assert_eq(memcmp(old, "\0\0\0\0\0\0", 6), 0, "the old owner's data was punched out");
    memcpy(old, "scribble", 8); /* the old owner writes where it still maps */
    cr_assert_eq(memcmp(pool_ptr(&p, 0), "secret of 2", 12), 0, "and it lands in no one's page");
    munmap(old, 4 * MB);
    pool_fini(&p);
}

Test(pool, allocator_matches_a_model)
{
    tu_seed();
    struct pool p;
    const char *why;
    uint32_t N = 1000; /* not a multiple of 64: the tail bits must never be handed out */
    cr_assert_eq(pool_init(&p, (uint64_t)N * 4096, 4096, 4 * MB / 8, 0, &why), -EINVAL);
    /* 4 KiB pages, 4 MiB segments: 1024 pages each; use 16 KiB pages for 4 segments */
    N = 900;
    cr_assert_eq(pool_init(&p, (uint64_t)N * 16384, 16384, 0, 0, &why), 0, "%s", why);
    cr_assert_eq(p.seg_pages, 256);
    uint8_t *owned = calloc(N, 1);
    uint32_t used = 0;
    struct { uint32_t first, n, owner; int pinned; } runs[4096];
    uint32_t nr = 0;
    for (int step = 0; step < 20000; step++) {
        if (nr && (tu_below(2) || nr == 4096)) {
            uint32_t i = tu_below(nr);
            if (runs[i].pinned)
                for (uint32_t k = 0; k < runs[i].n; k++) {
                    uint32_t pg = runs[i].first + k;
                    pool_pin(&p, &pg, 1, -1);
                }
            pool_free_run(&p, runs[i].first, runs[i].n);
            for (uint32_t k = 0; k < runs[i].n; k++)
                owned[runs[i].first + k] = 0;
            used -= runs[i].n;
            runs[i] = runs[--nr];
        } else {
            uint32_t n = 1 + tu_below(tu_below(4) ? 3 : 40), who = 1 + tu_below(3);
            int pinned = !tu_below(4);
            uint32_t list[40];
            int64_t f = !pinned ? pool_alloc_run(&p, n, who) /* placed with pinned pages: */
                        : pool_alloc_list(&p, n, who, POOL_PINNED, list) ? -1 /* one run, */
                        : (int64_t)list[0];                               /* same refusals */
            if (f < 0) {
                /* refused: then no free run of n pages lies in segments who may use (its
                 * own, or empty ones) */
                uint32_t run = 0, best = 0;
                for (uint32_t k = 0; k < N; k++) {
                    uint32_t sg = k / p.seg_pages;
                    int ok = !owned[k] && (p.seg[sg].owner == who || p.seg[sg].used == 0);
                    run = ok ? run + 1 : 0, best = run > best ? run : best;
                }
                cr_assert_lt(best, n, "a run of %u was free but refused", n);
                continue;
            }
            cr_assert(f >= 0 && f + n <= N);
            for (uint32_t k = 0; k < n; k++) {
                cr_assert_eq(owned[f + k], 0, "page %u handed out twice", (uint32_t)f + k);
                cr_assert_eq(p.seg[(f + k) / p.seg_pages].owner, who,
                             "page %u is in another owner's segment", (uint32_t)f + k);
                owned[f + k] = (uint8_t)who;
            }
            if (pinned)
                for (uint32_t k = 0; k < n; k++) {
                    uint32_t pg = (uint32_t)f + k;
                    pool_pin(&p, &pg, 1, 1);
                }
            runs[nr].first = (uint32_t)f, runs[nr].n = n, runs[nr].owner = who;
            runs[nr].pinned = pinned, nr++;
            used += n;
        }
        cr_assert_eq(p.used, used);
        /* what pool_avail keeps as it goes equals a count from scratch */
        for (uint32_t who = 1; who <= 3; who++) {
            uint64_t avail = 0;
            for (uint32_t sg = 0; sg < p.n_segs; sg++)
                if (p.seg[sg].owner == who || !p.seg[sg].used)
                    avail += pool_seg_pages(&p, sg) - p.seg[sg].used;
            cr_assert_eq(pool_avail(&p, who), avail, "owner %u", who);
        }
        /* every page in use lies in its user's segment */
        for (uint32_t k = 0; k < N; k += 7)
            if (owned[k])
                cr_assert_eq(p.seg[k / p.seg_pages].owner, owned[k]);
    }
    free(owned);
    pool_fini(&p);
}

/* Sequences open and fill one after another (a descriptor's pinned pages, then its K/V):
 * the pinned pages share one segment (pages that move leave it a reserve of an eighth), so
 * every other segment can drain; and pages that move still fill the pinned segment's room
 * once the rest of the pool is full. */
Test(pool, pinned_pages_crowd_one_segment)
{
    struct pool p;
    const char *why;
    cr_assert_eq(pool_init(&p, 64 * MB, 16384, 0, 0, &why), 0); /* 16 segments of 256 pages */
    cr_assert_eq(p.n_segs, 16);
    for (int seq = 0; seq < 8; seq++) {
        uint32_t d[3];
        cr_assert_eq(pool_alloc_list(&p, 3, 1, POOL_PINNED | POOL_SCATTER, d), 0);
        pool_pin(&p, d, 3, 1);
        for (int k = 0; k < 400; k++)
            cr_assert_geq(pool_alloc(&p, 1), 0);
    }
    uint32_t pinned_segs = 0, pinned_seg = 0;
    for (uint32_t i = 0; i < p.n_segs; i++)
        if (p.seg[i].pinned)
            pinned_segs++, pinned_seg = i;
    cr_assert_eq(pinned_segs, 1, "8 descriptors in %u segments", pinned_segs);
    uint64_t moving, in_use = p.used, in_pinned = p.seg[pinned_seg].used;
    cr_assert_eq(pool_drain(&p, 1, 2, UINT64_MAX, UINT64_MAX, &moving),
                 (uint64_t)256 * (pool_owned_segs(&p, 1) - 1), "all but the pinned segment");
    cr_assert_eq(moving, in_use - in_pinned);
    pool_undrain(&p, 2);
    /* the rest of the pool, then the pinned segment's reserve */
    while (pool_alloc(&p, 1) >= 0)
        ;
    cr_assert_eq(p.used, p.pages, "every page given out");
    pool_fini(&p);
}

/* pool_avail's answer from the segments themselves (the model pool.h describes). */
static uint64_t avail_model(const struct pool *p, uint32_t owner)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < p->n_segs; i++) {
        const struct pool_seg *g = &p->seg[i];
        uint64_t sp = pool_seg_pages(p, i);
        if (!g->used)
            n += !g->drain || g->drain == owner ? sp : 0;
        else if (g->owner == owner && !g->drain)
            n += sp - g->used;
    }
    return n;
}

/* Draining a segment of owner 1 for owner 2: 1 gets no page there (nor counts its free
 * ones), the segment never drains while a page of it is pinned, once empty it is 2's alone
 * (3 cannot take it, 2 can, with fresh memory), and undraining gives everything back. */
Test(pool, a_draining_segment_empties_for_its_beneficiary_alone)
{
    struct pool p;
    const char *why;
    cr_assert_eq(pool_init(&p, 16 * MB, 65536, 0, 0, &why), 0); /* 4 segments of 64 pages */
    uint32_t a[64 * 3];
    cr_assert_eq(pool_alloc_list(&p, 64 * 3, 1, POOL_SCATTER, a), 0); /* owner 1 fills three segments */
    /* free some pages: 40 in segment 0, 10 in segment 1, none in 2 */
    pool_free_list(&p, a, 40);
    pool_free_list(&p, a + 64, 10);
    pool_pin(&p, a + 128, 1, 1); /* segment 2 holds a page that never moves */
    cr_assert_eq(pool_avail(&p, 1), 40 + 10 + 64);
    uint64_t moving;
    cr_assert_eq(pool_drain(&p, 1, 2, 1, 10, &moving), 0, "a segment is more than `most`");
    /* the emptiest first: segment 0 (24 in use), then 1; never 2 (pinned) */
    cr_assert_eq(pool_drain(&p, 1, 2, 100, 1000, &moving), 128);
    cr_assert_eq(moving, 24 + 54);
    cr_assert_eq(p.seg[0].drain, 2);
    cr_assert_eq(p.seg[1].drain, 2);
    cr_assert_eq(p.seg[2].drain, 0);
    cr_assert_eq(p.draining, 2);
    for (uint32_t o = 1; o <= 3; o++)
        cr_assert_eq(pool_avail(&p, o), avail_model(&p, o), "owner %u", o);
    cr_assert_eq(pool_avail(&p, 1), 64, "1's free pages in draining segments are not its own");
    cr_assert(pool_page_draining(&p, a[50]));
    cr_assert(!pool_page_draining(&p, a[130]));
    /* 1 allocates only outside them: the empty segment 3 */
    int64_t x = pool_alloc(&p, 1);
    cr_assert_eq(pool_seg_of(&p, (uint32_t)x), 3);
    cr_assert_eq(pool_alloc_in(&p, 1), 3 * 64 + 1, "its segments in use: 3 now, never 0 or 1");
    pool_free_run(&p, 3 * 64 + 1, 1);
    /* 1's pages leave segment 0: empty, it is promised to 2 */
    pool_free_list(&p, a + 40, 24);
    cr_assert_eq(p.draining, 1);
    cr_assert_eq(p.promised, 64);
    for (uint32_t o = 1; o <= 3; o++)
        cr_assert_eq(pool_avail(&p, o), avail_model(&p, o), "owner %u", o);
    uint32_t b[64];
    cr_assert_eq(pool_alloc_list(&p, 64, 3, POOL_SCATTER, b), -1, "3 cannot take 2's promised segment");
    uint32_t gen = p.seg[0].gen;
    cr_assert_eq(pool_alloc_run(&p, 64, 2), 0, "2 takes it whole");
    cr_assert_eq(p.seg[0].owner, 2);
    cr_assert_gt(p.seg[0].gen, gen, "with fresh memory");
    cr_assert_eq(p.seg[0].drain, 0);
    cr_assert_eq(p.promised, 0);
    /* withdrawn: segment 1 is 1's again, its free pages too */
    pool_undrain(&p, 2);
    cr_assert_eq(p.draining, 0);
    cr_assert_eq(p.seg[1].drain, 0);
    for (uint32_t o = 1; o <= 3; o++)
        cr_assert_eq(pool_avail(&p, o), avail_model(&p, o), "owner %u", o);
    cr_assert_eq(pool_avail(&p, 1), 10 + 63);
    pool_pin(&p, a + 128, 1, -1);
    pool_fini(&p);
}
