/* synth.c - synthetic structured prompts (see synth.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "synth.h"

struct rng {
    uint64_t s;
};

static uint64_t next(struct rng *r)
{
    r->s ^= r->s << 13, r->s ^= r->s >> 7, r->s ^= r->s << 17;
    return r->s;
}

static float gauss(struct rng *r) /* Box-Muller */
{
    double u1 = ((next(r) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (next(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static void unit(struct rng *r, float *x, uint32_t d)
{
    double s = 0;
    for (uint32_t i = 0; i < d; i++)
        x[i] = gauss(r), s += (double)x[i] * x[i];
    for (uint32_t i = 0; i < d; i++)
        x[i] = (float)(x[i] / sqrt(s));
}

void synth_layer(const struct synth_cfg *c, uint32_t layer, uint16_t *k, uint16_t *v,
                 uint16_t *q, uint8_t *heavy)
{
    uint32_t d = c->head_dim, n = c->n, w = c->window, G = c->q_heads / c->kv_heads;
    struct rng r = {c->seed * 0x9e3779b97f4a7c15ull + layer * 0x632be59bd9b4e019ull + 1};
    float *hd = malloc(sizeof(float) * d), *rd = malloc(sizeof(float) * d);
    float *row = malloc(sizeof(float) * d);
    float sd = sqrtf((float)d);
    /* layers differ in how peaked their attention is: a pseudo-random sharpness */
    float sharp = 1.0f + 5.0f * (float)((layer * 7919u) % 97u) / 97.0f;
    float recency = 2.0f * (float)((layer * 104729u) % 89u) / 89.0f;
    for (uint32_t g = 0; g < c->kv_heads; g++) {
        unit(&r, hd, d); /* the heavy hitters' shared direction */
        unit(&r, rd, d); /* the recency direction */
        for (uint32_t j = 0; j < n; j++) {
            int hv = j == 0 || next(&r) % 64 == 0;
            float dist = (float)(n - 1 - j);
            float rec = expf(-dist / 48.0f);
            for (uint32_t i = 0; i < d; i++)
                row[i] = 0.6f * gauss(&r) + (hv ? 2.5f : 0.0f) * hd[i] * sd / 4 +
                         rec * rd[i] * sd / 4;
            kern_from_f32(KERN_BF16, row, k + ((size_t)g * n + j) * d, d);
            for (uint32_t i = 0; i < d; i++)
                row[i] = gauss(&r);
            kern_from_f32(KERN_BF16, row, v + ((size_t)g * n + j) * d, d);
            if (heavy)
                heavy[(size_t)g * n + j] = (uint8_t)hv;
        }
        for (uint32_t h = g * G; h < (g + 1) * G; h++)
            for (uint32_t i = 0; i < w; i++) {
                /* queries change over the window: the heavy weight wanders */
                float wh = sharp * (0.5f + (float)(next(&r) % 1000) / 1000.0f);
                for (uint32_t x = 0; x < d; x++)
                    row[x] = wh * hd[x] + recency * rd[x] + 0.3f * gauss(&r);
                kern_from_f32(KERN_BF16, row, q + ((size_t)h * w + i) * d, d);
            }
    }
    free(hd), free(rd), free(row);
}
