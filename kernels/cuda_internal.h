/* cuda_internal.h - what the CUDA kernel files share (C++, internal): the error check that
 * logs a failed CUDA call and returns -EIO, a rounding-up division, a process-wide switch
 * an environment variable sets, programmatic dependent launches, whether a top-k runs in
 * clusters, and the indicator's pooling of one column. */
#ifndef CAKE_CUDA_INTERNAL_H
#define CAKE_CUDA_INTERNAL_H

#include <atomic>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utility>

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

/* A process-wide on/off switch (sw -1: not yet read): the environment's `name` at first use
 * ("0": off, anything else or unset: on), then whatever a kern_cuda_*_set_* call stores. */
static inline int env_switch(std::atomic<int> &sw, const char *name)
{
    int v = sw.load();
    if (v < 0) {
        const char *env = getenv(name);
        sw.compare_exchange_strong(v, !env || strcmp(env, "0") != 0);
        v = sw.load();
    }
    return v;
}

/* Device dev's compute capability as major * 10 + minor (90 for Hopper), asked once a
 * device; 0 where it cannot be known */
inline int device_cc(int dev)
{
    static std::atomic<int> cc[64]; // the capability plus one; 0: not asked
    if (dev < 0 || dev >= 64)
        return 0;
    int v = cc[dev].load();
    if (!v) {
        int ma = 0, mi = 0;
        if (cudaDeviceGetAttribute(&ma, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&mi, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
            cudaGetLastError();
            return 0;
        }
        cc[dev].store(v = ma * 10 + mi + 1);
    }
    return v - 1;
}

/* Programmatic dependent launch (compute capability 9.0): a kernel launched by launch_pdl
 * may start its blocks while the kernel before it in the stream ends, so its launch's
 * latency hides behind that kernel's tail. It calls pdl_wait() before it reads anything the
 * kernel before it wrote or writes anything that kernel reads (the wait returns once that
 * kernel has completed and its writes are visible); a kernel calling pdl_trigger() lets the
 * next one launch before all its own blocks have exited. Both are no-ops on other targets,
 * and launch_pdl a plain launch on other devices or with CAKE_PDL=0. */
__device__ __forceinline__ void pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
/* whether launches on the current device may be programmatic (CAKE_PDL, compute capability) */
inline bool pdl_on()
{
    static std::atomic<int> sw{-1};
    int dev = 0;
    return env_switch(sw, "CAKE_PDL") && cudaGetDevice(&dev) == cudaSuccess && device_cc(dev) >= 90;
}
/* k<<<grid, block, smem, st>>>(args...), programmatic where pdl_on(); with `cluster` > 0
 * the blocks also form clusters of `cluster` along x */
template <typename... KA, typename... A>
static inline cudaError_t launch_pdl(void (*k)(KA...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                                     unsigned cluster, A &&...args)
{
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at[2];
    unsigned n = 0;
    if (cluster) {
        at[n].id = cudaLaunchAttributeClusterDimension;
        at[n].val.clusterDim.x = cluster, at[n].val.clusterDim.y = 1, at[n].val.clusterDim.z = 1;
        n++;
    }
    if (pdl_on()) {
        at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[n].val.programmaticStreamSerializationAllowed = 1;
        n++;
    }
    cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = st;
    cfg.attrs = at, cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, k, std::forward<A>(args)...);
}

/* whether kern_cuda_topk_ws takes `rows` rows of n keys in one launch of a cluster of blocks
 * a row (select.cu), with no workspace */
bool topk_in_cluster(uint32_t rows, uint32_t n);

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
