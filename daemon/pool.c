/* pool.c - the segmented page pool (see pool.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/memfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "pool.h"
#include "window.h"

uint64_t pool_default_seg_bytes(uint64_t bytes, uint64_t page_bytes)
{
    uint64_t s = POOL_MIN_SEG_BYTES;
    while (s < 64 * page_bytes || (bytes + s - 1) / s > POOL_MAX_SEGS)
        s *= 2;
    return s;
}

static int check_size(uint64_t bytes, uint64_t page_bytes, uint64_t *seg_bytes, uint64_t *pages,
                      const char **why)
{
    if (page_bytes < POOL_MIN_PAGE_BYTES || (page_bytes & (page_bytes - 1))) {
        *why = "page size must be a power of two of at least 4 KiB";
        return -EINVAL;
    }
    *pages = bytes / page_bytes;
    if (*pages == 0 || *pages > POOL_MAX_PAGES) {
        *why = "pool must hold between 1 and 2^28 pages";
        return -EINVAL;
    }
    if (!*seg_bytes)
        *seg_bytes = pool_default_seg_bytes(bytes, page_bytes);
    /* whole bitmap words per segment: a word never spans two owners */
    if ((*seg_bytes & (*seg_bytes - 1)) || *seg_bytes < 64 * page_bytes ||
        *seg_bytes < POOL_MIN_SEG_BYTES) {
        *why = "segment size must be a power of two of at least 4 MiB and 64 pages";
        return -EINVAL;
    }
    if ((*pages * page_bytes + *seg_bytes - 1) / *seg_bytes > 65536) {
        *why = "pool must hold at most 65536 segments";
        return -EINVAL;
    }
    return 0;
}

static int init_common(struct pool *p, uint64_t pages, uint64_t page_bytes, uint64_t seg_bytes,
                       const char **why)
{
    p->page_bytes = page_bytes, p->seg_bytes = seg_bytes;
    p->seg_pages = (uint32_t)(seg_bytes / page_bytes);
    p->pages = (uint32_t)pages;
    p->bytes = pages * page_bytes;
    p->n_segs = (uint32_t)((pages + p->seg_pages - 1) / p->seg_pages);
    p->bitmap = calloc((pages + 63) / 64, sizeof(uint64_t));
    p->seg = calloc(p->n_segs, sizeof(*p->seg));
    p->owned_free = calloc(POOL_MAX_OWNERS + 1, sizeof(uint64_t));
    p->promised_to = calloc(POOL_MAX_OWNERS + 1, sizeof(uint64_t));
    p->empty_pages = pages;
    if (!p->bitmap || !p->seg || !p->owned_free || !p->promised_to) {
        *why = "out of memory for the page bitmap";
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < p->n_segs; i++)
        p->seg[i].fd = -1;
    /* bits past the last page are permanently in use */
    if (pages % 64)
        p->bitmap[pages / 64] = ~((UINT64_C(1) << (pages % 64)) - 1);
    return 0;
}

int pool_init(struct pool *p, uint64_t bytes, uint64_t page_bytes, uint64_t seg_bytes, int huge,
              const char **why)
{
    memset(p, 0, sizeof(*p));
    uint64_t pages;
    int rc = check_size(bytes, page_bytes, &seg_bytes, &pages, why);
    if (rc)
        return rc;
    if ((rc = init_common(p, pages, page_bytes, seg_bytes, why))) {
        pool_fini(p);
        return rc;
    }
    /* the whole range is reserved now (no memory behind it), segments are mapped into it */
    void *base = mmap(NULL, p->bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        rc = -errno;
        pool_fini(p);
        *why = "cannot reserve the pool's address range";
        return rc;
    }
    p->base = base;
    p->hugepages = huge; /* tried per segment; cleared at the first refusal */
    return 0;
}

