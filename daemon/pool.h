/* pool.h - a pool of fixed-size pages cut into segments, each segment owned by at most one
 * tenant at a time: the host pool (each segment its own sealed memfd) and, with memory owned
 * elsewhere, the GPU pools (each segment its own CUDA VMM allocation, made by a callback).
 *
 * Why segments: a client maps only the segments of its own tenant (their fds travel to it
 * one by one), so no client can read or write another tenant's K/V or descriptors. A page
 * is handed only to its segment's owner; a segment changes owner only when it is empty, and
 * then gets fresh memory first (a new memfd or allocation; the old memfd's pages are punched
 * out), so whatever the previous owner's processes still map is never the next owner's.
 *
 * Every segment lives at base + index * seg_bytes in the daemon's address space (and at the
 * same offset in each client's reservation), so a page is still `base + index * page_bytes`
 * and offsets mean the same in every process.
 *
 * Draining (cross-tenant pressure): a segment of one owner can be marked draining for
 * another (the beneficiary): its owner gets no new page there, its free pages stop counting
 * as the owner's, its pages in use are moved out by their sequences' next jobs, and once it
 * is empty it is promised to the beneficiary (no one else may take it) until the
 * beneficiary takes it or the promise is withdrawn (pool_undrain). Pages that cannot move
 * (a sequence's descriptor and query rings: engines keep their addresses) are pinned
 * (pool_pin), and a segment with a pinned page is never drained. Not thread-safe: the event loop thread owns
 * allocation; workers only touch pages of a sequence they were handed. */
#ifndef CAKE_POOL_H
#define CAKE_POOL_H

#include <stddef.h>
#include <stdint.h>

#define POOL_MIN_PAGE_BYTES 4096u
#define POOL_MAX_PAGES (1u << 28)     /* 2^28 pages: bitmaps stay under 32 MiB */
#define POOL_MIN_SEG_BYTES (4u << 20) /* a multiple of every GPU's VMM granularity (2 MiB) */
#define POOL_MAX_SEGS 1024u           /* the default segment size grows with the pool to stay under */
#define POOL_MAX_OWNERS 4096u         /* owner ids are 1..POOL_MAX_OWNERS (tenant ids) */

struct pool;

/* Where segment memory comes from, for pools whose memory is not a memfd of ours (GPU). */
struct pool_ops {
    /* Gives segment i fresh memory at base + i * seg_bytes (replacing any it had, whose
     * old contents no mapping of the new memory may see). 0 or -errno with *why. */
    int (*fresh)(void *ud, struct pool *p, uint32_t i, const char **why);
    /* Host pools: called after segment i was (re)mapped in this process, so that a caller
     * can register it (cudaHostRegister); mapped = 0 just before it is unmapped. */
    void (*mapped)(void *ud, struct pool *p, uint32_t i, int mapped);
    /* Host pools: takes a replaced segment's old memfd (already unmapped here) to punch out
     * its pages and close it off the caller's thread; NULL: done inline. */
    void (*retire)(void *ud, int fd, uint64_t bytes);
    void *ud;
};

struct pool_seg {
    uint32_t owner; /* tenant id (tenant.h), 0 = never given out */
    uint32_t used;  /* pages in use */
    uint32_t gen;   /* bumped each time the segment gets fresh memory: clients remap on change */
    int fd;         /* host pools: its memfd, -1 before its first owner */
    uint32_t ext;   /* external pools: the callback's handle slot (free for its use) */
    uint32_t pinned; /* pages in use that never move (pool_pin) */
    uint32_t drain;  /* 0, or the owner it is drained for (see Draining above) */
};

struct pool {
    uint8_t *base;
    uint64_t bytes;
    uint64_t page_bytes;
    uint32_t pages;
    uint32_t used;
    uint64_t *bitmap; /* 1 = in use */
    uint64_t seg_bytes;
    uint32_t seg_pages, n_segs;
    struct pool_seg *seg;
    uint32_t hint;    /* the segment the last allocation came from */
    uint64_t empty_pages;  /* pages of segments with none in use (anyone's to take) */
    uint64_t *owned_free;  /* [owner]: free pages in the owner's segments that are in use
                              (not draining) */
    uint64_t promised;     /* pages of empty segments promised to a beneficiary */
    uint64_t *promised_to; /* [owner]: ... to that one */
    uint32_t draining;     /* segments draining with pages still in use */
    int hugepages;
    uint64_t huge_bytes; /* the huge page size of the segments' memfds (hugepages) */
    int external;     /* base belongs to someone else (pool_init_external) */
    struct pool_ops ops;
    uint64_t recycled; /* segments given fresh memory for a new owner */
    uint64_t epoch;    /* bumped whenever a segment changes owner or memory */
};

/* Reserves the pool's address range; segments get memory when first given out. bytes is
 * rounded down to whole pages; seg_bytes 0 picks the default (pool_default_seg_bytes). huge:
 * MFD_HUGETLB segments (falls back to normal pages; pool->hugepages says which). Returns 0 or
 * -errno with a message in *why. */
int pool_init(struct pool *p, uint64_t bytes, uint64_t page_bytes, uint64_t seg_bytes, int huge,
              const char **why);
/* The page allocator alone over [base, base + bytes), whose segments' memory ops->fresh
 * provides (the GPU pool: base is a device address and is never dereferenced here). */
