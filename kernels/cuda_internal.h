/* cuda_internal.h - what the CUDA kernel files share (C++, internal): the error check that
 * logs a failed CUDA call and returns -EIO, a rounding-up division, and the indicator's
 * pooling of one column. */
#ifndef CAKE_CUDA_INTERNAL_H
#define CAKE_CUDA_INTERNAL_H

#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

#include "kern.h"

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

/* Column j of a group's summed scores acc[0..S) pooled (kern.h's kern_pool): the average
 * over [j - r, j + r] (zero padded, / (2r + 1); CAKE's r = 2 summed centre first, as the C
 * kernel does), the max over it inside [0, S), or acc[j] itself. score.cu's pooling and
 * evict.cu's one launch round alike through this. */
__device__ __forceinline__ float pool_value(const float *acc, uint32_t S, uint32_t j, int kind,
                                            uint32_t r)
{
    if (kind == KERN_POOL_AVG && r == 2) {
        float s = acc[j];
        if (j >= 1) s += acc[j - 1];
        if (j >= 2) s += acc[j - 2];
        if (j + 1 < S) s += acc[j + 1];
        if (j + 2 < S) s += acc[j + 2];
        return s / 5.0f;
    }
    uint32_t lo = j > r ? j - r : 0, hi = j + r < S ? j + r : S - 1;
    float v;
    if (kind == KERN_POOL_AVG) {
        v = 0.0f;
        for (uint32_t t = lo; t <= hi; t++)
            v += acc[t];
        v /= (float)(2 * r + 1);
    } else if (kind == KERN_POOL_MAX) {
        v = acc[lo];
        for (uint32_t t = lo + 1; t <= hi; t++)
            v = acc[t] > v ? acc[t] : v;
    } else {
        v = acc[j];
    }
    return v;
}

#endif