int pool_init_external(struct pool *p, void *base, uint64_t bytes, uint64_t page_bytes,
                       uint64_t seg_bytes, const struct pool_ops *ops, const char **why)
{
    memset(p, 0, sizeof(*p));
    uint64_t pages;
    int rc = check_size(bytes, page_bytes, &seg_bytes, &pages, why);
    if (rc || (rc = init_common(p, pages, page_bytes, seg_bytes, why))) {
        pool_fini(p);
        return rc;
    }
    p->base = base, p->external = 1;
    if (ops)
        p->ops = *ops;
    return 0;
}

void pool_set_ops(struct pool *p, const struct pool_ops *ops)
{
    p->ops = *ops;
}

void pool_fini(struct pool *p)
{
    for (uint32_t i = 0; p->seg && i < p->n_segs; i++) {
        if (p->seg[i].fd >= 0 && p->ops.mapped)
            p->ops.mapped(p->ops.ud, p, i, 0);
        if (p->seg[i].fd >= 0)
            close(p->seg[i].fd);
    }
    if (p->base && !p->external)
        munmap(p->base, p->bytes);
    free(p->bitmap);
    free(p->seg);
    free(p->owned_free);
    free(p->promised_to);
    memset(p, 0, sizeof(*p));
}

static uint64_t seg_len(const struct pool *p, uint32_t i)
{
    return (uint64_t)pool_seg_pages(p, i) * p->page_bytes;
}

void pool_retire_fd(int fd, uint64_t bytes)
{
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)bytes);
    close(fd);
}

/* A memfd of len bytes (huge pages while the system gives them), or -errno. */
static int new_memfd(struct pool *p, uint64_t len)
{
    if (p->hugepages) {
        int fd = memfd_create("caked-segment", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB);
        struct stat st;
        if (fd >= 0 && ftruncate(fd, (off_t)len) == 0 && fstat(fd, &st) == 0) {
            p->huge_bytes = (uint64_t)st.st_blksize;
            return fd;
        }
        if (fd >= 0)
            close(fd);
        p->hugepages = 0;
    }
    int fd = memfd_create("caked-segment", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, (off_t)len) < 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return -e;
    }
    return fd;
}

/* Segment i's memfd goes: its pages are punched out and it is closed (by ops.retire's
 * thread if there is one). */
static void retire_seg_fd(struct pool *p, uint32_t i)
{
    if (p->seg[i].fd < 0)
        return;
    if (p->ops.retire)
        p->ops.retire(p->ops.ud, p->seg[i].fd, seg_len(p, i));
    else
        pool_retire_fd(p->seg[i].fd, seg_len(p, i));
    p->seg[i].fd = -1;
}

/* Host pools: a new sealed memfd mapped over segment i; the old one's pages are punched
 * out (a previous owner's process that still maps it reads zeros, and what it writes there
 * lands in memory no one else maps). */
