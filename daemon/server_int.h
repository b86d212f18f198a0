/* server_int.h - caked's server internals, shared by the files of the server: server.c
 * (lifecycle), conn.c (connections), seqtab.c (sequence table), handlers.c (the dispatch
 * table and what each request does), work.c (requests run on the workers), shard.c (shard
 * groups' barrier) and metrics.c (the Prometheus text). A request's path, top-down: conn.c
 * reads a frame (proto/reader.h) -> handlers.c's srv_dispatch checks rights, unpacks, calls
 * the handler -> the handler acts on tenants, the pool and sequences (seq.h), or hands a
 * prefill layer or decode step to work.c -> a worker runs seq.c, whose executor
 * (seq_host.c, seq_gpu.c) calls the kernels -> work.c's completion commits on the loop and
 * replies through conn.c. Not installed; loop thread only. */
#ifndef CAKE_SERVER_INT_H
#define CAKE_SERVER_INT_H

#include <stdint.h>
#include <sys/socket.h>

#include "cake.pb-c.h"
#include "metrics.h"
#include "pool.h"
#include "reader.h"
#include "seq.h"
#include "shard.h"
#include "server.h"
#include "sockpath.h"
#include "tenant.h"
#include "worker.h"
#include "gpupool.h"

#define SERVER_MAX_CLIENTS 4096      /* accept() beyond this is refused and counted */
#define SERVER_MAX_DECODE_BATCH 65536 /* sequence ids in one DECODE_STEP */
#define SERVER_PREHELLO_MAX_BODY 4096 /* a frame before HELLO (HELLO, PING) is small */
#define UNPACK_LIMIT(len) ((size_t)(len) * 8 + 65536) /* bound on unpacker heap per body */
#define SERVER_MAP_FDS 64            /* segment fds in one MAP frame (SCM_MAX_FD is 253) */
#define SERVER_POOLS (1 + SERVER_MAX_GPUS) /* the host pool, then one per GPU */
#define MSG_RESLICE 0x7fff /* a job's type, never a frame's: a re-slice (pressure.h) */

/* File descriptors travelling with the output byte at `off` (owned: closed once sent). */
struct out_fds {
    size_t off;
    int n;
    int fd[SERVER_MAP_FDS];
};

enum conn_state { C_IDLE, C_BUSY, C_CLOSED }; /* idle: reading requests */

struct client {
    struct server *srv;
    uint64_t id;
    int fd, handle;
    struct ucred cred;
    struct tenant *tenant;
    int admin;             /* asked for administration at HELLO and has the right */
    int engine;            /* maps its tenant's pool segments */
    /* the generation of each pool segment this engine was sent (0: none), and the pools'
     * claim counters when last compared (a reply skips the scan while they are unchanged) */
    uint32_t *seg_sent[SERVER_POOLS];
    uint64_t seg_epoch[SERVER_POOLS];
    enum conn_state state;
    struct frame_reader rd; /* what has arrived of the next frames (proto/reader.h) */
    int drained;           /* the last recv came back short: wait for the next poll event */
    int rdhup;             /* the peer hung up (or erred): read to the end, whatever comes short */
    int reading;           /* inside client_read: completions must not re-enter it */
    struct client *next_dead;
    struct frame_header h; /* the request being served */
    const uint8_t *body;   /* its body, in rd, while it is dispatched */
    int close_after_flush; /* the stream is unusable after this reply */
    uint8_t *out;          /* frames queued: MAP frames, then the reply */
    size_t out_len, out_off;
    struct out_fds *out_fds; /* in order of off */
    uint32_t n_out_fds, out_fds_next;
    int shrink_idle;       /* HELLO: its idle sequences may be compacted inside its calls */
    uint32_t rs_jobs;      /* re-slice jobs on its sequences in flight (its reply waits) */
    double t0;             /* request start */
    double t_accept;       /* when it connected: HELLO is due within hello_timeout_s */
};

struct seq_slot {
    struct seq *s;
    uint32_t gen;
};

