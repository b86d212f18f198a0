// wgp2.cu - a prototype, not part of the build: CAKE's pass 2 with the engine's log-sum-exps
// (one pass over the keys) on Hopper's wgmma, to see how near the key-read floor it comes
// (it became score_wg_dev.cuh's pass2_body_wg), and variants of it timed side by side. One
// block = two warpgroups, each multiplying 64 keys of a 128-key stage (the same 128-byte
// swizzled rows as score_mma_dev.cuh, which is wgmma's canonical K-major layout) by all 128
// query columns of a kv head (4 heads x 32 window rows) in one m64n128k16 chain of 8; a
// thread then holds 2 keys x 32 columns: every head's 8 values a key, so the per-key
// indicator (mean + gamma var summed over the heads) needs one quad's shuffles and no
// shared memory. Beside it (wgpi): the block's warpgroups apart, each with its own ring of
// 64-key stages (what pass2_body_wg became), their stages by cp.async or by TMA (in 64- or
// 16-row boxes: caked's pages hold 16 tokens), and the loads alone (also without the block's
// totals or its prologue), the launch alone, and tiles strided across a head's blocks; a plain
// read of the keys beside the copy's floor.
// WGP2_ONLY=text: the baseline and the variants whose names hold text.
// Build and run (H100/H200): nvcc -O2 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o wgp2 wgp2.cu && ./wgp2
#include <cuda.h>
#include <cuda_bf16.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "../kernels/score_wg_dev.cuh"

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

constexpr int TK = 128, D = 128, NQ = 32, G = 4, COLS = G * NQ, THREADS = 256, HKV = 8;
constexpr uint32_t ATOM = TK * 128, STAGE = 2 * ATOM, QBYTES = 2 * COLS * 128;
// ST stages, BPS blocks an SM (launch bounds): the variants timed side by side
constexpr float LOG2E = 1.4426950408889634f;

struct params {
    const __nv_bfloat16 *k, *q; // k [HKV][n][D], q [HKV*G][NQ][D]
    const float *lse;           // [HKV*G][NQ], natural log of each row's normalizer
    float *acc;                 // [HKV][S]: sum over the group's heads of mean + gamma var
    double *ent, *var;          // totals (atomics)
    uint32_t n, S, chunk;
    float c2, gamma;
};

__device__ __forceinline__ uint32_t su32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ uint32_t swz(uint32_t r, uint32_t v) { return (v / 8) * ATOM + r * 128 + (((v % 8) ^ (r % 8)) << 4); }
constexpr uint32_t ATOM64 = 64 * 128, STAGE64 = 2 * ATOM64; // wgpi's stages: 64 keys
__device__ __forceinline__ uint32_t swz64(uint32_t r, uint32_t v) { return (v / 8) * ATOM64 + r * 128 + (((v % 8) ^ (r % 8)) << 4); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
// the bulk tensor copy (TMA): the library's (a stage's arrival barrier, its expected bytes,
// the wait for a phase, a box of the keys' map: {64 elements, BOXR rows} at (x, y), 128-byte
// swizzled, completing on the barrier)
using smma::mbar_expect, smma::mbar_init, smma::mbar_wait, smma::tma_box;
__device__ __forceinline__ float ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ void cpa16(uint32_t dst, const void *src, bool ok)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
// K-major operand, 128-byte swizzle: rows of 128 bytes, 8-row groups 1024 bytes apart
__device__ __forceinline__ uint64_t desc(uint32_t saddr)
{
    return (uint64_t)((saddr & 0x3ffff) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 | (uint64_t)1 << 62;
}
__device__ __forceinline__ void wgmma(float (&d)[64], uint64_t da, uint64_t db, int acc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "r"(acc));
}

__device__ __forceinline__ void wgmma64(float (&d)[32], uint64_t da, uint64_t db, int acc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(da), "l"(db), "r"(acc));
}

// the thread's 32 columns (chunk i of 16, 2 (lane % 4) + e): their log2 normalizers
__device__ __forceinline__ void lse2(const params &p, uint32_t g, float (&B2)[32])
{
    uint32_t lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < 16; i++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            uint32_t c = 8 * i + 2 * (lane % 4) + e;
            B2[2 * i + e] = p.lse[(size_t)(g * G + c / NQ) * NQ + c % NQ] * LOG2E;
        }
}

