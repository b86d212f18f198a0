// score_wg_dev.cuh - internal to the CUDA kernels: the scoring passes on Hopper's wgmma
// (sm_90a) at one shape, 8B models' GQA with CAKE's default window (wg_shape), as bodies
// with score_mma_dev.cuh's contracts (a built target without wgmma runs its mma.sync bodies
// in their place). score_mma.cu's mpass1_wg and mpass2_wg and evict.cu's devict<..., WG>
// run them. C++ only.
#ifndef CAKE_SCORE_WG_DEV_CUH
#define CAKE_SCORE_WG_DEV_CUH

#include <cuda.h>
#include <type_traits>

#include "score_mma_dev.cuh"

namespace smma {

// The wgmma passes' stages by the bulk tensor copy (TMA) where a layer's pages tile: the key
// pool as rows of 128 elements (256 bytes) from its base, boxes of `rows` x 64 elements in
// the stages' 128-byte swizzle (rows: a power of two dividing the pages' tokens, 16 to 64);
// rows 0: none, the cp.async copies. A kernel parameter (__grid_constant__: TMA reads it
// there). A key row's map row is its byte offset / 256: a block whose chunk has a page offset that
// is not a multiple of 256 bytes (or past the map's 2^31 rows) copies by cp.async instead
// (caked's pages are 64 KiB apart, so in caked all are).
struct wg_tma {
    CUtensorMap map;
    uint32_t rows;
};
// score_mma.cu: the map for keys at base (tokens_per_page tpp, head_dim d) on device dev;
// rows 0 where it does not apply (no wgmma, head_dim not 128, pages of fewer than 16 tokens
// or not a multiple of 16, base not 256-byte aligned, no encoder in the driver) or is turned
// off (CAKE_TMA=0).
wg_tma wg_tma_for(int dev, const void *base, uint32_t tpp, uint32_t d);

// Pass 2 on Hopper's wgmma (sm_90a): the block's two warpgroups each multiply 64 keys of
// a stage of their own by all 128 query columns of the kv head in one chain of 8
// m64n128k16 (A the keys, B the queries, both from shared memory in the stages' 128-byte
// swizzled rows, which are wgmma's K-major layout with a 128-byte swizzle), so no query
// fragments sit in registers and the tensor work is 8 instructions a warpgroup and stage,
// not 128 mma.sync a warp. A
// thread then holds 2 keys x 32 columns: every head's 8 values of its keys, so a key's sum
// over the heads needs one quad's shuffles and no shared memory (no `part`, no finish).
// The shape: head_dim 128, 4 heads of 32 window rows a kv head (8B models' GQA with CAKE's
// default window), the queries' 32 KB beside ST stages. Compiled for other targets (no
// wgmma) the same entry runs pass2_body, the queries' room holding its partial sums.
__host__ __device__ constexpr bool wg_shape(uint32_t ks, uint32_t G, uint32_t nq, uint32_t nqp)
{
    return ks == 8 && G == 4 && nq == 32 && nqp == 32;
}
constexpr size_t WG_Q_BYTES = 2 * (size_t)TK * 128; // 128 query rows, two 64-element atoms
static_assert(WG_Q_BYTES >= (size_t)2 * TK * 4 * 1 * 2 * sizeof(float), "the fallback's partial sums fit");

// The bulk tensor copy (TMA; tools/wgp2.cu uses these too): a stage's arrival barrier (one
// arrival: the copying warp's lane 0, with the bytes the stage expects), the wait for its
// phase, and one box of the keys' map into shared memory counted on it
__device__ __forceinline__ void mbar_init(uint32_t a) { asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(a)); }
__device__ __forceinline__ void mbar_expect(uint32_t a, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(a), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t a, uint32_t parity)
{
    asm volatile("{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}\n" ::"r"(a),
                 "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_box(uint32_t dst, const CUtensorMap *map, uint32_t x, uint32_t y, uint32_t mbar)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                 ::"r"(dst), "l"((uint64_t)map), "r"(x), "r"(y), "r"(mbar) : "memory");
}
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// a K-major operand in 128-byte swizzled rows: 8-row groups 1024 bytes apart
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr)
{
    return (uint64_t)((saddr & 0x3ffff) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 |
           (uint64_t)1 << 62;
}
// D (64 x 128, f32) += A (64 keys x 16) . B (16 x 128 columns), both from shared memory
template <typename T> __device__ __forceinline__ void wg_mma(float (&d)[64], uint64_t da, uint64_t db, int acc);
#define CAKE_WG_MMA(TY, PTX)                                                                                                 \
    template <> __device__ __forceinline__ void wg_mma<TY>(float (&d)[64], uint64_t da, uint64_t db, int acc)               \
    {                                                                                                                        \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                           \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
                     : "l"(da), "l"(db), "r"(acc));                                                                          \
    }
