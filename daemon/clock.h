/* clock.h - the daemon's one clock: monotonic seconds, for deadlines, ages and traces. */
#ifndef CAKE_CLOCK_H
#define CAKE_CLOCK_H

#include <time.h>

static inline double clock_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

#endif
