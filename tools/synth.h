/* synth.h - synthetic prompts whose attention has structure, for demos and workloads.
 *
 * Per (layer, kv head): an attention sink at position 0, heavy hitters at about one
 * position in 64, and a recency bias toward the last tokens; how sharply the window
 * queries attend to them varies by layer, so CAKE's layer preferences differ. Keys,
 * values and the last w queries are bf16 in the page layout's order. Deterministic in
 * (seed, layer). */
#ifndef CAKE_SYNTH_H
#define CAKE_SYNTH_H

#include <stdint.h>

struct synth_cfg {
    uint32_t layers, q_heads, kv_heads, head_dim, n, window;
    uint64_t seed;
};

/* Fills k and v ([kv_heads][n][head_dim] bf16 each) and q ([q_heads][window][head_dim]
 * bf16) for one layer, and marks heavy[g * n + j] = 1 for planted heavy positions
 * (sink included) when heavy is not NULL. */
void synth_layer(const struct synth_cfg *c, uint32_t layer, uint16_t *k, uint16_t *v,
                 uint16_t *q, uint8_t *heavy);

#endif