struct server {
    struct server_cfg cfg;
    struct loop *loop;
    const char *io_name;
    struct pool pool;
    uint64_t heap_used;    /* caked's own memory charged to sequences (seq_env.heap_used) */
    int activated;         /* the listening socket was passed by systemd (never removed) */
    struct srv_gpu {       /* one per --gpu-pool */
        struct gpupool gpu;
        char uuid[48];
        uint64_t bytes;
        struct pool pages; /* the page allocator over the GPU pool */
        struct gpuexec *x; /* workers' CUDA streams and workspaces on that GPU */
    } gpus[SERVER_MAX_GPUS];
    uint32_t n_gpus;
    int host_registered;
    struct tenants tenants;
    struct workers *workers;
    struct metrics m;
    struct seq_env env;
    int listen_fd, listen_h, sig_fd, sig_h, work_h;
    int spare_fd;          /* held open to accept-and-close a connection when out of fds */
    uint32_t max_clients;  /* SERVER_MAX_CLIENTS, or less where the fd limit is lower */
    uint32_t max_per_uid;  /* connections one uid may hold (--max-clients-per-uid) */
    double t_sweep;        /* last look for connections overdue for HELLO */
    double t_refuse_log;   /* last time a refusal was logged (at most once a second) */
    double wd_s;           /* systemd's watchdog interval (WatchdogSec), 0: none */
    double t_wd;           /* last WATCHDOG=1 */
    int wd_withheld;       /* the last look found a job older than wd_s (logged once) */
    struct client **clients;
    uint32_t n_clients;
    struct seq_slot *slots;
    uint32_t n_slots, cap_slots, n_seqs;
    uint64_t next_client_id;
    struct client *dead;   /* closed during this loop iteration, freed after it */
    double t_start;
    uid_t owner_uid;
    gid_t admin_gid;       /* --admin-group, (gid_t)-1 none */
    struct sockpath sp;    /* the socket bound (removed at exit only if still ours) */
    struct http *http;     /* --metrics-listen (NULL: off) */
    struct seq *quarantine; /* ended by another client's action, pages held until the
                               owner's next request or disconnect (seq->next_q) */
    int stopping;
    struct shard_group *groups; /* tensor-parallel shard groups (shard.h) */
    struct waiter *waiters;  /* requests waiting for room, in arrival order (pressure.c) */
    uint32_t n_waiting;
    int polling;             /* inside pressure_poll */
    struct work *flights;    /* decode steps with evictions, and prefill observes, the loop
                                launched (work.c) */
    uint32_t observes_on_loop; /* of those, prefill observes */
};

/* A job in flight: prefill observe/submit of one sequence, or the evictions of a decode
 * step over several. */
struct work {
    struct job job;
    struct server *srv;
    uint64_t client_id;
    uint64_t request_id;
    uint16_t type;
    uint32_t layer;
    int observe;
    double pref;
    struct seq **seqs;
    struct seq_result *res; /* [n]: what the job did to each (written by its worker) */
    uint32_t n;
    /* shard groups: phase 1 scores one shard; phase 2 allocates and evicts every shard of
     * `group` with the group's preference (seqs = the members) */
    int phase;
    struct shard_group *group;
    int pressure;      /* made by pressure.c to make room (pressure_job_done completes it) */
    /* a decode step split over the workers (work.c): its parts, and how many still run
     * (the loop's flights count as one) */
    struct work_part *part;
    uint32_t parts;
    /* a decode step's evictions the loop launched itself: fl[i] for seqs[i] (NULL: none, or
     * a worker's, or landed), on_loop[i] whether the loop has seqs[i] (launched, or its launch
     * failed: set before any part is submitted and never changed, so the workers' parts read
     * it while the loop lands), how many were launched, and when the last was issued; on
     * s->flights by next_fl */
    struct seq_flight **fl;
    struct seq_flight *rest; /* phase 3: a prefill observe the loop scored, its stage on a worker */
    uint8_t *on_loop;
    uint32_t n_fl;
    double t_launched;
    struct work *next_fl;
    double t_start;    /* when it was submitted (CAKED_TRACE's decode lines) */
};

/* One worker's part of a split decode step: sequences [from, to) of w. */
struct work_part {
    struct job job;
    struct work *w;
    uint32_t from, to;
};

#include "clock.h" /* clock_now_s */
/* The GPU pools' bytes, all together (0: none). */
uint64_t srv_gpu_bytes(const struct server *s);
/* The log (standard error, a timestamp and caked[pid] first): srv_log at info level,
 * srv_logl at the level given; lines above --log-level are dropped. */
