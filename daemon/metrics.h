/* metrics.h - daemon counters and their Prometheus text exposition (hand written, as no
 * maintained C client is packaged). Loop thread only. */
#ifndef CAKE_METRICS_H
#define CAKE_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "../proto/frame.h"

#define METRICS_LAT_BUCKETS 13

/* The workers' jobs (worker.h), by kind and stage: caked_work_seconds. */
enum metrics_work { WORK_PREFILL, WORK_DECODE, WORK_PRESSURE, WORK_KINDS };
enum metrics_stage { STAGE_QUEUED, STAGE_RUN, STAGE_RETURN, STAGE_KINDS };

enum metrics_err {
    ERR_PROTO, ERR_VERSION, ERR_OOM, ERR_NOSEQ, ERR_INVAL, ERR_PERM, ERR_TOOBIG, ERR_STATE,
    ERR_INTERNAL, ERR_KINDS,
};

struct metrics {
    uint64_t requests[MSG_TYPE_MAX + 1];
    uint64_t errors[ERR_KINDS];
    struct metrics_lat {                          /* per request type (0: unknown types) */
        uint64_t bucket[METRICS_LAT_BUCKETS];     /* cumulative at render time */
        double sum_s;
        uint64_t count;
    } lat[MSG_TYPE_MAX + 1];
    struct metrics_lat work[WORK_KINDS][STAGE_KINDS];
    uint64_t evictions_prefill, evictions_decode; /* layer compactions */
    uint64_t tokens_evicted;
    uint64_t clients_total, clients_killed;       /* killed: closed while owning sequences */
    uint64_t jobs_cancelled;                      /* sequences' work skipped: owner gone */
    uint64_t decode_by_loop, decode_by_worker;    /* sequences' decode evictions: launched by
                                                     the loop (GPU, no hand-off), on a worker */
    uint64_t observe_by_loop, observe_by_worker;  /* GPU sequences' prefill observes: scored
                                                     by the loop's launch, on a worker */
    uint64_t decode_lse_layers;                   /* layers a decode eviction gave the engine's
                                                     newest log-sum-exps (cake_put_decode_lse) */
    uint64_t clients_refused;                     /* over the client or fd limit */
    /* pressure (pressure.h) */
    uint64_t reslices, reslice_tokens;            /* sequences' budgets lowered; tokens given up */
    uint64_t evictions_reslice;                   /* layers compacted by re-slice jobs */
    uint64_t waits_granted, waits_refused;        /* requests that waited for room */
    uint64_t pages_drained, pages_relocated;      /* segments' pages drained for another tenant;
                                                     K/V pages moved out of them */
};

extern const double metrics_lat_bounds_s[METRICS_LAT_BUCKETS];

enum metrics_err metrics_err_kind(int code);
const char *metrics_err_name(enum metrics_err e);
/* One request of `type` (any value; unknown types count as 0) took `seconds`. */
void metrics_observe_latency(struct metrics *m, unsigned type, double seconds);
/* A job of `kind` that ran: its stages from its times (worker.h) up to `now` (returned to
 * the loop). A job that never ran (the workers stopped first) counts nothing. */
struct job;
void metrics_observe_work(struct metrics *m, enum metrics_work kind, const struct job *j,
                          double now);

/* Appends printf-formatted text to a growing buffer; returns 0 or -ENOMEM. */
struct strbuf {
    char *s;
    size_t len, cap;
};
int strbuf_printf(struct strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
