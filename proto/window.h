/* window.h - a sequence's window (shm.h) as one range of this process: caked and libcake both
 * map the window's pool pages side by side with this, from their own mapping of the pool. */
#ifndef CAKE_WINDOW_H
#define CAKE_WINDOW_H

#include <stddef.h>
#include <stdint.h>

/* pages[0..n) of a pool mapped at base (page_bytes each, seg_pages to a segment, each
 * segment one shared mapping) as one range: the pool's own when they are one run
 * (*stitched = 0), else a new range where each run of pages inside one segment is mapped
 * again (mremap of old size 0: the same shared pages; *stitched = 1; munmap it when done).
 * NULL with errno set when the mapping fails. */
void *window_map(uint8_t *base, const uint32_t *pages, uint32_t n, uint64_t page_bytes,
                 uint64_t seg_pages, int *stitched);

#endif