enum { SRV_LOG_ERROR, SRV_LOG_WARNING, SRV_LOG_INFO, SRV_LOG_DEBUG };
void srv_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void srv_logl(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A refusal for lack of memory (CAKE_EOOM) for c's tenant: counted, and logged at warning
 * level at most once a second per tenant (with how many went unlogged). */
void srv_oom(struct server *s, struct client *c, const char *why);

/* sequence table: ids are slot + generation, so a stale id never names a newer sequence */
int srv_seq_new(struct server *s, uint64_t *id);
struct seq *srv_seq_find(struct server *s, uint64_t id);
/* Frees q; when q is a shard, its whole group (waiting ranks get CAKE_ENOSEQ with why). */
void srv_seq_remove(struct server *s, struct seq *q);
void srv_group_end(struct server *s, struct shard_group *g, const char *why);
struct seq *srv_seq_of(struct server *s, struct client *c, uint64_t id); /* own tenant's only */
struct client *srv_client_by_id(struct server *s, uint64_t id);

/* replies: queue one frame (the n fds, owned, travel with it), then finish the request.
 * A reply to an engine is preceded by MAP frames for the segments its tenant gained or
 * lost since its last reply (srv_queue_maps). */
void srv_queue_frame(struct server *s, struct client *c, uint16_t type, uint64_t rid,
                     const ProtobufCMessage *msg, const int *fds, int n);
void srv_reply(struct server *s, struct client *c, uint16_t type, const ProtobufCMessage *msg);
/* Removes q from the sequence table now; its pages are freed when its owner next calls or
 * disconnects (it may still be writing them: the header's contract). */
void srv_quarantine(struct server *s, struct seq *q);
void srv_reply_error(struct server *s, struct client *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* An fd of segment i of GPU pool gpu for a client (the caller closes it), or -errno. */
int srv_gpu_seg_export(struct server *s, uint32_t gpu, uint32_t i);
/* Forgets t (and frees its empty segments) when nothing holds it any more. */
void srv_tenant_gc(struct server *s, struct tenant *t);
/* Frees the sequences quarantined for client id (srv_quarantine). */
void srv_release_quarantine(struct server *s, uint64_t id);

/* conn.c: closing a connection (its sequences go, its work is cancelled), freeing closed
 * ones, accepting new ones (the listening socket's loop callback) */
void srv_client_close(struct server *s, struct client *c);
void srv_client_free(struct client *c);
void srv_free_dead(struct server *s);
void srv_on_accept(void *arg, uint32_t ev);
/* closes the connections that have not sent HELLO within hello_timeout_s */
void srv_sweep_hello(struct server *s);
/* an unsolicited error frame (request id 0) saying why, sent if the socket takes it, then
 * the close */
void srv_client_goodbye(struct server *s, struct client *c, int code, const char *why);

/* handlers.c: runs the request in c->h / c->body */
void srv_dispatch(struct server *s, struct client *c);

/* work.c: a request's job on the workers (c waits, C_BUSY; seqs, allocated, pass to the
 * job); the decode step's reserve and reply once evictions are done; phase 2 of a shard
 * group's layer (0 or -ENOMEM). */
void work_start(struct server *s, struct client *c, uint16_t type, struct seq **seqs, uint32_t n,
                uint32_t layer, int observe, double pref);
void work_decode_reply(struct server *s, struct client *c, struct seq **seqs, uint32_t n,
                       uint32_t evictions);
int work_start_group(struct server *s, struct shard_group *g, struct seq **all, uint16_t type,
                     uint32_t layer, double pref);
/* A job making room (pressure.c) over seqs (taken over) of client c's tenant: a re-slice
 * (MSG_RESLICE) or parking (MSG_PARK, each prepared: seq_move_prepare); c's reply waits. */
void work_start_pressure(struct server *s, struct client *c, uint16_t type, struct seq **seqs,
                         uint32_t n);
/* Lands the loop's decode evictions the GPU has finished and completes their steps; returns
 * whether any is still in flight (the loop then polls instead of sleeping). */
int work_poll_flights(struct server *s);
/* handlers.c: opens an unsharded sequence for c and replies; or returns CAKE_EINVAL,
 * CAKE_EOOM, ... with *why (no reply). */
int srv_seq_open(struct server *s, struct client *c, const struct seq_open_args *a,
                 const char **why);
/* A decode step of c's sequences ids[n] (parked ones restored first): replied, waiting, or
 * handed to a job. With `record`, each sequence's layers whose decode log-sum-exps the
 * engine wrote for this step are lse[i] (DecodeStep.decode_lse; lse NULL: none); without
 * (a step's retry) what its first try recorded stays. */
void srv_decode(struct server *s, struct client *c, const uint64_t *ids, size_t n, int record,
                const ProtobufCBinaryData *lse);
void work_free(struct work *w);
/* After a job that evicted or moved q's pages (loop): a restore's or a park's move (r) and a
 * relocation committed, the pages it emptied given back, the descriptor published, a
 * re-slice's expected pages no longer owed once evicted (or always: settled). */
void work_commit_seq(struct server *s, struct seq *q, const struct seq_result *r, int settled);
/* shard.c: a shard's scoring job completed (c: its client, if still there); a group's
 * phase 2 completed (replies to every rank). */
void shard_arrive(struct server *s, struct work *w, struct client *c);
void shard_group_done(struct server *s, struct work *w);
/* metrics.c: Prometheus text; per-tenant series only of c's own tenant unless c
 * administers. 0 or -ENOMEM. */
int metrics_render(struct server *s, const struct client *c, struct strbuf *b);
/* server.c: reads and dispatches frames until the socket is drained or a request waits */
void srv_client_read(struct server *s, struct client *c);

#endif
