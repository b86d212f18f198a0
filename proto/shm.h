/* shm.h - what caked writes in the shared pool for engines to read (proto/README.md).
 *
 * Each sequence has a window: host pool pages (any pages, in the order the SEQ_OPEN reply
 * lists them) that caked and libcake each map side by side into one range of their own, so
 * the descriptor (at the window's start) and the scratch area after it (host query rings,
 * indicator) read as contiguous memory although the pages need not be. The daemon writes
 * the descriptor before it replies; engines only read it. Engines write K/V, the query rings
 * and the indicator; the daemon reads those only inside the engine's own calls. */
#ifndef CAKE_SHM_H
#define CAKE_SHM_H

#include <stdint.h>

#define SHM_DESC_MAGIC 0x51534b43u /* "CKSQ" */
#define SHM_DESC_VERSION 3u
#define SHM_PLACE_HOST 0u
#define SHM_PLACE_GPU 1u
#define SHM_PLACE_PARKED 2u /* a GPU sequence parked in the host pool (descriptor only: the
                               layers show no pages until it is restored) */

struct shm_layer {
    uint32_t tokens;     /* slots in use: prefix + window + decoded */
    uint32_t pages;      /* pages holding them */
    uint32_t budget;     /* recorded budget (scored tokens) */
    uint32_t prefix;     /* scored-prefix tokens still held */
    uint32_t ring_next;  /* ring row of the reserved decode token's query; the window (no
                            row) until the first decode step */
    uint32_t holes;      /* 1: heads keep different counts (Ada-KV): head g's prefix slots
                            [head_kept[layer][g], prefix) hold no token and must be masked */
};

struct shm_desc {
    uint32_t magic, version;
    uint64_t seq_id;
    uint32_t layers, q_heads, kv_heads, head_dim;
    uint32_t dtype, tokens_per_page, max_pages, window;
    uint32_t prompt_len;
    uint32_t placement;          /* SHM_PLACE_HOST, or SHM_PLACE_GPU: K/V page offsets and the
                                    ring page table are offsets in the GPU pool */
    uint64_t ring_offset;        /* host: window offset of layer 0's query ring; GPU: 0 */
    uint64_t ring_layer_bytes;   /* host: one layer's ring [q_heads][w][head_dim], 64-aligned */
    uint64_t indicator_offset;   /* window offset of [kv_heads][S] f32 (either placement) */
    uint64_t page_bytes;
    uint32_t ring_pages;         /* GPU: pages of one layer's ring (shm_ring_geom); host: 0 */
    uint32_t reslices;           /* times caked lowered the budgets to make room (pressure);
                                    protocol 3 called it reserved (always 0 then) */
    /* followed by struct shm_layer layer[layers], uint64_t page[layers][max_pages],
     * uint32_t head_kept[layers][kv_heads], then (8-aligned) uint64_t
     * ring_page[layers][ring_pages] */
};

/* GPU query rings are paged like K/V: a layer's ring is ring_pages pages of the GPU pool,
 * none of which need be next to another. Whole heads share a page while a head's w rows fit
 * one (heads_per_page of them); otherwise each head takes pages_per_head pages of
 * rows_per_page rows. Row `slot` of head h lies in page shm_ring_at() says. */
struct shm_ring {
    uint32_t rows_per_page, heads_per_page, pages_per_head, pages;
};

static inline struct shm_ring shm_ring_geom(uint32_t q_heads, uint32_t window, uint64_t row,
                                            uint64_t page_bytes)
{
    struct shm_ring g = {0, 0, 0, 0};
    uint64_t rpp = row ? page_bytes / row : 0;
    if (!rpp || !window || !q_heads)
        return g;
    g.rows_per_page = rpp > UINT32_MAX ? UINT32_MAX : (uint32_t)rpp;
    if (window <= g.rows_per_page) {
        g.heads_per_page = g.rows_per_page / window, g.pages_per_head = 1;
        g.pages = (q_heads + g.heads_per_page - 1) / g.heads_per_page;
    } else {
        g.heads_per_page = 1, g.pages_per_head = (window + g.rows_per_page - 1) / g.rows_per_page;
        g.pages = q_heads * g.pages_per_head;
    }
    return g;
}

/* Which of the layer's ring pages holds row `slot` of head h (*page) and the row's byte
 * offset in it. */
static inline uint64_t shm_ring_at(const struct shm_ring *g, uint32_t window, uint64_t row,
                                   uint32_t h, uint32_t slot, uint32_t *page)
{
    if (g->pages_per_head == 1) {
        *page = h / g->heads_per_page;
        return ((uint64_t)(h % g->heads_per_page) * window + slot) * row;
    }
    *page = h * g->pages_per_head + slot / g->rows_per_page;
    return (uint64_t)(slot % g->rows_per_page) * row;
}

static inline struct shm_layer *shm_layers(struct shm_desc *d)
{
    return (struct shm_layer *)(d + 1);
}

/* The arrays after the header are located from the writer's or reader's own copy of the
 * geometry (layers, max_pages, kv_heads, ring_pages as opened), never from the
 * descriptor's fields: the pool is writable by every client of the tenant. */
static inline uint64_t *shm_pages(struct shm_desc *d, uint32_t layers, uint32_t max_pages,
                                  uint32_t layer)
{
    return (uint64_t *)(shm_layers(d) + layers) + (uint64_t)layer * max_pages;
}

static inline uint32_t *shm_head_kept(struct shm_desc *d, uint32_t layers, uint32_t max_pages,
                                      uint32_t kv_heads, uint32_t layer)
{
    return (uint32_t *)shm_pages(d, layers, max_pages, layers) + (uint64_t)layer * kv_heads;
}

static inline uint64_t *shm_ring_pages(struct shm_desc *d, uint32_t layers, uint32_t max_pages,
                                       uint32_t kv_heads, uint32_t ring_pages, uint32_t layer)
{
    uint64_t kept = sizeof(uint32_t) * (uint64_t)layers * kv_heads;
    uint8_t *p = (uint8_t *)shm_head_kept(d, layers, max_pages, kv_heads, 0) + ((kept + 7) & ~7ull);
    return (uint64_t *)p + (uint64_t)layer * ring_pages;
}

static inline uint64_t shm_desc_bytes(uint32_t layers, uint32_t max_pages, uint32_t kv_heads,
                                      uint32_t ring_pages)
{
    uint64_t kept = sizeof(uint32_t) * (uint64_t)layers * kv_heads;
    return sizeof(struct shm_desc) + sizeof(struct shm_layer) * layers +
           sizeof(uint64_t) * (uint64_t)layers * max_pages + ((kept + 7) & ~7ull) +
           sizeof(uint64_t) * (uint64_t)layers * ring_pages;
}

_Static_assert(sizeof(struct shm_layer) == 24, "shm_layer is part of the shared layout");
_Static_assert(sizeof(struct shm_desc) == 96, "shm_desc is part of the shared layout");

#endif
