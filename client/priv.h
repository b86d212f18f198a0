/* priv.h - libcake's handles, shared by its source files (cake.c: protocol and pool;
 * gpu.c: the GPU paths). Not installed. */
#ifndef CAKE_PRIV_H
#define CAKE_PRIV_H

#include <stddef.h>
#include <stdint.h>

#include "cake/cake.h"
#include "frame.h"
#include "gpupool.h"
#include "reader.h"
#include "shm.h"

struct seq_gpu;

#define CAKE_MAX_GPUS FRAME_MAX_GPUS /* proto/frame.h: the wire's limit */
#define CAKE_MAX_LAYERS 512 /* layers of a sequence caked opens (its SEQ_MAX_LAYERS) */
#define CAKE_FD_GROUPS 4 /* fd groups received and not yet taken by their frames */
#define CAKE_FD_GROUP_MAX 64 /* fds one frame carries at most (caked's SERVER_MAP_FDS) */

struct cake_ctx {
    int fd;
    int timeout_ms;
    char service[64];
    char errstr[256];
    void *(*alloc)(size_t, void *);
    void (*release)(void *, void *);
    void *ud;
    long server_uid;        /* cake_set_server_uid (-1: root or our own) */
    int want_admin;
    int shrink_idle;        /* cake_set_shrink_idle */
    uint8_t *pool;          /* the host pool's reserved range; tenant segments mapped in it */
    size_t pool_bytes;
    uint64_t page_bytes;
    uint64_t seg_bytes;
    uint32_t n_segs;
    uint32_t *seg_gen;      /* per host segment: the generation mapped, 0 none */
    struct frame_reader rd; /* replies as they arrive (proto/reader.h) */
    /* fds that arrived, one group per read that brought them (a frame's fds travel with
     * its first byte, alone in their sendmsg): taken in order by the frames that carry
     * FRAME_FLAG_FDS; `end` is the stream offset where that read ended */
    struct cake_fdgroup {
        uint64_t end;
        int n;
        int fd[CAKE_FD_GROUP_MAX];
    } fdg[CAKE_FD_GROUPS];
    int n_fdg;
    uint64_t next_rid;
    cake_seq **seqs;
    size_t n_seqs, cap_seqs;
    struct cake_gpu {       /* caked's GPU pools, in its order */
        char uuid[48];
        uint64_t bytes;
        int mapped;         /* this process could map it (its range is reserved) */
        int legacy;         /* one IPC handle for the whole pool (no segments) */
        struct gpupool gpu;
    } gpus[CAKE_MAX_GPUS];
    uint32_t n_gpus;
    char gpu_filter[512];   /* cake_set_gpus(): UUIDs to map; "" all this process can */
    int host_registered;
};

struct cake_seq {
    cake_ctx *ctx;
    uint64_t id;
    uint32_t tpp;
    /* The descriptor lives in the shared pool, where any client of the socket can write and
     * where it is stale once caked has ended the sequence. Its fixed fields are copied and
     * checked at open (hdr); every address libcake hands out is computed from hdr, and the
     * mutable fields read from desc (page counts and offsets, ring row) are bounded by it. */
    struct shm_desc hdr;
    struct shm_desc *desc;  /* = win */
    /* The window (shm.h): host pool pages win_pages[win_n] mapped side by side at win (our
     * own mapping when stitched, else the pool's range: one run of pages). */
    uint8_t *win;
    size_t win_bytes;
    uint32_t *win_pages, win_n;
    int win_stitched;
    struct shm_ring ring;   /* GPU sequences: the query rings' page geometry */
    uint32_t gpu_index; /* GPU sequences: which of ctx->gpus */
    uint8_t *kv_base;   /* the pool holding K/V and the query rings: host, or GPU (device) */
    size_t kv_bytes;
    size_t v_offset;    /* page base -> V block */
    size_t row_bytes;
    struct seq_gpu *gpu; /* cake_decode_attention's buffers (gpu.c), NULL until used */
    uint32_t reslices_seen; /* the descriptor's re-slice count its device tables reflect */
    /* The window rows' log-sum-exps (cake_put_lse): [layers][q_heads][window] f32 at this
     * window offset, after the indicator (0: this caked keeps none); lse_put[l]: written
     * since layer l's last observe, which then says so to caked. */
    uint64_t lse_off;
    uint8_t lse_put[CAKE_MAX_LAYERS];
    /* cake_put_decode_lse: bit l set where layer l's newest token's log-sum-exps were
     * written (same area, by ring slot) since the last cake_decode_step, which says so */
    uint8_t dlse_put[CAKE_MAX_LAYERS / 8];
};

/* Layer l's entry in the shared descriptor, located by the copy taken at open. */
static inline const volatile struct shm_layer *seq_layer(const cake_seq *s, uint32_t l)
{
    return shm_layers(s->desc) + l;
}

static inline const volatile uint64_t *seq_pages(const cake_seq *s, uint32_t l)
{
    return shm_pages(s->desc, s->hdr.layers, s->hdr.max_pages, l);
}

/* Pages of layer l, never more than the page table holds. */
static inline uint32_t seq_npages(const cake_seq *s, uint32_t l)
{
    uint32_t n = seq_layer(s, l)->pages;
    return n < s->hdr.max_pages ? n : s->hdr.max_pages;
}

/* Sets the context's error message; returns code. */
int cake_set_err(cake_ctx *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* gpu.c: frees a sequence's GPU buffers (waits for its work in flight). */
void cake_gpu_seq_release(cake_seq *s);
/* gpu.c: brings the device page tables (cake_device_tables) of those of seqs[n] that have
 * them up to date with their descriptors, and waits for the copies. 0 or an error. */
int cake_gpu_tables_refresh(cake_seq *const *seqs, size_t n);

/* Layer l's ring table (GPU sequences): ring.pages offsets in the GPU pool. */
static inline const volatile uint64_t *seq_ring_pages(const cake_seq *s, uint32_t l)
{
    return shm_ring_pages(s->desc, s->hdr.layers, s->hdr.max_pages, s->hdr.kv_heads,
                          s->ring.pages, l);
}

/* cake.c: the address of ring row `slot` of query head h in layer l (host or device), or
 * NULL when it is not in a mapped segment of this process. */
uint8_t *cake_ring_row(const cake_seq *s, uint32_t l, uint32_t h, uint32_t slot);
/* gpu.c: writes rows [0, n) of each head (src + h * head_stride + i * row_bytes, host or
 * device memory) to ring slots slot0 + i of layer l, asynchronously on stream. */
int cake_gpu_put_rows(cake_seq *s, uint32_t l, const uint8_t *src, size_t head_stride,
                      uint32_t n, uint32_t slot0, void *stream);
/* gpu.c: rows x width bytes from src (pitch spitch; host or device memory) to dst (pitch
 * dpitch), asynchronously on stream. -ENOTSUP without CUDA. */
int cake_gpu_copy_2d(cake_seq *s, void *dst, size_t dpitch, const void *src, size_t spitch,
                     size_t width, size_t rows, void *stream);

#endif