// the block's totals: the warp's entropy terms (log2 units) and variances, one atomic each
__device__ __forceinline__ void totals(const params &p, float e, float vsum)
{
    for (int o = 16; o; o >>= 1)
        e += __shfl_xor_sync(0xffffffffu, e, o), vsum += __shfl_xor_sync(0xffffffffu, vsum, o);
    if (threadIdx.x % 32 == 0) {
        atomicAdd(p.ent, -0.6931471805599453 * e);
        atomicAdd(p.var, (double)vsum);
    }
}

// The epilogue of heads [h0, h1) for the thread's two keys jr and jr + 8 (those at or past c1
// count nothing): each head's mean and variance over its 32 window rows, summed into I and V;
// the entropy terms into ent0, ent1. In wgp2's MODE 3 head h's values sit at
// d[32 (h / 2) + 4 (4 (h % 2) + u / 2) + ...], which is the full layout's d[4 (4h + u / 2) + ...].
__device__ __forceinline__ void heads_epi(const float (&d)[64], const float (&B2)[32], uint32_t jr, uint32_t c1, float c2,
                                          float gamma, int h0, int h1, float &ent0, float &ent1, float (&I)[2], float (&V)[2])
{
    const float inq = 1.0f / NQ, inq1 = 1.0f / (NQ - 1), nq = NQ;
    uint32_t lane = threadIdx.x % 32;
#pragma unroll
    for (int e2 = 0; e2 < 2; e2++) {
        bool live = jr + 8 * e2 < c1;
#pragma unroll
        for (int h = h0; h < h1; h++) {
            float pv[8];
#pragma unroll
            for (int u = 0; u < 8; u++) { // chunk 4h + u / 2, column e = u % 2
                int i = 4 * h + u / 2, e = u % 2;
                float x = fmaf(d[4 * i + 2 * e2 + e], c2, -B2[2 * i + e]), pr = ex2(x);
                pr = live ? pr : 0.0f, x = live ? x : 0.0f;
                pv[u] = pr;
                if (u % 2) ent1 = fmaf(pr, x, ent1); else ent0 = fmaf(pr, x, ent0);
            }
            float p0 = __shfl_sync(0xffffffffu, pv[0], lane & ~3u);
            float s1a = 0.0f, s1b = 0.0f, s2a = 0.0f, s2b = 0.0f;
#pragma unroll
            for (int u = 0; u < 8; u += 2) {
                float da = pv[u] - p0, db = pv[u + 1] - p0;
                s1a += da, s2a = fmaf(da, da, s2a), s1b += db, s2b = fmaf(db, db, s2b);
            }
            float a = s1a + s1b, b = s2a + s2b;
            a += __shfl_xor_sync(0xffffffffu, a, 1);
            b += __shfl_xor_sync(0xffffffffu, b, 1);
            a += __shfl_xor_sync(0xffffffffu, a, 2);
            b += __shfl_xor_sync(0xffffffffu, b, 2);
            float var = fmaxf(fmaf(-a * inq, a, b), 0.0f) * inq1, mean = fmaf(nq, p0, a) * inq;
            I[e2] += mean + gamma * var, V[e2] += var;
        }
    }
}

