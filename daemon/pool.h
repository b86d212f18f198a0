/* pool.h - the host pool: one sealed memfd cut into fixed-size pages (and the same page
 * allocator over memory owned elsewhere: the GPU pool).
 *
 * Mapped by the daemon and (fd passed once at attach) by every engine. Seals forbid
 * shrinking and growing, so no client can pull memory from under the daemon. Pages are
 * handed out as indices (offset = index * page_bytes) by a bitmap allocator that can also
 * find contiguous runs (descriptors, scratch areas). Not thread-safe: the event loop
 * thread owns allocation; workers only touch pages of a sequence they were handed. */
#ifndef CAKE_POOL_H
#define CAKE_POOL_H

#include <stddef.h>
#include <stdint.h>

#define POOL_MIN_PAGE_BYTES 4096u
#define POOL_MAX_PAGES (1u << 28) /* 2^28 pages: bitmaps stay under 32 MiB */

struct pool {
    int fd;
    uint8_t *base;
    uint64_t bytes;
    uint64_t page_bytes;
    uint32_t pages;
    uint32_t used;
    uint64_t *bitmap; /* 1 = in use */
    uint32_t hint;    /* word to start the next search from */
    int hugepages;
    int external;     /* base belongs to someone else (pool_init_external) */
};

/* Creates and maps the pool. bytes is rounded down to whole pages. huge: try MFD_HUGETLB
 * (falls back to normal pages; pool->hugepages says which). Returns 0 or -errno, with a
 * message in *why. */
int pool_init(struct pool *p, uint64_t bytes, uint64_t page_bytes, int huge, const char **why);
/* The page allocator alone over [base, base + bytes) owned by the caller (the GPU pool:
 * base is a device address and is never dereferenced here). */
int pool_init_external(struct pool *p, void *base, uint64_t bytes, uint64_t page_bytes,
                       const char **why);
void pool_fini(struct pool *p);

/* n contiguous pages; returns the first index or -1 when no run is free. */
int64_t pool_alloc_run(struct pool *p, uint32_t n);
/* One page; returns its index or -1. */
int64_t pool_alloc(struct pool *p);
void pool_free_run(struct pool *p, uint32_t first, uint32_t n);

static inline void *pool_ptr(const struct pool *p, uint32_t page)
{
    return p->base + (uint64_t)page * p->page_bytes;
}

static inline uint32_t pool_free_pages(const struct pool *p)
{
    return p->pages - p->used;
}

#endif
