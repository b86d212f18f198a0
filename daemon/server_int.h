/* server_int.h - caked's server internals shared by server.c (connections, lifecycle) and
 * handlers.c (what each request does). Not installed; loop thread only. */
#ifndef CAKE_SERVER_INT_H
#define CAKE_SERVER_INT_H

#include <stdint.h>
#include <sys/socket.h>

#include "cake.pb-c.h"
#include "metrics.h"
#include "pool.h"
#include "seq.h"
#include "shard.h"
#include "server.h"
#include "tenant.h"
#include "worker.h"
#ifdef CAKE_HAVE_CUDA
#include "gpupool.h"
#endif

#define SERVER_MAX_CLIENTS 4096      /* accept() beyond this is refused and counted */
#define SERVER_MAX_DECODE_BATCH 65536 /* sequence ids in one DECODE_STEP */
#define UNPACK_LIMIT(len) ((size_t)(len) * 8 + 65536) /* bound on unpacker heap per body */

enum conn_state { C_HEADER, C_BODY, C_BUSY, C_CLOSED };

struct client {
    struct server *srv;
    uint64_t id;
    int fd, handle;
    struct ucred cred;
    struct tenant *tenant;
    int admin;
    int engine;            /* mapped the pool */
    enum conn_state state;
    uint8_t hdr[FRAME_HEADER_BYTES];
    size_t got;            /* body bytes received */
    uint8_t in[4096];      /* bytes read ahead of parsing */
    size_t in_off, in_len;
    int drained;           /* the last recv came back short: wait for the next poll event */
    int reading;           /* inside client_read: completions must not re-enter it */
    struct client *next_dead;
    struct frame_header h;
    uint8_t *body;
    int discard;           /* unknown type: read and drop the body, then answer */
    int close_after_flush; /* the stream is unusable after this reply */
    uint8_t *out;
    size_t out_len, out_off;
    int out_fds[1 + SERVER_MAX_GPUS]; /* fds to pass with the pending reply */
    int n_out_fds;
    double t0;             /* request start */
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
    struct srv_gpu {       /* one per --gpu-pool */
#ifdef CAKE_HAVE_CUDA
        struct gpupool gpu;
#endif
        char uuid[48];
        int fd;            /* exported GPU pool, -1 none (legacy IPC) */
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
    double t_refuse_log;   /* last time a refusal was logged (at most once a second) */
    struct client **clients;
    uint32_t n_clients;
    struct seq_slot *slots;
    uint32_t n_slots, cap_slots, n_seqs;
    uint64_t next_client_id;
    struct client *dead;   /* closed during this loop iteration, freed after it */
    double t_start;
    uid_t owner_uid;
    int stopping;
    struct shard_group *groups; /* tensor-parallel shard groups (shard.h) */
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
    uint32_t n;
    /* shard groups: phase 1 scores one shard; phase 2 allocates and evicts every shard of
     * `group` with the group's preference (seqs = the members) */
    int phase;
    struct shard_group *group;
};

double srv_now_s(void);
void srv_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* sequence table: ids are slot + generation, so a stale id never names a newer sequence */
int srv_seq_new(struct server *s, uint64_t *id);
struct seq *srv_seq_find(struct server *s, uint64_t id);
/* Frees q; when q is a shard, its whole group (waiting ranks get CAKE_ENOSEQ with why). */
void srv_seq_remove(struct server *s, struct seq *q);
void srv_group_end(struct server *s, struct shard_group *g, const char *why);
struct seq *srv_seq_of(struct server *s, struct client *c, uint64_t id); /* own tenant's only */
struct client *srv_client_by_id(struct server *s, uint64_t id);

/* replies: queue one frame (fd >= 0 travels with it), then finish the request */
void srv_queue_frame(struct server *s, struct client *c, uint16_t type, uint64_t rid,
                     const ProtobufCMessage *msg, int fd);
void srv_reply(struct server *s, struct client *c, uint16_t type, const ProtobufCMessage *msg, int fd);
/* a reply with fds (HELLO: the host pool memfd, then each GPU pool shared by fd) */
void srv_reply_fds(struct server *s, struct client *c, uint16_t type, const ProtobufCMessage *msg,
                   const int *fds, int n_fds);
void srv_reply_error(struct server *s, struct client *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* handlers.c: runs the request in c->h / c->body */
void srv_dispatch(struct server *s, struct client *c);
/* server.c: reads and dispatches frames until the socket is drained or a request waits */
void srv_client_read(struct server *s, struct client *c);

#endif