// MODE 0: as score_wg_dev.cuh; 1: no epilogue (the loads and the multiplies alone); 2: no
// multiply (the loads and the epilogue over made-up values); 3: the 128 columns as two
// m64n64 chains, the first half's epilogue (heads 0, 1) while the second half multiplies;
// 4: the loads alone
template <int ST, int BPS, int MODE> __global__ void __launch_bounds__(THREADS, BPS) wgp2(params p, const __grid_constant__ CUtensorMap)
{
    extern __shared__ uint8_t smraw[];
    uint8_t *sm = smraw + ((1024 - su32(smraw) % 1024) % 1024);
    uint8_t *qs = sm + ST * STAGE;
    uint32_t g = blockIdx.y, c0 = blockIdx.x * p.chunk, c1 = min(c0 + p.chunk, p.S);
    uint32_t tid = threadIdx.x, wg = tid / 128, t = tid % 128, wi = t / 32, lane = t % 32;
    if (c0 >= c1)
        return;
    uint32_t nt = (c1 - c0 + TK - 1) / TK;
    auto load = [&](uint32_t k, uint8_t *st) { // tile k: TK rows of 16 pieces
        for (uint32_t x = tid; x < TK * 16; x += THREADS) {
            uint32_t r = x / 16, v = x % 16, j = c0 + k * TK + r;
            const __nv_bfloat16 *src = p.k + ((size_t)g * p.n + (j < c1 ? j : c0)) * D + v * 8;
            cpa16(su32(st + swz(r, v)), src, j < c1);
        }
    };
    for (uint32_t x = tid; x < COLS * 16; x += THREADS) { // the group's queries, rows = columns
        uint32_t c = x / 16, v = x % 16;
        cpa16(su32(qs + swz(c, v)), p.q + ((size_t)(g * G + c / NQ) * NQ + c % NQ) * D + v * 8, true);
    }
    for (int s = 0; s < ST - 1; s++) {
        if (s < (int)nt)
            load(s, sm + s * STAGE);
        asm volatile("cp.async.commit_group;\n");
    }
    float B2[32];
    lse2(p, g, B2);
    float ent0 = 0.0f, ent1 = 0.0f, vsum = 0.0f;
    for (uint32_t k = 0; k < nt; k++) {
        if (ST == 2)
            asm volatile("cp.async.wait_group 0;\n");
        else if (ST == 3)
            asm volatile("cp.async.wait_group 1;\n");
        else
            asm volatile("cp.async.wait_group 2;\n");
        asm volatile("fence.proxy.async.shared::cta;\n"); // cp.async's writes, to wgmma's reads
        __syncthreads();
        if (k + ST - 1 < nt)
            load(k + ST - 1, sm + ((k + ST - 1) % ST) * STAGE);
        asm volatile("cp.async.commit_group;\n");
        const uint8_t *st = sm + (k % ST) * STAGE;
        float d[64]; // the first step overwrites it (scale-d 0); MODE 3: [0, 32) heads 0-1, [32, 64) heads 2-3
        float(&dA)[32] = *reinterpret_cast<float(*)[32]>(&d[0]);
        float(&dB)[32] = *reinterpret_cast<float(*)[32]>(&d[32]);
        if (MODE == 4)
            continue;
        if (MODE == 2) {
#pragma unroll
            for (int i = 0; i < 64; i++)
                d[i] = (float)(k & 7) * 0.01f + (float)i * 0.003f;
        } else {
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
            if (MODE == 3) {
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    uint32_t off = (kk / 4) * ATOM + (kk % 4) * 32;
                    wgmma64(dA, desc(su32(st) + off + wg * 64 * 128), desc(su32(qs) + (kk / 4) * (COLS * 128) + (kk % 4) * 32), kk > 0);
                }
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    uint32_t off = (kk / 4) * ATOM + (kk % 4) * 32;
                    wgmma64(dB, desc(su32(st) + off + wg * 64 * 128), desc(su32(qs) + 64 * 128 + (kk / 4) * (COLS * 128) + (kk % 4) * 32), kk > 0);
                }
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
#pragma unroll
                for (int i = 0; i < 32; i++)
                    asm volatile("" : "+f"(dA[i])::"memory");
            } else {
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    uint32_t off = (kk / 4) * ATOM + (kk % 4) * 32;
                    wgmma(d, desc(su32(st) + off + wg * 64 * 128), desc(su32(qs) + (kk / 4) * (COLS * 128) + (kk % 4) * 32), kk > 0);
                }
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
                for (int i = 0; i < 64; i++) // the accumulators are read after the wait, not before
                    asm volatile("" : "+f"(d[i])::"memory");
            }
        }
        if (MODE == 1) {
            if (lane % 4 == 0 && d[0] == 12345.0f) // keeps the multiplies' results live
                p.acc[(size_t)g * p.S + c0] = d[63];
            continue;
        }
        float I[2] = {0.0f, 0.0f}, V[2] = {0.0f, 0.0f};
        uint32_t jr = c0 + k * TK + wg * 64 + wi * 16 + lane / 4;
        auto heads = [&](int h0, int h1) { heads_epi(d, B2, jr, c1, p.c2, p.gamma, h0, h1, ent0, ent1, I, V); };
        if (MODE == 3) {
            heads(0, 2);
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
            for (int i = 0; i < 32; i++)
                asm volatile("" : "+f"(dB[i])::"memory");
            heads(2, 4);
        } else {
            heads(0, 4);
        }
