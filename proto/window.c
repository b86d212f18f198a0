/* window.c - a sequence's window mapped side by side (see window.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>

#include "window.h"

void *window_map(uint8_t *base, const uint32_t *pages, uint32_t n, uint64_t page_bytes,
                 uint64_t seg_pages, int *stitched)
{
    *stitched = 0;
    if (!n) {
        errno = EINVAL;
        return NULL;
    }
    uint32_t run = 1;
    while (run < n && pages[run] == pages[0] + run)
        run++;
    if (run == n)
        return base + (uint64_t)pages[0] * page_bytes;
    size_t len = (size_t)n * page_bytes;
    uint8_t *w = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (w == MAP_FAILED)
        return NULL;
    for (uint32_t i = 0; i < n;) {
        uint32_t k = 1;
        while (i + k < n && pages[i + k] == pages[i] + k &&
               (pages[i] + k) / seg_pages == pages[i] / seg_pages)
            k++;
        void *at = w + (size_t)i * page_bytes;
        if (mremap(base + (uint64_t)pages[i] * page_bytes, 0, (size_t)k * page_bytes,
                   MREMAP_MAYMOVE | MREMAP_FIXED, at) != at) {
            int e = errno;
            munmap(w, len);
            errno = e;
            return NULL;
        }
        i += k;
    }
    *stitched = 1;
    return w;
}