CAKE_WG_MMA(__nv_bfloat16, "bf16")
CAKE_WG_MMA(__half, "f16")
#undef CAKE_WG_MMA
// The same with A (64 rows x 16) in registers, mma.sync's m16n8k16 A fragment for each warp's
// 16 rows: {a0, a1, a2, a3} = rows r, r + 8 at k 2 (lane % 4), then both at k + 8.
template <typename T> __device__ __forceinline__ void wg_mma_ra(float (&d)[64], const uint32_t (&a)[4], uint64_t db, int acc);
#define CAKE_WG_MMA_RA(TY, PTX)                                                                                              \
    template <> __device__ __forceinline__ void wg_mma_ra<TY>(float (&d)[64], const uint32_t (&a)[4], uint64_t db, int acc) \
    {                                                                                                                        \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                           \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));                                            \
    }
CAKE_WG_MMA_RA(__nv_bfloat16, "bf16")
CAKE_WG_MMA_RA(__half, "f16")
#undef CAKE_WG_MMA_RA
// the accumulators are read after wgmma's wait, not before: each passes through an empty asm
// the compiler must keep after the wait
__device__ __forceinline__ void wg_hold(float (&d)[64])
{
#pragma unroll
    for (int i = 0; i < 64; i++)
        asm volatile("" : "+f"(d[i])::"memory");
}
// Whether the block copies keys [c0, c1) by TMA: tm's map applies and every page offset of
// the chunk is a multiple of 256 bytes within the map's rows (else cp.async: any page table
// stays correct). Every thread of the block calls it.
__device__ __forceinline__ bool tma_usable(const mparams &p, const wg_tma *tm, uint32_t c0, uint32_t c1)
{
    if (!tm || !tm->rows || c1 <= c0)
        return false;
    bool odd = false;
    for (uint32_t q = c0 / p.tpp + threadIdx.x; q <= (c1 - 1) / p.tpp; q += THREADS)
        odd |= (p.page_off[q] % 256) != 0 || (p.page_off[q] >> 38) != 0;
    return !__syncthreads_or(odd);
}
// The map row of box `lane` (tm's rows R) of the tile of `rows` keys from j0 (head g); ~0u
// for none: a lane past the tile's boxes or a box wholly past c1 (j0 = c1: no tile)
__device__ __forceinline__ uint32_t tma_row(const mparams &p, const wg_tma *tm, uint32_t g, uint32_t j0,
                                            uint32_t c1, uint32_t rows, uint32_t lane)
{
    uint32_t j = j0 + lane * tm->rows;
    return lane < rows / tm->rows && j < c1 ? (uint32_t)(key_off(p, g, j) / 256) : ~0u;
}
// One warp's copy of a tile into the stage at st (its two halves of 64 columns HALF bytes
// apart, 128-byte rows, the 128-byte swizzle), counted on the mbarrier at mb: lane b copies
// box b from map row `row` (tma_row's; a box lies in one page: its rows divide the page's)
template <uint32_t HALF>
__device__ __forceinline__ void tma_tile(const wg_tma *tm, uint32_t st, uint32_t mb, uint32_t row, uint32_t lane)
{
    uint32_t R = tm->rows, nb = __popc(__ballot_sync(0xffffffffu, row != ~0u));
    if (lane == 0)
        mbar_expect(mb, nb * R * 256);
    __syncwarp();
    if (row != ~0u) {
        tma_box(st + lane * R * 128, &tm->map, 0, row, mb);
        tma_box(st + HALF + lane * R * 128, &tm->map, 64, row, mb);
    }
}
#endif