#pragma unroll
        for (int e2 = 0; e2 < 2; e2++) {
            uint32_t j = c0 + k * TK + wg * 64 + wi * 16 + lane / 4 + e2 * 8;
            if (j < c1 && lane % 4 == 0) {
                p.acc[(size_t)g * p.S + j] = I[e2];
                vsum += V[e2];
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n");
    totals(p, ent0 + ent1, vsum);
}

// MODE as wgp2's (0, 1, 4), with the block's NW warpgroups independent: each has its own ring
// of STW stages of 64 keys (the chunk's 64-key tiles wg, wg + NW, ...), loads and consumes
// them alone and waits only on its own 128 threads (a named barrier), so a warpgroup's next
// loads never wait for another's epilogue; with NW = 4 at one block an SM the SM holds twice
// the stages in flight of wgp2 at two. The queries (shared) are loaded once before. TMA: a
// stage comes by two bulk tensor copies (TMA, tm: the keys as rows of 128 elements, boxes of
// 64 x 64 in the same 128-byte swizzle) that one thread issues, and arrives on the stage's
// barrier; else by cp.async from every thread of the warpgroup. BOXR: rows a box (64; 16 as
// caked's 64 KiB pages hold 16 tokens of 8 kv heads, K and V: 8 boxes of 2 KB a stage).
// MODE 5: the loads alone without the block's totals (atomics); 6: the loads alone without
// the queries' copy, the normalizers' reads or the totals; 7: nothing (the launch alone).
// STRIDED: the block's tiles are the head's tiles x, x + gridDim.x, ... (at any moment the
// head's blocks read neighbouring tiles) instead of a chunk of its own.
template <int NW, int STW, int BPS, int MODE, bool TMA, int BOXR = 64, bool STRIDED = false>
__global__ void __launch_bounds__(NW * 128, BPS) wgpi(params p, const __grid_constant__ CUtensorMap tm)
{
    extern __shared__ uint8_t smraw[];
    __shared__ alignas(8) uint64_t full[NW][STW];
    uint8_t *sm = smraw + ((1024 - su32(smraw) % 1024) % 1024);
    uint8_t *qs = sm + NW * STW * STAGE64;
    uint32_t g = blockIdx.y, c0 = STRIDED ? 0 : blockIdx.x * p.chunk, c1 = STRIDED ? p.S : min(c0 + p.chunk, p.S);
    uint32_t tid = threadIdx.x, wg = tid / 128, t = tid % 128, wi = t / 32, lane = t % 32;
    if (MODE == 7 || c0 >= c1)
        return;
    uint8_t *ring = sm + wg * STW * STAGE64;
    uint32_t NT = (p.S + 63) / 64;
    uint32_t nt = STRIDED ? (NT > blockIdx.x ? (NT - blockIdx.x + gridDim.x - 1) / gridDim.x : 0) : (c1 - c0 + 63) / 64;
    uint32_t nl = nt > wg ? (nt - wg + NW - 1) / NW : 0;
    // the first key of the warpgroup's tile i
    auto tile0 = [&](uint32_t i) { uint32_t T = wg + NW * i; return STRIDED ? 64 * (blockIdx.x + gridDim.x * T) : c0 + 64 * T; };
    auto load = [&](uint32_t i, uint32_t s) { // the warpgroup's tile i (keys from tile0(i)) to stage s
        uint32_t jb = tile0(i);
        uint8_t *st = ring + s * STAGE64;
        if (TMA) {
            if (t == 0) {
                uint32_t mb = su32(&full[wg][s]);
                mbar_expect(mb, STAGE64);
#pragma unroll
                for (int b = 0; b < 64 / BOXR; b++) { // boxes of BOXR rows (a page's run of a head's keys)
                    tma_box(su32(st + b * BOXR * 128), &tm, 0, g * p.n + jb + b * BOXR, mb);
                    tma_box(su32(st + ATOM64 + b * BOXR * 128), &tm, 64, g * p.n + jb + b * BOXR, mb);
                }
            }
            return;
        }
        for (uint32_t x = t; x < 64 * 16; x += 128) {
            uint32_t r = x / 16, v = x % 16, j = jb + r;
            const __nv_bfloat16 *src = p.k + ((size_t)g * p.n + (j < c1 ? j : c0)) * D + v * 8;
            cpa16(su32(st + swz64(r, v)), src, j < c1);
        }
    };
    if (TMA && t == 0) {
        for (int s = 0; s < STW; s++)
            mbar_init(su32(&full[wg][s]));
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (MODE != 6)
        for (uint32_t x = tid; x < COLS * 16; x += NW * 128) {
            uint32_t c = x / 16, v = x % 16;
            cpa16(su32(qs + swz(c, v)), p.q + ((size_t)(g * G + c / NQ) * NQ + c % NQ) * D + v * 8, true);
        }
    asm volatile("cp.async.commit_group;\n");
    for (int s = 0; s < STW - 1; s++) {
        if (s < (int)nl)
            load(s, s);
        asm volatile("cp.async.commit_group;\n");
    }
    float B2[32];
    if (MODE != 6)
        lse2(p, g, B2);
    cp_wait<STW - 1>(); // the queries (every thread's copies of them)
    asm volatile("fence.proxy.async.shared::cta;\n");
    __syncthreads();
    float ent0 = 0.0f, ent1 = 0.0f, vsum = 0.0f;
    for (uint32_t i = 0; i < nl; i++) {
        if (TMA) {
            mbar_wait(su32(&full[wg][i % STW]), (i / STW) & 1);
        } else {
            cp_wait<STW - 2>();
            asm volatile("fence.proxy.async.shared::cta;\n");
        }
        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); // stage (i - 1) % STW read by all
        if (i + STW - 1 < nl)
            load(i + STW - 1, (i + STW - 1) % STW);
        asm volatile("cp.async.commit_group;\n");
        if (MODE >= 4)
            continue;
        uint32_t sa = su32(ring + (i % STW) * STAGE64);
        float d[64];
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            wgmma(d, desc(sa + (kk / 4) * ATOM64 + (kk % 4) * 32), desc(su32(qs) + (kk / 4) * (COLS * 128) + (kk % 4) * 32), kk > 0);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
        for (int u = 0; u < 64; u++)
            asm volatile("" : "+f"(d[u])::"memory");
        if (MODE == 1) {
            if (lane % 4 == 0 && d[0] == 12345.0f)
                p.acc[(size_t)g * p.S + c0] = d[63];
            continue;
        }
        float I[2] = {0.0f, 0.0f}, V[2] = {0.0f, 0.0f};
        uint32_t jr = tile0(i) + wi * 16 + lane / 4;
        heads_epi(d, B2, jr, c1, p.c2, p.gamma, 0, 4, ent0, ent1, I, V);
#pragma unroll
        for (int e2 = 0; e2 < 2; e2++)
            if (jr + 8 * e2 < c1 && lane % 4 == 0) {
                p.acc[(size_t)g * p.S + jr + 8 * e2] = I[e2];
                vsum += V[e2];
            }
    }
    asm volatile("cp.async.wait_group 0;\n");
    if (MODE < 5)
        totals(p, ent0 + ent1, vsum);
}

// the keys read once and nothing else (16 bytes a thread a step, every SM): a read floor beside the copy's
__global__ void readk(const uint4 *k, size_t n16, uint32_t *out)
{
    uint32_t x = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
        uint4 v = __ldcs(k + i);
        x ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (x == 0x9e3779b9u)
        *out = x;
}

// Best of 11 each, alternated: a device copy of the keys (bytes at dk; its time is the
// floor's, twice the bytes moved) and f(a scratch buffer of that size), in ms.
template <typename F> static void time_vs_copy(const void *dk, size_t bytes, float &best, float &cp, F f)
{
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    float ms;
    void *tmp;
    CK(cudaMalloc(&tmp, bytes));
    best = cp = 1e30f;
    for (int r = 0; r < 11; r++) {
        CK(cudaEventRecord(e0));
        CK(cudaMemcpyAsync(tmp, dk, bytes, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1)); CK(cudaEventElapsedTime(&ms, e0, e1));
        cp = fminf(cp, ms);
        CK(cudaEventRecord(e0));
        f(tmp);
        CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1)); CK(cudaEventElapsedTime(&ms, e0, e1));
        best = fminf(best, ms);
    }
    cudaFree(tmp);
    cudaEventDestroy(e0), cudaEventDestroy(e1);
}

