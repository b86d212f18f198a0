/* cuda_internal.h - what the CUDA kernel files share (C++, internal): the error check that
 * logs a failed CUDA call and returns -EIO, and a rounding-up division. */
#ifndef CAKE_CUDA_INTERNAL_H
#define CAKE_CUDA_INTERNAL_H

#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

#define CK(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "caked cuda: %s failed at %s:%d: %s\n", #call, __FILE__,      \
                    __LINE__, cudaGetErrorString(e_));                                    \
            return -EIO;                                                                  \
        }                                                                                 \
    } while (0)

static inline uint32_t div_up(uint64_t a, uint64_t b) { return (uint32_t)((a + b - 1) / b); }

#endif
