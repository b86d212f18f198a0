/* compact.c - in-place gather of kept tokens within a layer's pages. */
#include <errno.h>
#include <string.h>

#include "kern.h"

static void move_row(const struct kern_kv *kv, uint32_t g, uint32_t dst, uint32_t src)
{
    if (dst == src)
        return;
    size_t rb = kern_kv_row_bytes(kv);
    char *d = kern_kv_key(kv, g, dst), *s = kern_kv_key(kv, g, src);
    memcpy(d, s, rb);
    if (kv->v_offset_bytes)
        memcpy(d + kv->v_offset_bytes, s + kv->v_offset_bytes, rb);
}

int kern_compact_head(const struct kern_kv *kv, uint32_t g, const uint32_t *keep, uint32_t k,
                      uint32_t win_start, uint32_t win_len, void *scratch)
{
    if (g >= kv->kv_heads || win_start + win_len > kv->n_tokens || k > win_start)
        return -EINVAL;
    int ascending = 1;
    for (uint32_t i = 0; i < k; i++) {
        if (keep[i] >= win_start)
            return -EINVAL;
        if (i && keep[i] <= keep[i - 1])
            ascending = 0;
    }
    if (ascending) {
        /* keep[i] >= i, so a slot is written only after every source below it moved */
        for (uint32_t i = 0; i < k; i++)
            move_row(kv, g, i, keep[i]);
    } else {
        if (!scratch)
            return -EINVAL;
        size_t rb = kern_kv_row_bytes(kv);
        char *sk = scratch, *sv = sk + (size_t)k * rb;
        for (uint32_t i = 0; i < k; i++) {
            const char *s = kern_kv_key(kv, g, keep[i]);
            memcpy(sk + i * rb, s, rb);
            if (kv->v_offset_bytes)
                memcpy(sv + i * rb, s + kv->v_offset_bytes, rb);
        }
        for (uint32_t i = 0; i < k; i++) {
            char *d = kern_kv_key(kv, g, i);
            memcpy(d, sk + i * rb, rb);
            if (kv->v_offset_bytes)
                memcpy(d + kv->v_offset_bytes, sv + i * rb, rb);
        }
    }
    for (uint32_t u = 0; u < win_len; u++)
        move_row(kv, g, k + u, win_start + u);
    return 0;
}

void kern_gather_f32(const float *in, const uint32_t *keep, uint32_t k, float *out)
{
    for (uint32_t i = 0; i < k; i++)
        out[i] = in[keep[i]];
}
