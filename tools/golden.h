/* golden.h - loads golden cases in the format of shared/golden/README.md. */
#ifndef CAKE_GOLDEN_H
#define CAKE_GOLDEN_H

#include <stddef.h>
#include <stdint.h>

struct golden_case {
    char name[256];
    uint32_t L, H, Hkv, d, n, w, C;
    float tau1, tau2, gamma;
    int cascading;
    uint16_t *q, *k;           /* bf16 [L][H][w][d], [L][Hkv][n][d] */
    float *pref, *entropy, *variance, *indicator; /* [L], [L][Hkv][S] */
    int32_t *budgets, *stage;  /* [L], [L][L] */
    int32_t **kept;            /* per layer [Hkv][kept_len[l]] */
    uint32_t *kept_len;
};

/* Loads dir; returns 0 or -1 with a message in err. */
int golden_load(const char *dir, struct golden_case *c, char *err, size_t errlen);
void golden_free(struct golden_case *c);

/* Reads a whole file; returns its bytes (malloc'd) and size, NULL on error. */
void *golden_read_file(const char *path, size_t *len);

#endif