static int fresh_memfd(struct pool *p, uint32_t i, const char **why)
{
    uint64_t len = seg_len(p, i);
    int fd = new_memfd(p, len);
    if (fd < 0) {
        *why = "cannot make a pool segment's memfd";
        return fd;
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int e = errno;
        close(fd);
        *why = "sealing a pool segment failed";
        return -e;
    }
    uint8_t *at = p->base + (uint64_t)i * p->seg_bytes;
    if (p->seg[i].fd >= 0 && p->ops.mapped)
        p->ops.mapped(p->ops.ud, p, i, 0);
    if (mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        int e = errno;
        /* the old mapping is gone too: the range stays reserved, the segment unusable */
        mmap(at, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        retire_seg_fd(p, i);
        close(fd);
        *why = "mmap of a pool segment failed";
        return -e;
    }
    retire_seg_fd(p, i);
    p->seg[i].fd = fd;
    if (p->ops.mapped)
        p->ops.mapped(p->ops.ud, p, i, 1);
    return 0;
}

/* An empty segment's promise (to g->drain) is withdrawn or kept. */
static void unpromise(struct pool *p, uint32_t i)
{
    struct pool_seg *g = &p->seg[i];
    uint64_t sp = pool_seg_pages(p, i);
    CAKE_CHECK(g->drain && !g->used && p->promised >= sp && p->promised_to[g->drain] >= sp);
    p->promised -= sp, p->promised_to[g->drain] -= sp;
    g->drain = 0;
}

/* Gives segment i (empty) to owner, with fresh memory unless it already was owner's. */
static int claim(struct pool *p, uint32_t i, uint32_t owner)
{
    struct pool_seg *g = &p->seg[i];
    CAKE_CHECK(!g->drain || g->drain == owner);
    if (g->drain) /* promised to owner: it takes it now */
        unpromise(p, i);
    int have = p->external ? g->gen != 0 : g->fd >= 0;
    if (g->owner == owner && have)
        return 0;
    const char *why = NULL;
    int rc = p->external ? p->ops.fresh(p->ops.ud, p, i, &why) : fresh_memfd(p, i, &why);
    if (rc)
        return rc;
    if (have)
        p->recycled++;
    g->owner = owner;
    g->gen++;
    p->epoch++;
    return 0;
}

static int bit(const struct pool *p, uint32_t i)
{
    return (int)((p->bitmap[i / 64] >> (i % 64)) & 1);
}

/* Segment i's use changes by d pages: the counts pool_avail reads follow. A draining
 * segment's free pages are not its owner's; once empty it is promised to its beneficiary. */
static void seg_use(struct pool *p, uint32_t i, int64_t d)
{
    struct pool_seg *g = &p->seg[i];
    uint64_t sp = pool_seg_pages(p, i);
    uint64_t *of = &p->owned_free[g->owner];
    CAKE_CHECK(!(g->used == 0 && g->drain)); /* a promised segment is claimed first */
    if (g->used == 0) /* was empty: now owned and in use */
        p->empty_pages -= sp, *of += sp;
    CAKE_CHECK((int64_t)g->used + d >= 0 && (int64_t)g->used + d <= (int64_t)sp && g->owner);
    g->used = (uint32_t)((int64_t)g->used + d);
    if (!g->drain)
        *of -= (uint64_t)d; /* d > 0 takes free pages, d < 0 returns them */
    if (g->used == 0) {
        p->empty_pages += sp;
        if (!g->drain)
            *of -= sp;
        else
            p->promised += sp, p->promised_to[g->drain] += sp, p->draining--;
        CAKE_CHECK(!g->pinned);
    }
}

static void set_run(struct pool *p, uint32_t first, uint32_t n, int v)
{
    CAKE_CHECK(first <= p->pages && n <= p->pages - first);
    for (uint32_t i = first; i < first + n; i++) {
        CAKE_CHECK(bit(p, i) != v); /* a page taken twice or freed twice */
        if (v)
            p->bitmap[i / 64] |= UINT64_C(1) << (i % 64);
        else
            p->bitmap[i / 64] &= ~(UINT64_C(1) << (i % 64));
    }
    /* per segment touched */
    for (uint32_t i = first; i < first + n;) {
        uint32_t sg = i / p->seg_pages, end = (sg + 1) * p->seg_pages;
        uint32_t k = (end < first + n ? end : first + n) - i;
        seg_use(p, sg, v ? (int64_t)k : -(int64_t)k);
        i += k;
    }
}

/* A free page of segment i (which has one), taken. */
static int64_t take_in(struct pool *p, uint32_t i)
{
    uint32_t w0 = i * p->seg_pages / 64, w1 = (i * p->seg_pages + pool_seg_pages(p, i) + 63) / 64;
    for (uint32_t w = w0; w < w1; w++)
        if (p->bitmap[w] != UINT64_MAX) {
            uint32_t page = w * 64 + (uint32_t)__builtin_ctzll(~p->bitmap[w]);
            set_run(p, page, 1, 1);
            p->used++;
            p->hint = i;
            return page;
        }
    return -1;
}

static int has_room(const struct pool *p, uint32_t i)
{
    return p->seg[i].used < pool_seg_pages(p, i) && !p->seg[i].drain;
}

/* May owner take empty segment i? Not one promised to another. */
static int takeable(const struct pool *p, uint32_t i, uint32_t owner)
{
    return !p->seg[i].used && (!p->seg[i].drain || p->seg[i].drain == owner);
}

/* Placement of pinned pages (those that never move, pool_pin) and of pages that move: the
 * fewer segments hold a pinned page, the more of a tenant can drain for another (Draining,
 * pool.h). Pinned pages crowd the segments that already hold one, then take an empty
 * segment rather than one whose pages move; pages that move keep out of segments holding
 * pinned pages, except for what is beyond a reserve (an eighth of the segment) kept for the
 * next pinned pages, rather than take another segment: a tenant with one sequence still
 * fits in one segment. In the end (no empty segment left) each takes what is left: no page
 * is ever refused for its placement. */
#define PIN_RESERVE(p) ((p)->seg_pages / 8)

/* From which pass may a page of this kind go to owner's segment i (in use)? 0 first, 1 next;
 * empty segments are pass 2; 3 last. */
static int fit(const struct pool *p, uint32_t i, int pinned)
{
    const struct pool_seg *g = &p->seg[i];
    if (pinned) /* rather an empty segment than one whose pages move */
        return g->pinned ? 0 : 3;
    if (!g->pinned)
        return 0;
    return pool_seg_pages(p, i) - g->used > PIN_RESERVE(p) ? 1 : 3;
}

/* A free page of owner's segments in use that fit the kind at `pass`, or -1. */
static int64_t take_own(struct pool *p, uint32_t owner, int pinned, int pass)
{
    if (!p->owned_free[owner])
        return -1;
    if (p->hint < p->n_segs && p->seg[p->hint].owner == owner && p->seg[p->hint].used &&
        has_room(p, p->hint) && fit(p, p->hint, pinned) <= pass)
        return take_in(p, p->hint);
    for (uint32_t i = 0; i < p->n_segs; i++)
        if (p->seg[i].owner == owner && p->seg[i].used && has_room(p, i) &&
            fit(p, i, pinned) <= pass)
            return take_in(p, i);
    return -1;
}

static int64_t alloc1(struct pool *p, uint32_t owner, int pinned)
{
    if (!owner || owner > POOL_MAX_OWNERS || p->used == p->pages)
        return -1;
    /* its own segments in use by fit (passes 0 and 1), then one of its own empty ones, then
     * one never given out, then another owner's empty one (which gets fresh memory), and
     * last whatever is left in its own (pass 3) */
    int64_t pg;
    if ((pg = take_own(p, owner, pinned, 0)) >= 0 || (pg = take_own(p, owner, pinned, 1)) >= 0)
        return pg;
    for (uint32_t i = 0; i < p->n_segs; i++) /* its own empty ones cost nothing */
        if (p->seg[i].owner == owner && !p->seg[i].used && !p->seg[i].drain)
            return take_in(p, i);
    for (int pass = 0; pass < 2; pass++)
        for (uint32_t i = 0; i < p->n_segs; i++)
            if (takeable(p, i, owner) && (pass || !p->seg[i].owner) && claim(p, i, owner) == 0)
                return take_in(p, i);
    return take_own(p, owner, pinned, 3);
}

int64_t pool_alloc(struct pool *p, uint32_t owner)
{
    return alloc1(p, owner, 0);
}

int64_t pool_alloc_in(struct pool *p, uint32_t owner)
{
    if (!owner || owner > POOL_MAX_OWNERS)
        return -1;
    int64_t pg = take_own(p, owner, 0, 0);
    return pg >= 0 ? pg : take_own(p, owner, 0, 3);
}

/* Can owner's run use segment i in pass `mode` (0-3)? The passes of alloc1: its own in use
 * by fit, empty ones (its own or ones it may take) from 2. */
static int usable(const struct pool *p, uint32_t i, uint32_t owner, int mode, int pinned)
{
    const struct pool_seg *g = &p->seg[i];
    if (g->owner == owner && !g->drain && g->used)
        return mode >= fit(p, i, pinned);
    if (g->owner == owner && !g->drain)
        return mode >= 2;
    return mode >= 2 && takeable(p, i, owner);
}

static int64_t find_run(struct pool *p, uint32_t n, uint32_t owner, int mode, int pinned)
{
    uint32_t run = 0;
    for (uint32_t i = 0; i < p->pages; i++) {
        if (!(i % p->seg_pages) && !usable(p, i / p->seg_pages, owner, mode, pinned)) {
            run = 0;
            i += p->seg_pages - 1;
            continue;
        }
        if (!(i % 64) && p->bitmap[i / 64] == UINT64_MAX) { /* skip full words */
            run = 0;
            i += 63;
            continue;
        }
        run = bit(p, i) ? 0 : run + 1;
        if (run == n)
            return i + 1 - n;
    }
    return -1;
}

static int64_t alloc_run(struct pool *p, uint32_t n, uint32_t owner, int pinned)
{
    if (!owner || owner > POOL_MAX_OWNERS || n == 0 || n > p->pages - p->used)
        return -1;
    if (n == 1)
        return alloc1(p, owner, pinned);
    for (int mode = 0; mode <= 3; mode++) {
        int64_t first = find_run(p, n, owner, mode, pinned);
        if (first < 0)
            continue;
        uint32_t s0 = pool_seg_of(p, (uint32_t)first), s1 = pool_seg_of(p, (uint32_t)first + n - 1);
        int ok = 1;
        for (uint32_t i = s0; i <= s1 && ok; i++)
            ok = claim(p, i, owner) == 0;
        if (!ok)
            return -1;
        set_run(p, (uint32_t)first, n, 1);
        p->used += n;
        return first;
    }
    return -1;
}

int64_t pool_alloc_run(struct pool *p, uint32_t n, uint32_t owner)
{
    return alloc_run(p, n, owner, 0);
}

void pool_free_run(struct pool *p, uint32_t first, uint32_t n)
{
    set_run(p, first, n, 0);
    p->used -= n;
    /* No MADV_REMOVE here: punching holes page by page cost the event loop ~0.5 s when a
     * 32K-token layer was compacted (measured with bench-rpc). Like any fixed-size cache,
     * the pool keeps touched pages resident; size it with --host-pool. A segment's memory is
     * punched out when it changes owner. */
}

int pool_alloc_list(struct pool *p, uint32_t n, uint32_t owner, int flags, uint32_t *out)
{
    int pinned = !!(flags & POOL_PINNED), scatter = !!(flags & POOL_SCATTER);
    int64_t first = alloc_run(p, n, owner, pinned);
    if (first >= 0) {
        for (uint32_t i = 0; i < n; i++)
            out[i] = (uint32_t)first + i;
        return 0;
    }
    if (!scatter || !owner || owner > POOL_MAX_OWNERS || n > p->pages - p->used ||
        n > pool_avail(p, owner))
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        int64_t pg = alloc1(p, owner, pinned);
        if (pg < 0) {
            pool_free_list(p, out, i);
            return -1;
        }
        out[i] = (uint32_t)pg;
    }
    return 0;
}

