/* pressure.h - making room instead of refusing. A request whose pages do not fit its
 * tenant's share or the pool (open, prefill reserve, decode step) waits, up to
 * --pressure-wait, while caked lowers the budgets of that tenant's running sequences by
 * CAKE's own rules (re-slicing: seq.h) until they give back what it lacks; it is refused,
 * as before, only when even the floors (--min-tokens per layer) would not make the room,
 * when the wait runs out, or when the tenant's pressure mode is refuse.
 *
 * Whose sequences: short of its own cap, the requesting tenant's own. Within its share but
 * short of pool pages, other tenants' first: those beyond their share (or holding free pages
 * in their segments) have their least used segments drained for the requester (pool.h) and
 * their budgets lowered so that their sequences fit in their other segments; their pages
 * move out at their own next jobs (seq_reloc_*), and each segment, once empty, is promised
 * to the requester. Drains are withdrawn when the requester no longer waits.
 *
 * When a sequence is compacted: only while its engine is inside a call, so no engine reads
 * or writes a page while it moves (cake.h): sequences of the requesting decode step at
 * once, and the requester's other idle sequences at once when its context allows it
 * (cake_set_shrink_idle: HELLO's shrink_idle); every other sequence keeps its lowered
 * budgets and is evicted to them by its own next decode step.
 *
 * Loop thread only. */
#ifndef CAKE_PRESSURE_H
#define CAKE_PRESSURE_H

#include <stdint.h>

enum pressure_mode {
    PRESSURE_DEFAULT = 0,
    PRESSURE_RESLICE = 1,
    PRESSURE_REFUSE = 2,
    PRESSURE_PARK = 3, /* short of GPU pool pages: park idle GPU sequences in the host pool
                          first (least recently used first), then re-slice */
};

const char *pressure_mode_name(int m);
int pressure_mode_parse(const char *s); /* -1 if unknown */

struct server;
struct client;
struct seq;
struct seq_open_args;
struct work;

/* c's current request was refused for lack of memory (why): returns 1 if it now waits for
 * room (c stays busy; pressure_poll replies), 0 if it is to be refused now. The decode step
 * passes its sequences (not taken over). */
int pressure_wait_open(struct server *s, struct client *c, const struct seq_open_args *a,
                       const char *why);
int pressure_wait_reserve(struct server *s, struct client *c, struct seq *q, uint32_t layer,
                          const char *why);
int pressure_wait_decode(struct server *s, struct client *c, struct seq *const *seqs, uint32_t n,
                         uint32_t evictions, const char *why);
/* A decode step whose parked sequences do not fit back on the GPU: waits for that room (its
 * retry starts the step again: srv_decode). */
int pressure_wait_restore(struct server *s, struct client *c, struct seq *const *seqs, uint32_t n,
                          const char *why);
/* Retries the waiting requests in arrival order and refuses those whose time ran out (after
 * every job and every turn of the loop; cheap with none waiting). */
void pressure_poll(struct server *s);
/* Client id is gone: its waiting request goes with it. */
void pressure_forget(struct server *s, uint64_t client_id);
/* A re-slice job completed (work.c): its sequences are committed. */
void pressure_job_done(struct server *s, struct work *w);

#endif
