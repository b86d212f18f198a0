/* gpupool.h - device memory shareable across processes through CUDA VMM file descriptors.
 *
 * The owner (caked) reserves the pool's address range and gives it memory one segment at a
 * time (cuMemCreate, POSIX file-descriptor handle type), exporting each segment's own file
 * descriptor; another process (libcake) reserves a range of the same size and maps the
 * segments it is given at the same offsets, so offsets mean the same in every process while
 * each process holds only the segments of its tenant. GPUs are named by UUID
 * ("GPU-xxxxxxxx-xxxx-..." as nvidia-smi prints it). Sizes are multiples of the allocation
 * granularity (2 MiB on current GPUs). Built only with CUDA (CAKE_HAVE_CUDA). */
#ifndef CAKE_GPUPOOL_H
#define CAKE_GPUPOOL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct gpupool {
    int device;               /* CUDA ordinal */
    char uuid[48];            /* "GPU-..." */
    uint64_t bytes;           /* the reserved range, a multiple of granularity */
    uint64_t granularity;
    uint64_t va;              /* CUdeviceptr of the range in this process */
    uint64_t seg_bytes;       /* segments: one allocation each (VMM pools) */
    uint32_t n_segs;
    unsigned long long *seg;  /* CUmemGenericAllocationHandle of each mapped segment, 0 none */
    int legacy;               /* 1: cudaMalloc'd and shared by a legacy IPC handle, 2: opened from one */
    unsigned char ipc[64];    /* cudaIpcMemHandle_t of a legacy pool */
};

/* Reserves `bytes` of address range on the GPU named by uuid (NULL or "": device 0), cut
 * into segments of seg_bytes (a multiple of the granularity) that get memory one by one
 * (gpupool_seg_fresh in the owner, gpupool_seg_import in a client). bytes is rounded up to
 * the granularity. Returns 0 or a negative errno-style code with a message in *why. */
int gpupool_create(struct gpupool *p, uint64_t bytes, uint64_t seg_bytes, const char *uuid,
                   const char **why);
/* The granularity on that GPU (to size a pool before creating it). */
int gpupool_granularity(const char *uuid, uint64_t *g, const char **why);
/* Owner: segment i gets a new allocation (any previous one is unmapped and released here;
 * processes that imported it keep it until they drop it, and never see the new one). */
int gpupool_seg_fresh(struct gpupool *p, uint32_t i, const char **why);
/* Owner: a file descriptor of segment i another process can import (the caller closes it). */
int gpupool_seg_export(const struct gpupool *p, uint32_t i, int *fd, const char **why);
/* Client: maps the segment passed as fd at its place in this process's range (replacing
 * what was there). The fd stays the caller's. */
int gpupool_seg_import(struct gpupool *p, uint32_t i, int fd, const char **why);
/* Client: unmaps and releases segment i (its tenant lost it). */
void gpupool_seg_drop(struct gpupool *p, uint32_t i);
/* Bytes of segment i (the last one may be short). */
uint64_t gpupool_seg_len(const struct gpupool *p, uint32_t i);
/* The fallback where VMM export is refused: cudaMalloc'd memory shared by a legacy CUDA IPC
 * handle (pool->ipc, 64 bytes, travels in the HELLO reply instead of an fd). One handle for
 * the whole pool: every engine maps all of it, so tenants are not isolated. */
int gpupool_create_legacy(struct gpupool *p, uint64_t bytes, const char *uuid, const char **why);
int gpupool_import_legacy(struct gpupool *p, const void *ipc, uint64_t bytes, const char *uuid,
                          const char **why);
void gpupool_destroy(struct gpupool *p);

/* Registers a host range (the memfd pool's mapping) with CUDA for fast copies; returns 0,
 * or -ENOTSUP where no GPU is present. */
int gpupool_register_host(void *addr, size_t bytes, const char **why);
void gpupool_unregister_host(void *addr);

#ifdef __cplusplus
}
#endif
#endif
