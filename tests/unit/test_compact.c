/* Compaction of K and V in place, against a naive gather into a fresh copy. */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "kern.h"
#include "testutil.h"

static void run(enum kern_dtype dt, int ascending)
{
    uint32_t Hkv = 1 + tu_below(4), d = 4 * (1 + tu_below(16)), n = 10 + tu_below(600);
    uint32_t tpp = 1 + tu_below(64), npages = (n + tpp - 1) / tpp, w = 1 + tu_below(8);
    size_t row = d * kern_dtype_size(dt), page_bytes = 2 * (size_t)Hkv * tpp * row;
    void **pages = malloc(sizeof(void *) * npages);
    for (uint32_t p = 0; p < npages; p++) {
        pages[p] = malloc(page_bytes);
        for (size_t b = 0; b < page_bytes; b++)
            ((uint8_t *)pages[p])[b] = (uint8_t)tu_next();
    }
    struct kern_kv kv = {dt, Hkv, d, tpp, n, pages, page_bytes / 2};
    uint32_t S = n - w, k = tu_below(S + 1);
    /* expected rows, gathered before the move */
    uint8_t *wantk = malloc(row * (k + w) * Hkv + 1), *wantv = malloc(row * (k + w) * Hkv + 1);
    uint32_t *keep = malloc(sizeof(uint32_t) * Hkv * (S + 1));
    void *scratch = malloc(2 * row * (S + 1));
    for (uint32_t g = 0; g < Hkv; g++) {
        uint32_t *kp = keep + g * S;
        /* k distinct positions: a random subset, ascending or shuffled */
        uint32_t m = 0;
        for (uint32_t j = 0; j < S && m < k; j++)
            if (tu_below(S - j) < k - m)
                kp[m++] = j;
        if (!ascending)
            for (uint32_t i = k; i > 1; i--) {
                uint32_t r = tu_below(i), t = kp[i - 1];
                kp[i - 1] = kp[r], kp[r] = t;
            }
        for (uint32_t i = 0; i < k + w; i++) {
            uint32_t src = i < k ? kp[i] : S + (i - k);
            memcpy(wantk + (g * (k + w) + i) * row, kern_kv_key(&kv, g, src), row);
            memcpy(wantv + (g * (k + w) + i) * row,
                   (char *)kern_kv_key(&kv, g, src) + kv.v_offset_bytes, row);
        }
    }
    for (uint32_t g = 0; g < Hkv; g++)
        cr_assert_eq(kern_compact_head(&kv, g, keep + g * S, k, S, w, scratch), 0);
    for (uint32_t g = 0; g < Hkv; g++)
        for (uint32_t i = 0; i < k + w; i++) {
            cr_assert_eq(memcmp(kern_kv_key(&kv, g, i), wantk + (g * (k + w) + i) * row, row), 0,
                         "K g%u slot %u", g, i);
            cr_assert_eq(memcmp((char *)kern_kv_key(&kv, g, i) + kv.v_offset_bytes,
                                wantv + (g * (k + w) + i) * row, row), 0, "V g%u slot %u", g, i);
        }
    for (uint32_t p = 0; p < npages; p++)
        free(pages[p]);
    free(pages), free(wantk), free(wantv), free(keep), free(scratch);
}

Test(compact, ascending_in_place_all_dtypes)
{
    tu_seed();
    for (int rep = 0; rep < 30; rep++)
        run((enum kern_dtype)(rep % 3), 1);
}

Test(compact, any_order_with_scratch)
{
    tu_seed();
    for (int rep = 0; rep < 30; rep++)
        run((enum kern_dtype)(rep % 3), 0);
}

Test(compact, rejects_bad_slots)
{
    uint8_t page[2 * 2 * 8 * 4 * 2];
    void *pages[1] = {page};
    struct kern_kv kv = {KERN_BF16, 2, 4, 8, 8, pages, sizeof page / 2};
    uint32_t keep_bad[2] = {1, 6}; /* 6 is inside the window */
    cr_assert_eq(kern_compact_head(&kv, 0, keep_bad, 2, 5, 3, NULL), -EINVAL);
    uint32_t keep_desc[2] = {3, 1}; /* not ascending and no scratch */
    cr_assert_eq(kern_compact_head(&kv, 0, keep_desc, 2, 5, 3, NULL), -EINVAL);
    cr_assert_eq(kern_compact_head(&kv, 2, keep_desc, 0, 5, 3, NULL), -EINVAL); /* no head 2 */
}