void pool_free_list(struct pool *p, const uint32_t *pages, uint32_t n)
{
    for (uint32_t i = 0; i < n;) {
        uint32_t k = 1;
        while (i + k < n && pages[i + k] == pages[i] + k)
            k++;
        pool_free_run(p, pages[i], k);
        i += k;
    }
}

int pool_can_window(const struct pool *p)
{
    /* a window maps pages one by one: huge-page memory maps only in whole huge pages */
    return !p->external && (!p->hugepages || (p->huge_bytes && p->page_bytes % p->huge_bytes == 0));
}

void *pool_window(const struct pool *p, const uint32_t *pages, uint32_t n, int *stitched)
{
    return window_map(p->base, pages, n, p->page_bytes, p->seg_pages, stitched);
}

void pool_window_drop(const struct pool *p, void *w, uint32_t n, int stitched)
{
    if (stitched && w)
        munmap(w, (size_t)n * p->page_bytes);
}

uint64_t pool_avail(const struct pool *p, uint32_t owner)
{
    if (!owner || owner > POOL_MAX_OWNERS)
        return 0;
    return p->empty_pages - p->promised + p->promised_to[owner] + p->owned_free[owner];
}

void pool_pin(struct pool *p, const uint32_t *pages, uint32_t n, int d)
{
    for (uint32_t i = 0; i < n; i++) {
        struct pool_seg *g = &p->seg[pool_seg_of(p, pages[i])];
        CAKE_CHECK(d > 0 ? g->pinned < g->used : g->pinned > 0);
        g->pinned += d > 0 ? 1u : (uint32_t)-1;
    }
}