int pool_init_external(struct pool *p, void *base, uint64_t bytes, uint64_t page_bytes,
                       uint64_t seg_bytes, const struct pool_ops *ops, const char **why);
void pool_fini(struct pool *p);
/* The default segment size of a pool of `bytes`: a power of two of at least 4 MiB and 64
 * pages, large enough that the pool has at most POOL_MAX_SEGS segments. */
uint64_t pool_default_seg_bytes(uint64_t bytes, uint64_t page_bytes);
/* Punches out a retired segment memfd's pages and closes it (any thread). */
void pool_retire_fd(int fd, uint64_t bytes);
/* Sets the hooks of a host pool (before any segment is given out). */
void pool_set_ops(struct pool *p, const struct pool_ops *ops);

/* One page for `owner` (1..POOL_MAX_OWNERS); returns its index or -1. */
int64_t pool_alloc(struct pool *p, uint32_t owner);
/* The same from owner's segments in use only (never an empty segment): where a draining
 * segment's pages move. */
int64_t pool_alloc_in(struct pool *p, uint32_t owner);
/* n contiguous pages for owner (they may span several of its segments); the first index or -1. */
int64_t pool_alloc_run(struct pool *p, uint32_t n, uint32_t owner);
void pool_free_run(struct pool *p, uint32_t first, uint32_t n);
#define POOL_SCATTER 1 /* pool_alloc_list: any free pages if there is no run */
#define POOL_PINNED 2  /* pool_alloc_list: pages that will be pinned (pool_pin), placed with
                          the owner's other pinned pages */
/* n pages for owner: one run if there is one, else (flags & POOL_SCATTER) any free pages it
 * may have (all or nothing) into out[n]. 0 or -1. Pages that move (the default) keep out of
 * segments holding pinned pages while there is room elsewhere, and pinned pages crowd into
 * them: the fewer segments a pinned page holds, the more of a tenant can drain. Pages need
 * not be contiguous: a structure that wants to read as one range maps them side by side
 * (pool_window); the GPU pool's are reached through page tables. */
int pool_alloc_list(struct pool *p, uint32_t n, uint32_t owner, int flags, uint32_t *out);
void pool_free_list(struct pool *p, const uint32_t *pages, uint32_t n);
/* Can pool_window map scattered pages (a host pool whose pages map one by one)? Not
 * huge-page segments with pages smaller than a huge page: a window then needs one run. */
int pool_can_window(const struct pool *p);
/* Host pools: pages[0..n) as one contiguous range of this process (proto/window.h's
 * window_map over the pool's mapping; *stitched = 1 when it is a new range). NULL when the
 * mapping fails. */
void *pool_window(const struct pool *p, const uint32_t *pages, uint32_t n, int *stitched);
void pool_window_drop(const struct pool *p, void *w, uint32_t n, int stitched);
/* Pages owner could be given now: free pages of its segments and every empty segment
 * (constant time: kept as pages come and go). */
uint64_t pool_avail(const struct pool *p, uint32_t owner);
/* Pages pages[0..n) never move (+1) or may again (-1; before they are freed): a segment
 * holding one is never drained. */
void pool_pin(struct pool *p, const uint32_t *pages, uint32_t n, int d);
/* Marks owner's segments draining for `to` (!= owner), those with the fewest pages in use
 * first (none pinned or draining already), until they hold at least `want` pages, as long as
 * their pages together hold at most `most`: returns the pages of the segments marked (0
 * when none fits). Their pages in use (*moving) must then move to owner's other segments. */
uint64_t pool_drain(struct pool *p, uint32_t owner, uint32_t to, uint64_t want, uint64_t most,
                    uint64_t *moving);
/* Withdraws every drain and promise made for `to` (0: for anyone). */
void pool_undrain(struct pool *p, uint32_t to);
/* Is page in a draining segment? */
static inline int pool_page_draining(const struct pool *p, uint32_t page);
/* Pages in owner's segments (in use, not draining), and of them in use: a tenant's footprint
 * in segments (*used may be 0). */
uint64_t pool_owned_pages(const struct pool *p, uint32_t owner, uint64_t *used);
/* owner is gone: its segments (all empty) belong to no one; whoever takes one next gets it
 * with fresh memory. */
void pool_release_owner(struct pool *p, uint32_t owner);
/* Segments owner holds (with or without pages in use). */
uint32_t pool_owned_segs(const struct pool *p, uint32_t owner);

static inline void *pool_ptr(const struct pool *p, uint32_t page)
{
    return p->base + (uint64_t)page * p->page_bytes;
}

static inline uint32_t pool_free_pages(const struct pool *p)
{
    return p->pages - p->used;
}

static inline uint32_t pool_seg_of(const struct pool *p, uint32_t page)
{
    return page / p->seg_pages;
}

static inline int pool_page_draining(const struct pool *p, uint32_t page)
{
    return p->seg[page / p->seg_pages].drain != 0;
}

/* Pages in segment i (the last one may be short). */
static inline uint32_t pool_seg_pages(const struct pool *p, uint32_t i)
{
    uint32_t first = i * p->seg_pages;
    return p->pages - first < p->seg_pages ? p->pages - first : p->seg_pages;
}

#endif
