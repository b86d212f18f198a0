/* gpupool.h - device memory shareable across processes through CUDA VMM file descriptors.
 *
 * The owner (caked) creates the pool with cuMemCreate (POSIX file-descriptor handle type),
 * maps it, and exports a file descriptor; another process (libcake) imports the descriptor
 * and maps the same memory into its own address space. GPUs are named by UUID
 * ("GPU-xxxxxxxx-xxxx-..." as nvidia-smi prints it). The size is rounded up to the
 * allocation granularity (2 MiB on current GPUs). Built only with CUDA (CAKE_HAVE_CUDA). */
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
    uint64_t bytes;
    uint64_t granularity;
    unsigned long long handle; /* CUmemGenericAllocationHandle */
    uint64_t va;               /* CUdeviceptr where it is mapped in this process */
    int legacy;                /* 1: cudaMalloc'd and shared by a legacy IPC handle, 2: opened from one */
    unsigned char ipc[64];     /* cudaIpcMemHandle_t of a legacy pool */
};

/* Creates and maps `bytes` on the GPU named by uuid (NULL or "": device 0). Returns 0 or a
 * negative errno-style code with a message in *why (static or in pool->uuid). */
int gpupool_create(struct gpupool *p, uint64_t bytes, const char *uuid, const char **why);
/* A file descriptor another process can import (the caller owns it and closes it). */
int gpupool_export(const struct gpupool *p, int *fd, const char **why);
/* Imports an exported pool on this process's view of the GPU named by uuid. */
int gpupool_import(struct gpupool *p, int fd, uint64_t bytes, const char *uuid, const char **why);
/* The fallback where VMM export is refused: cudaMalloc'd memory shared by a legacy CUDA IPC
 * handle (pool->ipc, 64 bytes, travels in the HELLO reply instead of an fd). */
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
