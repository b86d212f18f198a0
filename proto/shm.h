/* shm.h - what caked writes in the shared pool for engines to read (proto/README.md).
 *
 * Each sequence has a descriptor (page run at desc_offset) and a scratch area (page run at
 * scratch_offset). The daemon writes the descriptor before it replies; engines only read
 * it. Engines write K/V, the query ring and the indicator; the daemon reads those only
 * inside the engine's own calls. */
#ifndef CAKE_SHM_H
#define CAKE_SHM_H

#include <stdint.h>

#define SHM_DESC_MAGIC 0x51534b43u /* "CKSQ" */
#define SHM_DESC_VERSION 2u
#define SHM_PLACE_HOST 0u
#define SHM_PLACE_GPU 1u

struct shm_layer {
    uint32_t tokens;     /* slots in use: prefix + window + decoded */
    uint32_t pages;      /* pages holding them */
    uint32_t budget;     /* recorded budget (scored tokens) */
    uint32_t prefix;     /* scored-prefix tokens still held */
    uint32_t ring_next;  /* ring row for the next decode query */
    uint32_t holes;      /* 1: heads keep different counts (Ada-KV): head g's prefix slots
                            [head_kept[layer][g], prefix) hold no token and must be masked */
};

struct shm_desc {
    uint32_t magic, version;
    uint64_t seq_id;
    uint32_t layers, q_heads, kv_heads, head_dim;
    uint32_t dtype, tokens_per_page, max_pages, window;
    uint32_t prompt_len;
    uint32_t placement;          /* SHM_PLACE_HOST, or SHM_PLACE_GPU: page and ring offsets
                                    are offsets in the GPU pool */
    uint64_t ring_offset;        /* pool offset of layer 0's query ring */
    uint64_t ring_layer_bytes;   /* ring of one layer: [q_heads][w][head_dim] */
    uint64_t indicator_offset;   /* host pool offset of [kv_heads][S] f32 (either placement) */
    uint64_t page_bytes;
    /* followed by struct shm_layer layer[layers], then uint64_t page[layers][max_pages],
     * then uint32_t head_kept[layers][kv_heads] */
};

static inline struct shm_layer *shm_layers(struct shm_desc *d)
{
    return (struct shm_layer *)(d + 1);
}

/* The page table and head_kept arrays are located from the geometry of the writer's or
 * reader's own copy (layers, max_pages, kv_heads as opened), never from the descriptor's
 * fields: the pool is writable by every client of the socket. */
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

static inline uint64_t shm_desc_bytes(uint32_t layers, uint32_t max_pages, uint32_t kv_heads)
{
    return sizeof(struct shm_desc) + sizeof(struct shm_layer) * layers +
           sizeof(uint64_t) * (uint64_t)layers * max_pages +
           sizeof(uint32_t) * (uint64_t)layers * kv_heads;
}

#endif
