// compact.cu - compaction of kept tokens in the pool's pages on the GPU (see kern_cuda.h).
#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_internal.h"
#include "kern_cuda.h"

// ---- compaction -----------------------------------------------------------

struct cparams {
    uint8_t *base;
    const uint64_t *page_off;
    uint32_t tpp, d, hkv, k, win_start, win_len;
    size_t voff, row;
    const uint32_t *keep;
    uint8_t *tmp;
};

__device__ __forceinline__ uint8_t *row_at(const cparams &p, uint32_t g, uint32_t t)
{
    return p.base + p.page_off[t / p.tpp] + ((size_t)g * p.tpp + t % p.tpp) * p.row;
}

// tmp[g][i] <- K/V of the i-th kept token (gather), 16 bytes per thread
__global__ void gather(cparams p)
{
    uint32_t rows = p.k + p.win_len, vec = (uint32_t)(p.row / 16);
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x, total = (size_t)p.hkv * rows * vec;
    if (x >= total)
        return;
    uint32_t v = x % vec, i = (x / vec) % rows, g = x / vec / rows;
    uint32_t src = i < p.k ? p.keep[(size_t)g * p.k + i] : p.win_start + (i - p.k);
    const uint8_t *s = row_at(p, g, src);
    uint8_t *t = p.tmp + ((size_t)g * rows + i) * p.row * 2;
    ((uint4 *)t)[v] = ((const uint4 *)s)[v];
    ((uint4 *)(t + p.row))[v] = ((const uint4 *)(s + p.voff))[v];
}

__global__ void scatter(cparams p)
{
    uint32_t rows = p.k + p.win_len, vec = (uint32_t)(p.row / 16);
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x, total = (size_t)p.hkv * rows * vec;
    if (x >= total)
        return;
    uint32_t v = x % vec, i = (x / vec) % rows, g = x / vec / rows;
    uint8_t *d = row_at(p, g, i);
    const uint8_t *t = p.tmp + ((size_t)g * rows + i) * p.row * 2;
    ((uint4 *)d)[v] = ((const uint4 *)t)[v];
    ((uint4 *)(d + p.voff))[v] = ((const uint4 *)(t + p.row))[v];
}

extern "C" int kern_cuda_compact(const struct kern_cuda_kv *kv, const uint32_t *keep, uint32_t k,
                                 uint32_t win_start, uint32_t win_len, void *tmp, void *stream)
{
    size_t row = (size_t)kv->head_dim * 2;
    if (row % 16 || win_start + win_len > kv->n_tokens || k > win_start)
        return -EINVAL;
    cparams p = {kv->base, kv->page_off, kv->tokens_per_page, kv->head_dim, kv->kv_heads, k,
                 win_start, win_len, kv->v_offset_bytes, row, keep, (uint8_t *)tmp};
    size_t total = (size_t)kv->kv_heads * (k + win_len) * (row / 16);
    if (!total)
        return 0;
    cudaStream_t st = (cudaStream_t)stream;
    gather<<<div_up(total, 256), 256, 0, st>>>(p);
    CK(cudaGetLastError());
    scatter<<<div_up(total, 256), 256, 0, st>>>(p);
    CK(cudaGetLastError());
    return 0;
}
