/* pool.c - sealed memfd and its page allocator (see pool.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/memfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pool.h"

static int check_size(uint64_t bytes, uint64_t page_bytes, uint64_t *pages, const char **why)
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
    return 0;
}

static int init_bitmap(struct pool *p, uint64_t pages, const char **why)
{
    p->bitmap = calloc((pages + 63) / 64, sizeof(uint64_t));
    if (!p->bitmap) {
        *why = "out of memory for the page bitmap";
        return -ENOMEM;
    }
    /* bits past the last page are permanently in use */
    if (pages % 64)
        p->bitmap[pages / 64] = ~((UINT64_C(1) << (pages % 64)) - 1);
    p->pages = (uint32_t)pages;
    return 0;
}

int pool_init(struct pool *p, uint64_t bytes, uint64_t page_bytes, int huge, const char **why)
{
    memset(p, 0, sizeof(*p));
    p->fd = -1;
    uint64_t pages;
    int rc = check_size(bytes, page_bytes, &pages, why);
    if (rc)
        return rc;
    bytes = pages * page_bytes;
    int fd = -1;
    if (huge) {
        fd = memfd_create("caked-pool", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB);
        if (fd >= 0 && ftruncate(fd, (off_t)bytes) < 0) {
            close(fd);
            fd = -1;
        }
        p->hugepages = fd >= 0;
    }
    if (fd < 0) {
        fd = memfd_create("caked-pool", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (fd < 0) {
            *why = "memfd_create failed";
            return -errno;
        }
        if (ftruncate(fd, (off_t)bytes) < 0) {
            int e = errno;
            close(fd);
            *why = "ftruncate of the pool memfd failed";
            return -e;
        }
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int e = errno;
        close(fd);
        *why = "sealing the pool memfd failed";
        return -e;
    }
    void *base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        int e = errno;
        close(fd);
        *why = "mmap of the pool failed";
        return -e;
    }
    if ((rc = init_bitmap(p, pages, why))) {
        munmap(base, bytes);
        close(fd);
        return rc;
    }
    p->fd = fd, p->base = base, p->bytes = bytes, p->page_bytes = page_bytes;
    return 0;
}

int pool_init_external(struct pool *p, void *base, uint64_t bytes, uint64_t page_bytes,
                       const char **why)
{
    memset(p, 0, sizeof(*p));
    p->fd = -1;
    uint64_t pages;
    int rc = check_size(bytes, page_bytes, &pages, why);
    if (rc || (rc = init_bitmap(p, pages, why)))
        return rc;
    p->base = base, p->bytes = pages * page_bytes, p->page_bytes = page_bytes, p->external = 1;
    return 0;
}

void pool_fini(struct pool *p)
{
    if (p->base && !p->external)
        munmap(p->base, p->bytes);
    if (p->fd >= 0)
        close(p->fd);
    free(p->bitmap);
    memset(p, 0, sizeof(*p));
    p->fd = -1;
}

static int bit(const struct pool *p, uint32_t i)
{
    return (int)((p->bitmap[i / 64] >> (i % 64)) & 1);
}

static void set_run(struct pool *p, uint32_t first, uint32_t n, int v)
{
    for (uint32_t i = first; i < first + n; i++) {
        if (v)
            p->bitmap[i / 64] |= UINT64_C(1) << (i % 64);
        else
            p->bitmap[i / 64] &= ~(UINT64_C(1) << (i % 64));
    }
}

int64_t pool_alloc(struct pool *p)
{
    uint32_t words = (p->pages + 63) / 64;
    for (uint32_t k = 0; k < words; k++) {
        uint32_t w = (p->hint + k) % words;
        if (p->bitmap[w] != UINT64_MAX) {
            uint32_t b = (uint32_t)__builtin_ctzll(~p->bitmap[w]);
            p->bitmap[w] |= UINT64_C(1) << b;
            p->used++;
            p->hint = w;
            return (int64_t)w * 64 + b;
        }
    }
    return -1;
}

int64_t pool_alloc_run(struct pool *p, uint32_t n)
{
    if (n == 0 || n > p->pages - p->used)
        return -1;
    if (n == 1)
        return pool_alloc(p);
    uint32_t run = 0;
    for (uint32_t i = 0; i < p->pages; i++) {
        if (!(i % 64) && p->bitmap[i / 64] == UINT64_MAX) { /* skip full words */
            run = 0;
            i += 63;
            continue;
        }
        run = bit(p, i) ? 0 : run + 1;
        if (run == n) {
            uint32_t first = i + 1 - n;
            set_run(p, first, n, 1);
            p->used += n;
            return first;
        }
    }
    return -1;
}

void pool_free_run(struct pool *p, uint32_t first, uint32_t n)
{
    set_run(p, first, n, 0);
    p->used -= n;
    p->hint = first / 64;
    /* No MADV_REMOVE here: punching holes page by page cost the event loop ~0.5 s when a
     * 32K-token layer was compacted (measured with bench-rpc). Like any fixed-size cache,
     * the pool keeps touched pages resident; size it with --host-pool. */
}
