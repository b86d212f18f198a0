/* worker.h - threads that run heavy work (scoring, compaction) off the event loop.
 *
 * The loop submits jobs; a worker runs job->run(job) and queues the job as done; an
 * eventfd (watched by the loop) wakes the loop, which calls worker_reap() to run each
 * done job's ->done(job) on the loop thread. A job must only touch what it was handed.
 *
 * Order: urgent jobs (decode steps) first; the others are shared between owners (tenants)
 * by weight, start-time fair queuing: each owner's virtual time advances by 1/weight per job
 * it is given, the backlogged owner with the lowest goes next, FIFO within an owner, and an
 * owner that was idle starts at the current virtual time (no credit saved up). */
#ifndef CAKE_WORKER_H
#define CAKE_WORKER_H

#include <stdint.h>

struct job {
    void (*run)(struct job *j);   /* worker thread */
    void (*done)(struct job *j);  /* loop thread, after run */
    int urgent;                   /* decode steps: run before any queued prefill work */
    uint32_t owner;               /* whose work (tenant id; 0 = caked's own) */
    uint32_t weight;              /* the owner's share (0 = 1) */
    /* set by the workers (CLOCK_MONOTONIC seconds): submitted, taken by a worker, run done;
     * done() reads them (caked_work_seconds, CAKED_TRACE) */
    double t_submit, t_start, t_end;
    struct job *next;
};

struct workers;

/* n threads (<= 0: one per core, at least 1). Returns 0 or -errno. */
int workers_start(struct workers **out, int n);
/* Waits for running jobs, runs nothing more, joins. Queued jobs are completed (done runs
 * in worker_reap by the caller before this, or here on the caller's thread). */
void workers_stop(struct workers *w);
void workers_submit(struct workers *w, struct job *j);
/* The eventfd to watch for completions. */
int workers_fd(const struct workers *w);
/* Runs done() of every completed job; returns how many. */
int workers_reap(struct workers *w);
/* Jobs submitted and not yet reaped. */
int workers_pending(const struct workers *w);
/* The number of threads. */
int workers_count(const struct workers *w);
/* What the workers have now: jobs waiting for a thread and how long the oldest has waited
 * (a saturated pool), jobs running and how long the longest has run (a stuck call); 0 with
 * none. */
struct workers_load {
    uint32_t queued, running;
    double oldest_queued_s, oldest_running_s;
};
void workers_load(struct workers *w, double now, struct workers_load *l);

#endif