// pass2_body's contract (keys [c0, c1) of kv head g, acc[j], e_sum, v_sum) for wg_shape's
// shape, with ST stages of TK keys and then WG_Q_BYTES of the queries at smem. The two
// warpgroups run apart: the stages' room is two rings of ST stages of 64 keys (WG_ROWS),
// one a warpgroup, and warpgroup w takes the chunk's 64-key tiles w, w + 2, ... (from the
// end, as pass2_body: the tail pass 1 read last is still in L2), loading and reading its
// own ring and waiting only on its own 128 threads (a named barrier) - so one warpgroup's
// next loads never wait for the other's epilogue (the prototype, tools/wgp2.cu, on two H100
// hosts: 1.43x and 1.47x the copy's floor at 128K against 1.51x and 1.53x with the block's
// barrier).
constexpr int WG_ROWS = 64;
// tm (rows nonzero): the stages by TMA, the first warp of each warpgroup issuing its ring's
// boxes (boxes wholly past c1 left out), an mbarrier a stage; else by cp.async from all its
// threads. rowLnL NULL: the rows' log-normalizers are rowM alone (the engine's log-sum-exps,
// which wg_shape's rows read where the engine put them: no lse_rows launch).
template <typename T, int ST, bool ENT = true>
__device__ void pass2_body_wg(const mparams &p, uint32_t g, uint32_t c0, uint32_t c1, uint8_t *smem,
                              const float *rowM, const float *rowLnL, float *acc, double &e_sum,
                              double &v_sum, const wg_tma *tm = nullptr)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __shared__ alignas(8) uint64_t full[2][ST];
    using sh = shape<8>;
    constexpr uint32_t WST = WG_ROWS * 256, WATOM = WG_ROWS * 128; // a ring's stage, its atoms
    static_assert(2 * ST * WST == ST * sh::STAGE_BYTES, "two rings fill the stages' room");
    uint8_t *qs = smem + ST * sh::STAGE_BYTES;
    uint32_t tid = threadIdx.x, wg = tid / 128, wi = tid % 128 / 32, lane = tid % 32;
    uint8_t *ring = smem + wg * ST * WST;
    uint32_t nt = (c1 - c0 + WG_ROWS - 1) / WG_ROWS, nl = nt > wg ? (nt - wg + 1) / 2 : 0;
    auto key0 = [&](uint32_t i) { return c0 + (nt - 1 - (wg + 2 * i)) * WG_ROWS; }; // the ring's tile i
    // TMA: the warpgroup's first warp copies a tile (tma_tile), the map rows of the next tile
    // it loads read from the page table a tile ahead (nxt), off the loop's path (one thread
    // walking the boxes' pages as it issued ran the library's scoring at 1.46x the floor at
    // 128K where the prototype's 16-row boxes read 1.32x)
    const bool tma = tma_usable(p, tm, c0, c1);
    auto box_row = [&](uint32_t i) { return tma_row(p, tm, g, i < nl ? key0(i) : c1, c1, WG_ROWS, lane); };
    auto load = [&](uint32_t i, uint32_t s, uint32_t row) { // the ring's tile i into its stage s
        if (!tma)
            load_tile<8, WG_ROWS, 128>(p, g, key0(i), c1, ring + s * WST);
        else if (!wi)
            tma_tile<WATOM>(tm, (uint32_t)__cvta_generic_to_shared(ring + s * WST),
                            (uint32_t)__cvta_generic_to_shared(&full[wg][s]), row, lane);
    };
    if (tma && tid % 128 == 0) {
        for (int s = 0; s < ST; s++)
            mbar_init((uint32_t)__cvta_generic_to_shared(&full[wg][s]));
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    for (uint32_t x = tid; x < 128 * 16; x += THREADS) { // column c's row, 16 pieces
        uint32_t c = x / 16, v = x % 16;
        const uint8_t *row = p.ring_off ? ring_row(p, g * p.G + c / p.nqp, (p.first + c % p.nqp) % p.w)
                                        : (const uint8_t *)p.q + ((size_t)g * p.G * p.nq + c) * p.d * 2;
        cp_async16(qs + swz<8>(c, v), row + v * 16, true);
    }
    cp_async_commit();
#pragma unroll
    for (int s = 0; s < ST - 1; s++) {
        if (s < (int)nl)
            load(s, s, tma && !wi ? box_row(s) : ~0u);
        cp_async_commit();
    }
    uint32_t nxt = tma && !wi ? box_row(ST - 1) : ~0u; // (TMA) the next load's box
    float B2[32]; // the thread's columns 8i + 2 (lane % 4) + e: log2 of their normalizers
#pragma unroll
    for (int i = 0; i < 16; i++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            uint32_t c = 8 * i + 2 * (lane % 4) + e;
            B2[2 * i + e] = (rowM[c] + (rowLnL ? rowLnL[c] : 0.0f)) * LOG2E;
        }
    const float nq = (float)p.nq, inq = 1.0f / p.nq, inq1 = 1.0f / (p.nq - 1);
    uint32_t qa = (uint32_t)__cvta_generic_to_shared(qs);
    cp_async_wait<ST - 1>(); // the queries, every thread's copies of them
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); // cp.async -> wgmma
    __syncthreads();
    for (uint32_t k = 0; k < nl; k++) {
        if (tma) {
            mbar_wait((uint32_t)__cvta_generic_to_shared(&full[wg][k % ST]), (k / ST) & 1);
        } else {
            cp_async_wait<ST - 2>();
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        }
        // the warpgroup's 128 threads: tile k landed for all, and all are done with the stage
        // the next load takes (read in step k - 1)
        if (wg == 0) // (immediate ids: a register id reserves all 16 barriers)
            asm volatile("bar.sync 1, 128;\n" ::: "memory");
        else
            asm volatile("bar.sync 2, 128;\n" ::: "memory");
        if (k + ST - 1 < nl) {
            load(k + ST - 1, (k + ST - 1) % ST, nxt);
            if (tma && !wi)
                nxt = box_row(k + ST);
        }
        cp_async_commit();
        uint32_t sa = (uint32_t)__cvta_generic_to_shared(ring + (k % ST) * WST);
        uint32_t j0 = key0(k);
        float d[64]; // the first step overwrites it (scale-d 0)
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < 8; kk++) { // k16 steps: 32 bytes into an atom's rows, 4 an atom
            uint32_t off = (kk / 4) * (uint32_t)sh::ATOM_BYTES + (kk % 4) * 32;
            wg_mma<T>(d, wg_desc(sa + (kk / 4) * WATOM + (kk % 4) * 32), wg_desc(qa + off), kk > 0);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        wg_hold(d);
        float ent[2] = {0.0f, 0.0f};
        // a tile wholly inside the chunk needs no test of its keys (two selects a probability)
        auto epilogue = [&](auto tail) {
#pragma unroll
            for (int e2 = 0; e2 < 2; e2++) { // the thread's keys: rows lane / 4 and + 8 of its warp's 16
                uint32_t j = j0 + wi * 16 + lane / 4 + e2 * 8;
                bool live = !decltype(tail)::value || j < c1;
                float I = 0.0f, V = 0.0f;
#pragma unroll
                for (int h = 0; h < 4; h++) { // head h: n8 chunks 4h..4h+3, two columns each
                    float pv[8];
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        int i = 4 * h + u / 2, e = u % 2;
                        float x = fmaf(d[4 * i + 2 * e2 + e], p.c2, -B2[2 * i + e]), pr = ex2(x);
                        if (decltype(tail)::value)
                            pr = live ? pr : 0.0f, x = live ? x : 0.0f;
                        pv[u] = pr;
                        if (ENT)
                            ent[e] = fmaf(pr, x, ent[e]);
                    }
                    // deviations from the head's first probability (quad lane 0's), as pass2_body
                    float p0 = __shfl_sync(0xffffffffu, pv[0], lane & ~3u);
                    float s1[2] = {0.0f, 0.0f}, s2[2] = {0.0f, 0.0f};
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        float dl = pv[u] - p0;
                        s1[u % 2] += dl, s2[u % 2] = fmaf(dl, dl, s2[u % 2]);
                    }
                    float a = s1[0] + s1[1], b = s2[0] + s2[1];
                    a += __shfl_xor_sync(0xffffffffu, a, 1);
                    b += __shfl_xor_sync(0xffffffffu, b, 1);
                    a += __shfl_xor_sync(0xffffffffu, a, 2);
                    b += __shfl_xor_sync(0xffffffffu, b, 2);
                    float mean = fmaf(nq, p0, a) * inq, var = fmaxf(fmaf(-a * inq, a, b), 0.0f) * inq1;
                    I += p.mw * mean + p.gamma * var;
                    V += var;
                }
                if (live && lane % 4 == 0) {
                    acc[j] = I;
                    v_sum += V;
                }
            }
        };
        if (j0 + WG_ROWS <= c1)
            epilogue(std::false_type());
        else
            epilogue(std::true_type());
        if (ENT)
            e_sum += ent[0] + ent[1];
    }
    cp_async_wait<0>();
    __syncthreads(); // the stages are free for the caller
