/* util.h - small helpers shared by the tools: a monotonic clock, sorting doubles,
 * human-readable byte counts, caked's account of its workers' jobs. */
#ifndef CAKE_TOOLS_UTIL_H
#define CAKE_TOOLS_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>
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

/* caked's own account of its workers' jobs of one kind ("prefill", "decode", "pressure"):
 * caked_work_seconds' sum and count per stage (0 queued, 1 run, 2 return to the loop), read
 * with `cachectl --socket SOCK metrics`. 0, or -1 if cachectl could not give them. */
static inline int util_work_seconds(const char *cachectl, const char *sock, const char *kind,
                                    double sum[3], double count[3])
{
    static const char *const stage[3] = {"queued", "run", "return"};
    char cmd[1024], line[512], want[128];
    snprintf(cmd, sizeof cmd, "'%s' --socket '%s' metrics", cachectl, sock);
    FILE *f = popen(cmd, "r");
    if (!f)
        return -1;
    int found = 0;
    while (fgets(line, sizeof line, f))
        for (int g = 0; g < 3; g++)
            for (int c = 0; c < 2; c++) {
                snprintf(want, sizeof want, "caked_work_seconds_%s{kind=\"%s\",stage=\"%s\"} ",
                         c ? "count" : "sum", kind, stage[g]);
                if (!strncmp(line, want, strlen(want))) {
                    double v = 0;
                    sscanf(line + strlen(want), "%lf", &v);
                    (c ? count : sum)[g] = v;
                    found++;
                }
            }
    return pclose(f) == 0 && found == 6 ? 0 : -1;
}

#endif
