// ring.cu - query rings in the GPU pool's pages: gather a layer's rows oldest first (see
// kern_cuda.h; the page layout is proto/shm.h's shm_ring).
#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_internal.h"
#include "kern_cuda.h"

struct rparams {
    uint8_t *dst;
    const uint8_t *base;
    const uint64_t *page_off;
    uint32_t w, row, rpp, hpp, pph, first, n_q, q_heads, vec;
};

// the row of head h at ring slot `slot` (shm_ring_at)
__device__ __forceinline__ const uint8_t *ring_row(const rparams &p, uint32_t h, uint32_t slot)
{
    if (p.pph == 1)
        return p.base + p.page_off[h / p.hpp] + ((size_t)(h % p.hpp) * p.w + slot) * p.row;
    return p.base + p.page_off[(size_t)h * p.pph + slot / p.rpp] + (size_t)(slot % p.rpp) * p.row;
}

// dst[h][i] <- ring row (first + i) mod w of head h; `vec` 16-byte pieces per row, or 2-byte
// pieces when the row is not a multiple of 16 bytes
template <typename T>
__global__ void ring_gather(rparams p)
{
    size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t total = (size_t)p.q_heads * p.n_q * p.vec;
    if (x >= total)
        return;
    uint32_t v = x % p.vec, i = (x / p.vec) % p.n_q, h = (uint32_t)(x / p.vec / p.n_q);
    const T *s = (const T *)ring_row(p, h, (p.first + i) % p.w);
    T *d = (T *)(p.dst + ((size_t)h * p.n_q + i) * p.row);
    d[v] = s[v];
}

extern "C" int kern_cuda_ring_gather(void *dst, const uint8_t *base, const uint64_t *page_off,
                                     uint32_t q_heads, uint32_t w, uint32_t row_bytes,
                                     uint32_t rows_per_page, uint32_t heads_per_page,
                                     uint32_t pages_per_head, uint32_t first, uint32_t n_q,
                                     void *stream)
{
    if (!w || first >= w || n_q > w || !row_bytes || row_bytes % 2 || !rows_per_page ||
        !heads_per_page || !pages_per_head || (pages_per_head == 1 && heads_per_page * w > rows_per_page))
        return -EINVAL;
    int wide = row_bytes % 16 == 0;
    rparams p = {(uint8_t *)dst, base, page_off, w, row_bytes, rows_per_page, heads_per_page,
                 pages_per_head, first, n_q, q_heads, wide ? row_bytes / 16 : row_bytes / 2};
    size_t total = (size_t)q_heads * n_q * p.vec;
    if (!total)
        return 0;
    cudaStream_t st = (cudaStream_t)stream;
    if (wide)
        ring_gather<uint4><<<div_up(total, 256), 256, 0, st>>>(p);
    else
        ring_gather<uint16_t><<<div_up(total, 256), 256, 0, st>>>(p);
    CK(cudaGetLastError());
    return 0;
}