#else
    (void)tm;
    pass2_body<T, 8, 4, 1, ST, ENT>(p, g, c0, c1, smem, rowM, rowLnL, acc, e_sum, v_sum);
#endif
}

// Pass 1 on wgmma (pass1_body's contract: keys [c0, c1) of kv head g, each query column's
// max and exp-sum to m_out, l_out; wg_shape's shape, ST stages at smem). Oriented the other
// way from pass 2: the queries are A, in registers (warpgroup wg's 64 rows: its two heads),
// the stage's 128 keys B, so a thread's 64 accumulators are 2 query rows x 32 keys and its
// running max and sum are 2 pairs of registers; a row's four lanes merge once at the end
// (no shared memory, no cross-warp finish), and the queries take no shared memory, so three
// stages fit two blocks an SM. The base of a row's sum (log2 units) rises lazily: a tile's
// terms are summed against the base as it stands, and only where that sum passes 2^16 (some
// term then passes 2^11; on the first tile the base is -inf and the sum inf or NaN) is the
// tile's max taken and the sum redone against it: no term kept is above 2^16, none
// overflows, and the common tile costs an FMA, an exponential and an add a term.
template <typename T, int ST>
__device__ void pass1_body_wg(const mparams &p, uint32_t g, uint32_t c0, uint32_t c1, uint8_t *smem,
                              float *m_out, float *l_out, const wg_tma *tm = nullptr)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __shared__ alignas(8) uint64_t full[ST];
    using sh = shape<8>;
    uint32_t tid = threadIdx.x, wg = tid / 128, wi = tid % 128 / 32, lane = tid % 32;
    uint32_t nt = (c1 - c0 + TK - 1) / TK, clean = min(c1, p.wb + 1); // keys below clean: no mask
    // TMA: the block's first warp copies a tile (tma_tile), its rows read a tile ahead
    const bool tma = tma_usable(p, tm, c0, c1);
    auto box_row = [&](uint32_t k) { return tma_row(p, tm, g, k < nt ? c0 + k * TK : c1, c1, TK, lane); };
    auto load = [&](uint32_t k, uint32_t s, uint32_t row) { // tile k into stage s
        if (!tma)
            load_tile<8>(p, g, c0 + k * TK, c1, smem + s * sh::STAGE_BYTES);
        else if (tid < 32)
            tma_tile<(uint32_t)sh::ATOM_BYTES>(tm, (uint32_t)__cvta_generic_to_shared(smem + s * sh::STAGE_BYTES),
                                               (uint32_t)__cvta_generic_to_shared(&full[s]), row, lane);
    };
    if (tma) {
        if (tid == 0) {
            for (int s = 0; s < ST; s++)
                mbar_init((uint32_t)__cvta_generic_to_shared(&full[s]));
            asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        }
        __syncthreads(); // the barriers' init before anyone waits on them
    }
