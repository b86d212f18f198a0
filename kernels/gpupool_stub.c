/* gpupool_stub.c - gpupool.h where CUDA is absent (nvcc not found at build time): every
 * call that would need a GPU fails with -ENOSYS and says why, so caked and libcake are the
 * same code with or without CUDA (a GPU pool is refused at start, GPU pools are never
 * mapped). */
#include <errno.h>
#include <string.h>

#include "gpupool.h"

static int no_cuda(const char **why)
{
    if (why)
        *why = "built without CUDA (nvcc was not found)";
    return -ENOSYS;
}

int gpupool_create(struct gpupool *p, uint64_t bytes, uint64_t seg_bytes, const char *uuid,
                   const char **why)
{
    (void)bytes, (void)seg_bytes, (void)uuid;
    memset(p, 0, sizeof(*p));
    return no_cuda(why);
}

int gpupool_granularity(const char *uuid, uint64_t *g, const char **why)
{
    (void)uuid;
    *g = 0;
    return no_cuda(why);
}

int gpupool_seg_fresh(struct gpupool *p, uint32_t i, const char **why)
{
    (void)p, (void)i;
    return no_cuda(why);
}

int gpupool_seg_export(const struct gpupool *p, uint32_t i, int *fd, const char **why)
{
    (void)p, (void)i;
    *fd = -1;
    return no_cuda(why);
}

int gpupool_seg_import(struct gpupool *p, uint32_t i, int fd, const char **why)
{
    (void)p, (void)i, (void)fd;
    return no_cuda(why);
}

void gpupool_seg_drop(struct gpupool *p, uint32_t i) { (void)p, (void)i; }

uint64_t gpupool_seg_len(const struct gpupool *p, uint32_t i)
{
    uint64_t off = (uint64_t)i * p->seg_bytes;
    return p->bytes - off < p->seg_bytes ? p->bytes - off : p->seg_bytes;
}

int gpupool_create_legacy(struct gpupool *p, uint64_t bytes, const char *uuid, const char **why)
{
    (void)bytes, (void)uuid;
    memset(p, 0, sizeof(*p));
    return no_cuda(why);
}

int gpupool_import_legacy(struct gpupool *p, const void *ipc, uint64_t bytes, const char *uuid,
                          const char **why)
{
    (void)ipc, (void)bytes, (void)uuid;
    memset(p, 0, sizeof(*p));
    return no_cuda(why);
}

void gpupool_destroy(struct gpupool *p) { memset(p, 0, sizeof(*p)); }

int gpupool_register_host(void *addr, size_t bytes, const char **why)
{
    (void)addr, (void)bytes;
    return no_cuda(why);
}

void gpupool_unregister_host(void *addr) { (void)addr; }
