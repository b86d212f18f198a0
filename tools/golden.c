/* golden.c - golden case loader (see golden.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "golden.h"

void *golden_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    void *buf = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long sz = ftell(f);
        if (sz >= 0 && fseek(f, 0, SEEK_SET) == 0) {
            buf = malloc(sz ? (size_t)sz : 1);
            if (buf && fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
                free(buf);
                buf = NULL;
            }
            *len = (size_t)sz;
        }
    }
    fclose(f);
    return buf;
}

static void *load_exact(const char *dir, const char *name, size_t want, char *err, size_t el)
{
    char path[4096];
    size_t len = 0;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    void *p = golden_read_file(path, &len);
    if (!p) {
        snprintf(err, el, "%s: %s", path, strerror(errno));
        return NULL;
    }
    if (want != (size_t)-1 && len != want) {
        snprintf(err, el, "%s: %zu bytes, expected %zu", path, len, want);
        free(p);
        return NULL;
    }
    return p;
}

int golden_load(const char *dir, struct golden_case *c, char *err, size_t el)
{
    memset(c, 0, sizeof(*c));
    const char *base = strrchr(dir, '/');
    snprintf(c->name, sizeof c->name, "%s", base && base[1] ? base + 1 : dir);
    char path[4096];
    snprintf(path, sizeof path, "%s/meta.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, el, "%s: %s", path, strerror(errno));
        return -1;
    }
    char line[256];
    int seen = 0;
    while (fgets(line, sizeof line, f)) {
        char key[64];
        double v;
        if (sscanf(line, "%63[^=]=%lf", key, &v) != 2)
            continue;
        seen++;
        if (!strcmp(key, "layers")) c->L = (uint32_t)v;
        else if (!strcmp(key, "heads")) c->H = (uint32_t)v;
        else if (!strcmp(key, "kv_heads")) c->Hkv = (uint32_t)v;
        else if (!strcmp(key, "head_dim")) c->d = (uint32_t)v;
        else if (!strcmp(key, "prompt_len")) c->n = (uint32_t)v;
        else if (!strcmp(key, "window")) c->w = (uint32_t)v;
        else if (!strcmp(key, "cache_size")) c->C = (uint32_t)v;
        else if (!strcmp(key, "tau1")) c->tau1 = (float)v;
        else if (!strcmp(key, "tau2")) c->tau2 = (float)v;
        else if (!strcmp(key, "gamma")) c->gamma = (float)v;
        else if (!strcmp(key, "cascading")) c->cascading = v != 0.0;
        else seen--;
    }
    fclose(f);
    if (seen < 11 || !c->L || !c->H || !c->Hkv || !c->d || !c->n || !c->w || c->n <= c->w) {
        snprintf(err, el, "%s: incomplete or unusable meta.txt", path);
        return -1;
    }
    size_t L = c->L, S = c->n - c->w;
    c->kept = calloc(L, sizeof(*c->kept));
    c->kept_len = calloc(L, sizeof(*c->kept_len));
    if (!c->kept || !c->kept_len ||
        !(c->q = load_exact(dir, "q.bf16", L * c->H * c->w * c->d * 2, err, el)) ||
        !(c->k = load_exact(dir, "k.bf16", L * c->Hkv * c->n * c->d * 2, err, el)) ||
        !(c->pref = load_exact(dir, "pref.f32", L * 4, err, el)) ||
        !(c->entropy = load_exact(dir, "entropy.f32", L * 4, err, el)) ||
        !(c->variance = load_exact(dir, "variance.f32", L * 4, err, el)) ||
        !(c->indicator = load_exact(dir, "indicator.f32", L * c->Hkv * S * 4, err, el)) ||
        !(c->budgets = load_exact(dir, "budgets.i32", L * 4, err, el)) ||
        !(c->stage = load_exact(dir, "stage_budgets.i32", L * L * 4, err, el))) {
        golden_free(c);
        return -1;
    }
    for (size_t l = 0; l < L; l++) {
        char name[64];
        size_t len = 0;
        snprintf(name, sizeof name, "kept_l%zu.i32", l);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        c->kept[l] = golden_read_file(path, &len);
        if (!c->kept[l] || len % (4 * c->Hkv)) {
            snprintf(err, el, "%s: missing or not [Hkv][k] int32", path);
            golden_free(c);
            return -1;
        }
        c->kept_len[l] = (uint32_t)(len / (4 * c->Hkv));
    }
    return 0;
}

void golden_free(struct golden_case *c)
{
    if (c->kept)
        for (uint32_t l = 0; l < c->L; l++)
            free(c->kept[l]);
    free(c->kept), free(c->kept_len), free(c->q), free(c->k), free(c->pref);
    free(c->entropy), free(c->variance), free(c->indicator), free(c->budgets), free(c->stage);
    memset(c, 0, sizeof(*c));
}
