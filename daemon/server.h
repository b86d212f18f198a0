/* server.h - caked's server as main.c sees it: create, run until a signal stops it, destroy
 * (server_int.h maps the files behind it).
 *
 * One event loop thread owns every connection, the pool allocator, tenants and the
 * sequence table; heavy work (scoring, compaction) runs on worker threads and completes
 * back on the loop. A connection handles one request at a time (the client library is
 * blocking); a connection's further frames wait in its socket until the reply is out. */
#ifndef CAKE_SERVER_H
#define CAKE_SERVER_H

#include <stdint.h>
#include <sys/types.h>

#include "../proto/frame.h"
#include "loop.h"

#define SERVER_MAX_GPUS FRAME_MAX_GPUS /* proto/frame.h: the wire's limit */

struct server_cfg {
    char socket_path[108];
    char socket_group[64];   /* empty: mode 0600; else owned by this group, mode 0660 */
    char admin_group[64];    /* members may administer (besides root and caked's uid) */
    char config_path[4096];  /* --config: read again on SIGHUP (tenants and quotas) */
    char metrics_listen[272]; /* [HOST:]PORT for GET /metrics over HTTP; "" off (http.h) */
    uint64_t segment_bytes;  /* pool segment size (0: pool_default_seg_bytes) */
    uint64_t host_pool_bytes;
    uint64_t heap_limit_bytes; /* caked's own memory for sequences (0: the host pool's size) */
    struct server_gpu_cfg {  /* one GPU pool per GPU (--gpu-pool repeated) */
        uint64_t bytes;
        char uuid[48];       /* "" : the first GPU */
    } gpu[SERVER_MAX_GPUS];
    uint32_t n_gpus;
    int gpu_ipc_legacy;      /* share the GPU pool by a legacy CUDA IPC handle (else VMM fd,
                                falling back to legacy where export is refused) */
    uint64_t page_bytes;
    int hugepages;
    enum loop_backend io;
    int workers;             /* worker threads (<= 0: one per core) */
    int kernel_threads;      /* OpenMP threads per scoring job (default 1: jobs run side by side) */
    uint32_t max_per_uid;    /* connections one uid may hold (0: half the client limit) */
    double hello_timeout_s;  /* a connection must send HELLO within this (default 5 s) */
    int log_level;           /* 1 + SRV_LOG_* (error, warning, info, debug); 0: info */
    int pressure;            /* enum pressure_mode for tenants that set none (0: reslice) */
    double pressure_wait_s;  /* how long a request waits for room (default 5 s; 0: never) */
    uint32_t min_tokens;     /* floor of a layer under re-slicing (default 64) */
};

struct tenant_cfg {
    char name[64];
    uint32_t uids[16];       /* the uids that may be this tenant (TENANT_MAX_UIDS) */
    uint32_t n_uids;         /* 0: caked's own uid */
    uint32_t weight;
    uint64_t min_bytes, max_bytes;         /* host pool */
    uint64_t gpu_min_bytes, gpu_max_bytes; /* GPU pools (gpu-min=, gpu-max=) */
    int pressure;            /* pressure=reslice|refuse (0: caked's --pressure) */
    uint32_t min_tokens;     /* min-tokens= (0: caked's --min-tokens) */
};

struct server;

/* Creates the pool, loop, workers and listening socket; logs what it chose. Returns 0 or
 * -errno / -EADDRINUSE (another caked answers on the socket). */
int server_create(const struct server_cfg *cfg, const struct tenant_cfg *tenants, int n_tenants,
                  struct server **out);
/* Runs until SIGTERM/SIGINT; then tells every client, waits for running work, frees all. */
int server_run(struct server *s);
void server_destroy(struct server *s);

#endif