#pragma unroll
    for (int s = 0; s < ST - 1; s++) {
        if (s < (int)nt)
            load(s, s, tma && tid < 32 ? box_row(s) : ~0u);
        cp_async_commit();
    }
    uint32_t nxt = tma && tid < 32 ? box_row(ST - 1) : ~0u; // (TMA) the next load's boxes
    // the thread's query rows: column 64 wg + 16 wi + lane / 4 and 8 more (head c / 32, window row c % 32)
    uint32_t qa[8][4];
#pragma unroll
    for (int e2 = 0; e2 < 2; e2++) {
        uint32_t c = 64 * wg + 16 * wi + lane / 4 + 8 * e2;
        const T *row = p.ring_off ? (const T *)ring_row(p, g * p.G + c / p.nqp, (p.first + c % p.nqp) % p.w)
                                  : (const T *)p.q + ((size_t)g * p.G * p.nq + c) * p.d;
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            qa[kk][e2] = *(const uint32_t *)(row + kk * 16 + 2 * (lane % 4));
            qa[kk][2 + e2] = *(const uint32_t *)(row + kk * 16 + 8 + 2 * (lane % 4));
        }
    }
    const uint32_t qi[2] = {(16 * wi + lane / 4) % 32, (16 * wi + lane / 4 + 8) % 32}; // window rows
    float b[2] = {-INFINITY, -INFINITY}, sm[2] = {0.0f, 0.0f};
    for (uint32_t k = 0; k < nt; k++) {
        if (tma) {
            mbar_wait((uint32_t)__cvta_generic_to_shared(&full[k % ST]), (k / ST) & 1);
        } else {
            cp_async_wait<ST - 2>();
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); // cp.async -> wgmma
        }
        __syncthreads(); // tile k landed for all, and all are done with the stage the next load takes
        if (k + ST - 1 < nt) {
            load(k + ST - 1, (k + ST - 1) % ST, nxt);
            if (tma && tid < 32)
                nxt = box_row(k + ST);
        }
        cp_async_commit();
        uint32_t sa = (uint32_t)__cvta_generic_to_shared(smem + (k % ST) * sh::STAGE_BYTES);
        uint32_t j0 = c0 + k * TK;
        float d[64]; // the first step overwrites it (scale-d 0)
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < 8; kk++)
            wg_mma_ra<T>(d, qa[kk], wg_desc(sa + (kk / 4) * (uint32_t)sh::ATOM_BYTES + (kk % 4) * 32), kk > 0);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        wg_hold(d);
        if (j0 + TK > clean) // keys past the chunk, or window keys a query must not see: -inf
