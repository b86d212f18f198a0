/* testutil.h - random inputs for tests: a seeded xorshift, fresh per run unless
 * CAKE_TEST_SEED is set (the seed is printed so a failure can be replayed). */
#ifndef CAKE_TESTUTIL_H
#define CAKE_TESTUTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static uint64_t tu_state;

static inline void tu_seed(void)
{
    const char *e = getenv("CAKE_TEST_SEED");
    tu_state = e ? strtoull(e, NULL, 0)
                 : ((uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)getpid() << 17);
    if (!tu_state)
        tu_state = 1;
    fprintf(stderr, "CAKE_TEST_SEED=%llu\n", (unsigned long long)tu_state);
}

static inline uint64_t tu_next(void)
{
    tu_state ^= tu_state << 13, tu_state ^= tu_state >> 7, tu_state ^= tu_state << 17;
    return tu_state;
}

/* uniform in [lo, hi) */
static inline double tu_uniform(double lo, double hi)
{
    return lo + (hi - lo) * ((tu_next() >> 11) * (1.0 / 9007199254740992.0));
}

static inline uint32_t tu_below(uint32_t n)
{
    return (uint32_t)(tu_next() % n);
}

/* qsort comparator for uint32_t, ascending */
static inline int tu_cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

#endif
