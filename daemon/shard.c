/* shard.c - shard group bookkeeping (see shard.h). */
#include <string.h>

#include "shard.h"

struct shard_group *shard_find(struct shard_group *list, const struct tenant *t, uint64_t key)
{
    for (; list; list = list->next)
        if (list->tenant == t && list->key == key)
            return list;
    return NULL;
}

static int same_policy(const struct policy_cfg *a, const struct policy_cfg *b)
{
    return a->mode == b->mode && a->cache_size == b->cache_size && a->window == b->window &&
           a->tau1 == b->tau1 && a->tau2 == b->tau2 && a->gamma == b->gamma &&
           a->cascading == b->cascading && a->decode_slack == b->decode_slack &&
           a->kind == b->kind && a->alloc == b->alloc && a->indicator == b->indicator &&
           a->pool == b->pool && a->pool_kernel == b->pool_kernel && a->decode == b->decode &&
           a->sinks == b->sinks && a->pyramid_beta == b->pyramid_beta &&
           a->ada_alpha == b->ada_alpha;
}

const char *shard_join_check(const struct shard_group *g, const struct seq_open_args *a,
                             uint32_t shards, uint32_t shard)
{
    if (shards > SHARD_MAX)
        return "shards must be at most 64";
    if (shard >= shards)
        return "shard must be below shards";
    if (!g)
        return NULL;
    if (g->n != shards)
        return "the group was opened with another number of shards";
    if (g->member[shard])
        return "that shard of the group is already open";
    const struct seq *f = NULL;
    for (uint32_t i = 0; i < g->n && !f; i++)
        f = g->member[i];
    if (!f)
        return NULL;
    if (f->next_observe || f->decoded)
        return "the group's prefill has started";
    struct policy_cfg cfg = a->cfg;
    cfg.layers = a->layers, cfg.model_dtype = f->cfg.model_dtype;
    policy_cfg_resolve(&cfg);
    if (a->layers != f->L || a->prompt_len != f->n || a->max_new != f->max_new ||
        a->head_dim != f->d || a->dtype != (uint32_t)f->dt || (a->gpu != 0) != (f->gpu != 0) ||
        a->q_heads / a->kv_heads != f->H / f->Hkv || !same_policy(&cfg, &f->cfg))
        return "shards of a group need the same layers, prompt, head size, dtype, GQA group, "
               "placement and policy";
    return NULL;
}

double shard_preference(const struct shard_group *g, const struct policy_cfg *cfg)
{
    if (g->observed == g->arrived)
        return policy_preference(cfg, g->ent, g->var);
    return g->arrived ? g->pref_sum / g->arrived : 0.0;
}
