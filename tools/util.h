/* util.h - small helpers shared by the tools: a monotonic clock, sorting doubles,
 * human-readable byte counts. */
#ifndef CAKE_TOOLS_UTIL_H
#define CAKE_TOOLS_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <time.h>

static inline double util_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* qsort comparator for doubles, ascending */
static inline int util_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static inline void util_human_bytes(uint64_t b, char *out, size_t len)
{
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)b;
    int i = 0;
    while (v >= 1024 && i < 4)
        v /= 1024, i++;
    snprintf(out, len, i ? "%.1f %s" : "%.0f %s", v, u[i]);
}

#endif
