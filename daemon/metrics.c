/* metrics.c - counters and text helpers (see metrics.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cake/cake.h"
#include "metrics.h"

const double metrics_lat_bounds_s[METRICS_LAT_BUCKETS] = {
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 50e-3, 250e-3, 1.0, 5.0,
};

enum metrics_err metrics_err_kind(int code)
{
    switch (code) {
    case CAKE_EPROTO: return ERR_PROTO;
    case CAKE_EVERSION: return ERR_VERSION;
    case CAKE_EOOM: return ERR_OOM;
    case CAKE_ENOSEQ: return ERR_NOSEQ;
    case CAKE_EINVAL: return ERR_INVAL;
    case CAKE_EPERM: return ERR_PERM;
    case CAKE_ETOOBIG: return ERR_TOOBIG;
    case CAKE_ESTATE: return ERR_STATE;
    default: return ERR_INTERNAL;
    }
}

const char *metrics_err_name(enum metrics_err e)
{
    static const char *const n[ERR_KINDS] = {
        "protocol", "version", "out_of_memory", "no_sequence", "invalid", "permission",
        "too_big", "state", "internal",
    };
    return n[e];
}

void metrics_observe_latency(struct metrics *m, double s)
{
    for (int i = 0; i < METRICS_LAT_BUCKETS; i++)
        if (s <= metrics_lat_bounds_s[i]) {
            m->lat_bucket[i]++;
            break;
        }
    m->lat_sum_s += s;
    m->lat_count++;
}

int strbuf_printf(struct strbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            return -EINVAL;
        if ((size_t)n < room && b->s) {
            b->len += (size_t)n;
            return 0;
        }
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap - b->len <= (size_t)n)
            cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s)
            return -ENOMEM;
        b->s = s, b->cap = cap;
    }
}
