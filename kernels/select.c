/* select.c - top-k per score vector by radix select on the float bits.
 *
 * Scores map to unsigned keys whose order is the float order (NaN lowest). Three
 * histogram passes (11, 11, 10 bits) find the key of the k-th largest element and how
 * many elements equal to it are taken; one last scan emits the winners in ascending
 * position, which is both fixed mode's storage order and the tie rule (among equal
 * scores, lower positions win). O(n) time: the keys are computed once, and each pass after
 * the first scans only the elements left in the chosen bucket. */
#include <stdlib.h>

#include "kern.h"

struct ranked {
    uint32_t key;
    uint32_t pos;
};

static int by_score_then_pos(const void *a, const void *b)
{
    const struct ranked *x = a, *y = b;
    if (x->key != y->key)
        return x->key > y->key ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

/* The threshold key (the k-th largest of keys[0..n)) and how many elements equal to it are
 * taken. Three histogram passes of 11, 11 and 10 bits; each pass after the first scans only
 * the previous pass's bucket, gathered into cand (room for n keys). */
static uint32_t threshold(const uint32_t *keys, uint32_t n, uint32_t k, uint32_t *cand,
                          uint32_t *need_out)
{
    static const int shift[3] = {21, 10, 0};
    static const uint32_t width[3] = {11, 11, 10};
    uint32_t prefix = 0, need = k; /* need: how many still to take at/below prefix */
    uint32_t hist[2048];
    const uint32_t *src = keys;
    uint32_t m = n;
    for (int pass = 0; pass < 3; pass++) {
        uint32_t nb = 1u << width[pass], sh = (uint32_t)shift[pass];
        for (uint32_t b = 0; b < nb; b++)
            hist[b] = 0;
        for (uint32_t j = 0; j < m; j++)
            hist[(src[j] >> sh) & (nb - 1)]++;
        uint32_t b = nb;
        while (b-- > 0) {
            if (hist[b] >= need)
                break;
            need -= hist[b];
        }
        prefix |= b << shift[pass];
        if (pass < 2) { /* keep the bucket's keys for the next pass (in place after the first) */
            uint32_t c = 0;
            for (uint32_t j = 0; j < m; j++) { /* branch-free: the test is a coin toss */
                cand[c] = src[j];
                c += ((src[j] >> shift[pass]) & (nb - 1)) == b;
            }
            src = cand, m = c;
        }
    }
    *need_out = need;
    return prefix;
}

uint32_t kern_topk(const float *score, uint32_t n, uint32_t k, enum kern_order order,
                   uint32_t *idx)
{
    if (k == 0 || n == 0)
        return 0;
    uint32_t *scratch = malloc(sizeof(uint32_t) * 2 * (size_t)n);
    uint32_t m = kern_topk_ws(score, n, k, order, idx, scratch);
    free(scratch);
    return m;
}

uint32_t kern_topk_ws(const float *score, uint32_t n, uint32_t k, enum kern_order order,
                      uint32_t *idx, uint32_t *scratch)
{
    if (k > n)
        k = n;
    if (k == 0)
        return 0;
    /* keys once, then the threshold: the k-th largest key */
    uint32_t *keys = scratch;
    uint32_t prefix, need;
    if (keys) {
        for (uint32_t j = 0; j < n; j++)
            keys[j] = kern_sort_key(score[j]);
        prefix = threshold(keys, n, k, keys + n, &need);
    } else { /* no memory: the same passes over the scores, slower */
        static const int shift[3] = {21, 10, 0};
        static const uint32_t width[3] = {11, 11, 10};
        uint32_t mask = 0, hist[2048];
        prefix = 0, need = k;
        for (int pass = 0; pass < 3; pass++) {
            uint32_t nb = 1u << width[pass];
            for (uint32_t b = 0; b < nb; b++)
                hist[b] = 0;
            for (uint32_t j = 0; j < n; j++) {
                uint32_t key = kern_sort_key(score[j]);
                if ((key & mask) == prefix)
                    hist[(key >> shift[pass]) & (nb - 1)]++;
            }
            uint32_t b = nb;
            while (b-- > 0) {
                if (hist[b] >= need)
                    break;
                need -= hist[b];
            }
            prefix |= b << shift[pass];
            mask |= (nb - 1) << shift[pass];
        }
    }
    /* prefix is the threshold key; take everything above it and the first `need` equal
     * (branch-free where the keys are at hand: whether a key is taken is unpredictable) */
    uint32_t m = 0, ties = need;
    if (keys) {
        for (uint32_t j = 0; j < n && m < k; j++) {
            uint32_t key = keys[j], eq = (key == prefix) & (ties > 0);
            idx[m] = j;
            m += (key > prefix) | eq;
            ties -= eq;
        }
    } else {
        for (uint32_t j = 0; j < n; j++) {
            uint32_t key = kern_sort_key(score[j]);
            if (key > prefix || (key == prefix && ties && ties--))
                idx[m++] = j;
        }
    }
    if (order == KERN_ORDER_SCORE && m > 1) {
        struct ranked *r = malloc(sizeof(*r) * m);
        if (r) {
            for (uint32_t i = 0; i < m; i++)
                r[i] = (struct ranked){kern_sort_key(score[idx[i]]), idx[i]};
            qsort(r, m, sizeof(*r), by_score_then_pos);
            for (uint32_t i = 0; i < m; i++)
                idx[i] = r[i].pos;
            free(r);
        } else {
            /* no memory: insertion sort keeps the contract, only slower */
            for (uint32_t i = 1; i < m; i++) {
                uint32_t p = idx[i], kp = kern_sort_key(score[p]), q = i;
                for (; q > 0; q--) {
                    uint32_t kq = kern_sort_key(score[idx[q - 1]]);
                    if (kq > kp || (kq == kp && idx[q - 1] < p))
                        break;
                    idx[q] = idx[q - 1];
                }
                idx[q] = p;
            }
        }
    }
    return m;
}