/* Marks segment i (in use) draining for `to`. */
static void drain_seg(struct pool *p, uint32_t i, uint32_t to)
{
    struct pool_seg *g = &p->seg[i];
    CAKE_CHECK(g->used && !g->drain && !g->pinned && g->owner != to);
    p->owned_free[g->owner] -= pool_seg_pages(p, i) - g->used;
    g->drain = to;
    p->draining++;
}

uint64_t pool_drain(struct pool *p, uint32_t owner, uint32_t to, uint64_t want, uint64_t most,
                    uint64_t *moving)
{
    uint64_t got = 0;
    *moving = 0;
    if (!owner || !to || owner == to || owner > POOL_MAX_OWNERS || to > POOL_MAX_OWNERS)
        return 0;
    while (got < want) { /* the emptiest of its segments that may drain, one at a time */
        uint32_t best = UINT32_MAX;
        for (uint32_t i = 0; i < p->n_segs; i++) {
            const struct pool_seg *g = &p->seg[i];
            if (g->owner == owner && g->used && !g->drain && !g->pinned &&
                (best == UINT32_MAX || g->used < p->seg[best].used))
                best = i;
        }
        if (best == UINT32_MAX || got + pool_seg_pages(p, best) > most)
            break;
        got += pool_seg_pages(p, best);
        *moving += p->seg[best].used;
        drain_seg(p, best, to);
    }
    return got;
}