static float bf(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static uint16_t tobf(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16); }

int main(int argc, char **argv)
{
    uint32_t check_n = 8192, sizes[2] = {32768, 131072};
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    // nw = 0: wgp2 (st stages of 128 keys for the block); else wgpi (nw warpgroups, st stages of 64 keys each)
    struct variant { void (*k)(params, CUtensorMap); int st, bps, mode, nw, tma, boxr = 64, strided = 0; } vs[] = {
        {wgp2<2, 2, 0>, 2, 2, 0, 0, 0}, {wgp2<2, 2, 4>, 2, 2, 4, 0, 0},
        {wgpi<2, 2, 2, 0, false>, 2, 2, 0, 2, 0}, {wgpi<4, 3, 1, 0, false>, 3, 1, 0, 4, 0},
        {wgpi<2, 2, 2, 0, true>, 2, 2, 0, 2, 1}, {wgpi<2, 2, 2, 4, true>, 2, 2, 4, 2, 1},
        {wgpi<4, 3, 1, 0, true>, 3, 1, 0, 4, 1}, {wgpi<4, 3, 1, 1, true>, 3, 1, 1, 4, 1},
        {wgpi<4, 3, 1, 4, true>, 3, 1, 4, 4, 1}, {wgpi<3, 4, 1, 0, true>, 4, 1, 0, 3, 1},
        {wgpi<2, 2, 2, 0, true, 16>, 2, 2, 0, 2, 1, 16}, {wgpi<2, 2, 2, 4, true, 16>, 2, 2, 4, 2, 1, 16},
        // where the loads' constant goes: the totals, the prologue, the launch; tiles strided
        {wgpi<2, 2, 2, 5, true>, 2, 2, 5, 2, 1}, {wgpi<2, 2, 2, 6, true>, 2, 2, 6, 2, 1},
        {wgpi<2, 2, 2, 7, true>, 2, 2, 7, 2, 1}, {wgpi<2, 2, 2, 0, true, 64, true>, 2, 2, 0, 2, 1, 64, 1},
        {wgpi<2, 2, 2, 4, true, 64, true>, 2, 2, 4, 2, 1, 64, 1}, {wgpi<2, 2, 2, 6, true, 64, true>, 2, 2, 6, 2, 1, 64, 1},
        {wgpi<2, 2, 2, 0, false, 64, true>, 2, 2, 0, 2, 0, 64, 1}, {wgpi<2, 4, 2, 6, true>, 4, 2, 6, 2, 1},
        {wgpi<2, 4, 2, 6, true, 64, true>, 4, 2, 6, 2, 1, 64, 1}, {wgpi<2, 2, 2, 0, true, 16, true>, 2, 2, 0, 2, 1, 16, 1}};
    static const char *modes[] = {"", ", no epilogue (loads and multiplies)", ", no multiply (loads and epilogue)",
                                  ", split in two n64 halves", ", the loads alone",
                                  ", the loads alone, no totals", ", the loads alone, no prologue or totals",
                                  ", nothing (the launch)"}; // by MODE (the kernels' comments)
    auto smem_of = [](const variant &v) { return (size_t)(v.nw ? v.nw * v.st * STAGE64 : v.st * STAGE) + QBYTES + 1024; };
    auto name_of = [](const variant &v, char *b, size_t n) {
        if (v.nw)
            snprintf(b, n, "%d independent warpgroups of %d stages (64 keys)%s%s, %d blocks an SM%s%s", v.nw, v.st,
                     v.tma ? " by TMA" : "", v.boxr != 64 ? " in 16-row boxes" : "", v.bps, modes[v.mode],
                     v.strided ? ", tiles strided" : "");
        else
            snprintf(b, n, "%d stages, %d blocks an SM%s", v.st, v.bps, modes[v.mode]);
    };
    for (auto &v : vs)
        CK(cudaFuncSetAttribute(v.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_of(v)));
    PFN_cuTensorMapEncodeTiled_v12000 encode = NULL;
    cudaDriverEntryPointQueryResult qr;
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void **)&encode, 12000, cudaEnableDefault, &qr));
    if (!encode) {
        fprintf(stderr, "no cuTensorMapEncodeTiled\n");
        return 1;
    }
    float scale = 1.0f / sqrtf((float)D), gamma = 200.0f;
    for (int pass = 0; pass < 3; pass++) {
        uint32_t n = pass == 0 ? check_n : sizes[pass - 1], S = n - NQ;
        std::vector<uint16_t> hk((size_t)HKV * n * D), hq((size_t)HKV * G * NQ * D);
        uint64_t seed = 0x9e3779b97f4a7c15ull;
        auto rnd = [&]() { seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17; return (double)(seed >> 11) / 9007199254740992.0; };
        for (auto &x : hk) x = tobf((float)(2 * rnd() - 1));
        for (auto &x : hq) x = tobf((float)(4 * rnd() - 2));
        std::vector<float> hl((size_t)HKV * G * NQ);
        std::vector<double> dot; // check only: [rows][n] in double
        if (pass == 0) {
            dot.resize((size_t)HKV * G * NQ * n);
            for (uint32_t g = 0; g < HKV; g++)
                for (uint32_t r = 0; r < G * NQ; r++) {
                    const uint16_t *qr = &hq[((size_t)g * G * NQ + r) * D];
                    double mx = -1e300, s = 0;
                    uint32_t i = r % NQ, see = n - NQ + i; // causal inside the window
                    for (uint32_t j = 0; j <= see; j++) {
                        const uint16_t *kr = &hk[((size_t)g * n + j) * D];
                        double acc = 0;
                        for (int x = 0; x < D; x++) acc += (double)bf(qr[x]) * bf(kr[x]);
                        dot[((size_t)g * G * NQ + r) * n + j] = acc * scale;
                        mx = fmax(mx, acc * scale);
                    }
                    for (uint32_t j = 0; j <= see; j++) s += exp(dot[((size_t)g * G * NQ + r) * n + j] - mx);
                    hl[(size_t)g * G * NQ + r] = (float)(mx + log(s));
                }
        } else {
            for (uint32_t r = 0; r < HKV * G * NQ; r++) hl[r] = logf((float)(n - NQ + r % NQ + 1)) + 0.22f;
        }
        __nv_bfloat16 *dk, *dq;
        float *dl, *dacc;
        double *dst;
        CK(cudaMalloc(&dk, hk.size() * 2)); CK(cudaMalloc(&dq, hq.size() * 2));
        CK(cudaMalloc(&dl, hl.size() * 4)); CK(cudaMalloc(&dacc, (size_t)HKV * S * 4)); CK(cudaMalloc(&dst, 16));
        CK(cudaMemcpy(dk, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice));
        CUtensorMap tm, tm16; // the keys as HKV n rows of D elements; boxes of 64 x 64 (16), 128-byte swizzle
        for (int m = 0; m < 2; m++) {
            cuuint64_t dims[2] = {D, (cuuint64_t)HKV * n}, strides[1] = {D * 2};
            cuuint32_t box[2] = {64, m ? 16u : 64u}, es[2] = {1, 1};
            CUresult r = encode(m ? &tm16 : &tm, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, dk, dims, strides, box, es,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
            if (r != CUDA_SUCCESS) {
                fprintf(stderr, "cuTensorMapEncodeTiled: %d\n", (int)r);
                return 1;
            }
        }
        CK(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dl, hl.data(), hl.size() * 4, cudaMemcpyHostToDevice));
        std::vector<double> ref, big(HKV); // check only: every key's indicator, each head's largest
        double rent = 0, rvar = 0;
        if (pass == 0) {
            ref.resize((size_t)HKV * S);
            for (uint32_t g = 0; g < HKV; g++)
                for (uint32_t j = 0; j < S; j++) {
                    double I = 0;
                    for (int h = 0; h < G; h++) {
                        double pr[NQ], m = 0, v = 0;
                        for (int i = 0; i < NQ; i++) {
                            uint32_t r = h * NQ + i;
                            pr[i] = exp(dot[((size_t)g * G * NQ + r) * n + j] - hl[(size_t)g * G * NQ + r]);
                            m += pr[i];
                            rent -= pr[i] * log(pr[i]);
                        }
                        m /= NQ;
                        for (int i = 0; i < NQ; i++) v += (pr[i] - m) * (pr[i] - m);
                        v /= NQ - 1;
                        I += m + gamma * v, rvar += v;
                    }
                    ref[(size_t)g * S + j] = I, big[g] = fmax(big[g], fabs(I));
                }
        }
        if (pass > 0) { // the read floor: the keys read once by a plain kernel, beside the copy
            float best, cp;
            time_vs_copy(dk, hk.size() * 2, best, cp, [&](void *tmp) {
                readk<<<sms * 4, 512>>>((const uint4 *)dk, hk.size() * 2 / 16, (uint32_t *)tmp);
            });
            printf("%s, n=%u: the keys read alone (a plain kernel, 16 bytes a thread) %.1f us best of 11 (%.2f TB/s); "
                   "the copy's floor %.1f us\n", prop.name, n, best * 1e3, hk.size() * 2 / (best * 1e-3) / 1e12, cp * 1e3 / 2);
        }
        for (auto &v : vs) {
            size_t smem = smem_of(v);
            char name[160];
            name_of(v, name, sizeof name);
            const char *only = getenv("WGP2_ONLY"); // only the variants whose names hold it (and the first, the baseline)
            if (only && &v != &vs[0] && !strstr(name, only))
                continue;
            int threads = v.nw ? v.nw * 128 : THREADS;
            uint32_t per = (uint32_t)(v.bps * sms) / HKV, chunk = ((S + per - 1) / per + TK - 1) / TK * TK;
            params p = {dk, dq, dl, dacc, dst, dst + 1, n, S, chunk, scale * LOG2E, gamma};
            dim3 grid((S + chunk - 1) / chunk, HKV);
            CK(cudaMemset(dst, 0, 16));
            CK(cudaMemset(dacc, 0xff, (size_t)HKV * S * 4));
            v.k<<<grid, threads, smem>>>(p, v.boxr == 16 ? tm16 : tm);
            CK(cudaGetLastError());
            CK(cudaDeviceSynchronize());
            if (pass == 0 && v.mode != 0 && v.mode != 3)
                continue; // not CAKE's values
            if (pass == 0) { // every key's indicator against the double reference
                std::vector<float> acc((size_t)HKV * S);
                double tot[2], worst = 0;
                int shown = 0;
                CK(cudaMemcpy(acc.data(), dacc, acc.size() * 4, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(tot, dst, 16, cudaMemcpyDeviceToHost));
                for (uint32_t g = 0; g < HKV; g++)
                    for (uint32_t j = 0; j < S; j++) {
                        double err = fabs(acc[(size_t)g * S + j] - ref[(size_t)g * S + j]) / big[g];
                        if (!(err <= 1e-4) && shown < 8) // where a layout error shows: the key's place in its tile
                            printf("  g %u key %u (tile row %u): %.6g, reference %.6g\n", g, j, j % TK,
                                   acc[(size_t)g * S + j], ref[(size_t)g * S + j]), shown++;
                        worst = fmax(worst, err != err ? INFINITY : err);
                    }
                printf("check n=%u, %s: indicator error %.3g of the head's largest "
                       "(tolerance 1e-4); entropy %.6g vs %.6g, variance %.6g vs %.6g\n", n, name, worst, tot[0], rent,
                       tot[1], rvar);
                continue;
            }
            float best, cp;
            time_vs_copy(dk, hk.size() * 2, best, cp, [&](void *) { v.k<<<grid, threads, smem>>>(p, v.boxr == 16 ? tm16 : tm); });
            double bw = 2.0 * hk.size() * 2 / (cp * 1e-3), floor_us = hk.size() * 2 / bw * 1e6;
            printf("%s, n=%u, %s: wgmma pass 2 (LSEs given) %.1f us best of 11; floor %.1f us "
                   "(%.2f TB/s copy): %.2fx; grid %u x %u, chunk %u\n", prop.name, n, name, best * 1e3,
                   floor_us, bw / 1e12, best * 1e3 / floor_us, grid.x, grid.y, chunk);
        }
        cudaFree(dk), cudaFree(dq), cudaFree(dl), cudaFree(dacc), cudaFree(dst);
    }
    return 0;
}