#pragma unroll
            for (int i = 0; i < 16; i++)
#pragma unroll
                for (int e2 = 0; e2 < 2; e2++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        uint32_t j = j0 + 8 * i + 2 * (lane % 4) + e;
                        if (j >= c1 || j > p.wb + qi[e2])
                            d[4 * i + 2 * e2 + e] = -INFINITY;
                    }
#pragma unroll
        for (int e2 = 0; e2 < 2; e2++) { // row e2: d[4 i + 2 e2 + e], key 8 i + 2 (lane % 4) + e
            float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                s0 += ex2(fmaf(d[4 * i + 2 * e2], p.c2, -b[e2]));
                s1 += ex2(fmaf(d[4 * i + 2 * e2 + 1], p.c2, -b[e2]));
            }
            float s = s0 + s1;
            if (!(s <= 65536.0f)) { // the first tile, or a term past 2^11: the tile's max as base
                float tm = -INFINITY;
#pragma unroll
                for (int i = 0; i < 32; i++)
                    tm = fmaxf(tm, d[4 * (i / 2) + 2 * e2 + i % 2]);
                float nb = fmaxf(b[e2], tm * p.c2);
                s = 0.0f;
                if (nb != -INFINITY) { // else every key so far masked: nothing to add
                    sm[e2] = rebase(sm[e2], b[e2], nb);
                    b[e2] = nb;
#pragma unroll
                    for (int i = 0; i < 32; i++)
                        s += ex2(fmaf(d[4 * (i / 2) + 2 * e2 + i % 2], p.c2, -nb));
                }
            }
            sm[e2] += s;
        }
    }
    cp_async_wait<0>();
    merge_xor(b, sm, 1, 4); // a row's 32 keys a tile are on its quad's four lanes
    if (lane % 4 == 0)
#pragma unroll
        for (int e2 = 0; e2 < 2; e2++) {
            uint32_t c = 64 * wg + 16 * wi + lane / 4 + 8 * e2;
            bool ok = b[e2] != -INFINITY;
            m_out[c] = ok ? b[e2] * LN2 : -INFINITY; // natural-log units, as pass1_body
            l_out[c] = ok ? sm[e2] : 0.0f;
        }
    __syncthreads(); // the stages are free for the caller
#else
    (void)tm;
    pass1_body<T, 8, 4, ST>(p, g, c0, c1, smem, m_out, l_out);
#endif
}

} // namespace smma

#endif