void pool_undrain(struct pool *p, uint32_t to)
{
    for (uint32_t i = 0; i < p->n_segs; i++) {
        struct pool_seg *g = &p->seg[i];
        if (!g->drain || (to && g->drain != to))
            continue;
        if (g->used) {
            p->owned_free[g->owner] += pool_seg_pages(p, i) - g->used;
            g->drain = 0;
            p->draining--;
        } else {
            unpromise(p, i);
        }
    }
}

uint64_t pool_owned_pages(const struct pool *p, uint32_t owner, uint64_t *used)
{
    uint64_t n = 0;
    *used = 0;
    for (uint32_t i = 0; i < p->n_segs; i++)
        if (p->seg[i].owner == owner && p->seg[i].used && !p->seg[i].drain)
            n += pool_seg_pages(p, i), *used += p->seg[i].used;
    return n;
}

void pool_release_owner(struct pool *p, uint32_t owner)
{
    pool_undrain(p, owner); /* what was promised to it */
    for (uint32_t i = 0; i < p->n_segs; i++)
        if (p->seg[i].owner == owner && !p->seg[i].used) {
            p->seg[i].owner = 0; /* claim() sees memory of another: fresh memory first */
            p->epoch++;
        }
}

uint32_t pool_owned_segs(const struct pool *p, uint32_t owner)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < p->n_segs; i++)
        n += p->seg[i].owner == owner;
    return n;
}
