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

struct pparams {
    uint8_t *const *rows;
    const int32_t *const *slots;
    const uint8_t *q;
    uint32_t H, parts, part_rows, w, row, vec;
};

// one block per (sequence, head): its decode query row into the ring slot the device tables
// hold now (read when the launch runs, so a captured launch follows every step)
template <typename T>
__global__ void ring_put(pparams p)
{
    uint32_t b = blockIdx.x, h = blockIdx.y;
    int32_t slot = *p.slots[b];
    if (slot < 0 || (uint32_t)slot >= p.w)
        return;
    uint8_t *dst = p.rows[((size_t)b * p.H + h) * p.parts + (uint32_t)slot / p.part_rows] +
                   (size_t)((uint32_t)slot % p.part_rows) * p.row;
    const T *src = (const T *)(p.q + ((size_t)b * p.H + h) * p.row);
    for (uint32_t v = threadIdx.x; v < p.vec; v += blockDim.x)
        ((T *)dst)[v] = src[v];
}

extern "C" int kern_cuda_ring_put(uint8_t *const *rows, const int32_t *const *slots,
                                  uint32_t batch, uint32_t q_heads, uint32_t parts,
                                  uint32_t part_rows, uint32_t w, uint32_t row_bytes,
                                  const void *q, void *stream)
{
    if (!batch || !q_heads || !parts || !part_rows || !w || !row_bytes || row_bytes % 2 ||
        (parts == 1 && part_rows < w) || (parts > 1 && (uint64_t)parts * part_rows < w))
        return -EINVAL;
    int wide = row_bytes % 16 == 0 && (uintptr_t)q % 16 == 0;
    pparams p = {rows, slots, (const uint8_t *)q, q_heads, parts, part_rows, w, row_bytes,
                 wide ? row_bytes / 16 : row_bytes / 2};
    cudaStream_t st = (cudaStream_t)stream;
    dim3 grid(batch, q_heads);
    if (wide)
        ring_put<uint4><<<grid, 64, 0, st>>>(p);
    else
        ring_put<uint16_t><<<grid, 64, 0, st>>>(p);
    CK(cudaGetLastError());
    return 0;
}
