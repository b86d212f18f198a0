/* gputest.h - what the GPU tests share: whether this machine has a CUDA device, checks that
 * count failures and go on, a fixed-seed generator, copies to and from either placement. */
#ifndef CAKE_GPUTEST_H
#define CAKE_GPUTEST_H

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cake/cake.h"

/* A failed check is reported with its file and line and counted; the test goes on. */
static int fails __attribute__((unused));
#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
            fails++;                                             \
        }                                                        \
    } while (0)
#define CU(x) CHECK((x) == cudaSuccess, "%s: %s", #x, cudaGetErrorString(cudaGetLastError()))

/* splitmix64: rng is the state (a test may set its own seed before drawing) */
static uint64_t rng __attribute__((unused)) = 12345;
static inline uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
static inline double unif(void) { return (double)((rng = mix(rng)) >> 11) / 9007199254740992.0; }
static inline float gauss(void)
{
    return (float)(sqrt(-2 * log(unif() + 1e-300)) * cos(6.283185307 * unif()));
}

/* The tokens two ascending position lists share, over the shorter one (top-k sets at two
 * budgets are nested: the smaller inside the larger). */
static inline int gputest_u32_cmp(const void *x, const void *y)
{
    uint32_t a = *(const uint32_t *)x, b = *(const uint32_t *)y;
    return (a > b) - (a < b);
}

/* a, b in any order (a GPU decode step fills holes: slots stop following positions) */
static inline double overlap(const uint32_t *a0, uint32_t na, const uint32_t *b0, uint32_t nb)
{
    uint32_t same = 0, n = na < nb ? na : nb;
    uint32_t *a = (uint32_t *)malloc(sizeof(uint32_t) * (na + 1)), *b = (uint32_t *)malloc(sizeof(uint32_t) * (nb + 1));
    memcpy(a, a0, sizeof(uint32_t) * na), memcpy(b, b0, sizeof(uint32_t) * nb);
    qsort(a, na, sizeof(uint32_t), gputest_u32_cmp), qsort(b, nb, sizeof(uint32_t), gputest_u32_cmp);
    for (uint32_t i = 0, j = 0; i < na && j < nb;) {
        if (a[i] == b[j])
            same++, i++, j++;
        else if (a[i] < b[j])
            i++;
        else
            j++;
    }
    free(a), free(b);
    return n ? (double)same / n : 1.0;
}

/* n bytes to or from a slot of a sequence of either placement */
static inline void put(const cake_seq *s, void *dst, const void *src, size_t n)
{
    if (cake_seq_on_gpu(s))
        CU(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice));
    else
        memcpy(dst, src, n);
}

static inline void get(const cake_seq *s, void *dst, const void *src, size_t n)
{
    if (cake_seq_on_gpu(s))
        CU(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost));
    else
        memcpy(dst, src, n);
}

/* Probed in a child: a CUDA context must not cross a later fork. */
static inline int gputest_has_gpu(void)
{
    pid_t p = fork();
    if (p == 0) {
        int n = 0;
        _exit(cudaGetDeviceCount(&n) == cudaSuccess && n > 0 ? 0 : 1);
    }
    int st;
    waitpid(p, &st, 0);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

#endif
