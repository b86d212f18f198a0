/* score_mma.h - internal to the CUDA kernels: the mma.sync scoring passes (score_mma.cu)
 * that kern_cuda_score_layer (score.cu) runs for the shapes they cover, and what the two
 * files share. C++ only. */
#ifndef CAKE_SCORE_MMA_H
#define CAKE_SCORE_MMA_H

#include <stddef.h>
#include <stdint.h>

#define SCORE_MAX_DEV 64

struct score_mma_args {
    const uint8_t *base;
    const uint64_t *page_off;
    uint32_t tpp, n, d, G, nq, S, hkv, chunk, chunks1, chunks2; /* chunk: keys per block */
    float mw, gamma;       /* the indicator: mw * mean + gamma * var */
    int bf16, dev;
    const void *q;
    const float *lse;      /* the engine's row log-sum-exps [G * hkv][nq], or NULL: pass 1 */
    float *m, *l;          /* pass 1 partials [hkv][chunks1][score_mma_rows()] */
    float *rowM, *rowLnL;  /* merged [hkv][score_mma_rows()] */
    float *acc;            /* [hkv][S]: sum over the group's heads of mw * mean + gamma * var */
    double *ent, *var;     /* [hkv][chunks2] */
    void *stream;
};

/* Query rows per kv head these kernels use (each head's window padded), or 0 where they do
 * not apply (head_dim other than 64 or 128, more than 256 padded rows). */
uint32_t score_mma_rows(uint32_t G, uint32_t nq, uint32_t d);

/* Pass 1 and merge (or, with lse, its rows alone), pass 2 on the stream. chunk (a multiple of 128) is the shortest chunk the
 * workspace allows; returns with chunk, chunks1, chunks2 as used (the blocks' partials in
 * ent and var: hkv * chunks2). 0, -EINVAL or -EIO. */
int score_mma_run(score_mma_args &a);

/* score.cu: merges pass 1's per-chunk (max, exp-sum) of rows r < R into each row's max and
 * log-normalizer (row stride RP); and the lock under which kernels' shared-memory limits
 * are raised. */
int score_merge(const float *m, const float *l, float *rowM, float *rowLnL, uint32_t hkv,
                uint32_t chunks, uint32_t R, uint32_t RP, void *stream);
/* score.cu: the engine's log-sum-exps lse [hkv * G][nq] as merged rows (row c of kv head g:
 * head c / nqp, window row c % nqp; rows beyond get 0), in place of pass 1 and the merge. */
int score_lse_rows(const float *lse, float *rowM, float *rowLnL, uint32_t hkv, uint32_t G,
                   uint32_t nq, uint32_t nqp, uint32_t RP, void *stream);
/* score_mma.cu: whether the passes run on wgmma (score_wg_dev.cuh's pass1_body_wg and
 * pass2_body_wg, where their shape fits) on device dev: a compute capability 9.0 device (the
 * build's sm_90a code), unless turned off (kern_cuda_score_set_wgmma, CAKE_WGMMA=0). */
bool score_wg_on(int dev);
struct score_attr_lock {
    score_attr_lock();
    ~score_attr_lock();
    score_attr_lock(const score_attr_lock &) = delete;
    score_attr_lock &operator=(const score_attr_lock &) = delete;
};

/* The shared-memory carveout a big-tile kernel asks for: kern_cuda_set_carveout's where
 * one was set, else the kernel's own (own; -1: the driver's choice). score_mma.cu owns
 * the setting. */
int score_carveout(int own);

/* What a kernel was last given on a device: its dynamic shared-memory limit and carveout
 * (plus one: 0 none yet). */
struct kern_attrs {
    size_t smem;
    int carve1;
};

#ifdef __CUDACC__
#include "cuda_internal.h"

/* Raises a kernel's dynamic shared-memory limit on this device when a larger size comes,
 * and asks for the carveout score_carveout(own) says when it changed (per kernel and
 * device: caked drives several GPUs from several threads; score.cu keeps the lock). 0 or
 * -EIO. */
template <typename K>
int smem_limit(K kernel, kern_attrs (&set)[SCORE_MAX_DEV], int dev, size_t bytes, int own)
{
    score_attr_lock lock;
    if (bytes > set[dev].smem) {
        CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
        set[dev].smem = bytes;
    }
    int cv = score_carveout(own);
    if (cv + 1 != set[dev].carve1) {
        CK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cv));
        set[dev].carve1 = cv + 1;
    }
    return 0;
}
#endif

#endif
