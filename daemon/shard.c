/* shard.c - shard groups (see shard.h): their bookkeeping, and the barrier where a layer's
 * shards meet (work.c calls it when a shard's scoring job completes). */
#define _GNU_SOURCE /* struct ucred (server_int.h) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "frame.h"
#include "server_int.h"
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
           a->ada_alpha == b->ada_alpha && a->run_width == b->run_width;
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

/* ---- the barrier (loop thread) ------------------------------------------------ */

/* A shard scored its layer (phase 1): wait for the others; the last one starts phase 2. */
void shard_arrive(struct server *s, struct work *w, struct client *c)
{
    struct seq *q = w->seqs[0];
    struct shard_group *g = q->group;
    const struct seq_result *r = &w->res[0];
    if (r->rc) { /* the layer cannot be allocated without this shard */
        char why[128];
        snprintf(why, sizeof why, "shard %u failed to score layer %u: %s", q->shard, w->layer,
                 r->rc < -4095 ? cake_strerror(r->rc) : strerror(-r->rc));
        if (c && c->state == C_BUSY)
            srv_reply_error(s, c, CAKE_EINTERNAL, "%s", why);
        srv_seq_remove(s, q);
        return;
    }
    g->arrived++;
    g->observed += w->observe != 0;
    g->ent += r->ent, g->var += r->var, g->pref_sum += r->pref;
    g->waiting[q->shard] = w->client_id;
    if (g->arrived < g->n)
        return;
    struct seq **all = malloc(sizeof(*all) * g->n);
    if (!all) {
        srv_group_end(s, g, "out of memory");
        return;
    }
    memcpy(all, g->member, sizeof(*all) * g->n);
    double pref = shard_preference(g, &q->cfg);
    g->arrived = g->observed = 0, g->ent = g->var = g->pref_sum = 0;
    if (work_start_group(s, g, all, w->type, w->layer, pref)) {
        free(all);
        srv_group_end(s, g, "out of memory");
    }
}

/* Phase 2 done: every shard allocated from the same preference; reply to every rank. */
void shard_group_done(struct server *s, struct work *w)
{
    struct shard_group *g = w->group;
    struct seq *orphan = NULL;
    for (uint32_t i = 0; i < w->n; i++) {
        struct seq *q = w->seqs[i];
        const struct seq_result *r = &w->res[i];
        q->busy = 0;
        seq_prefill_commit(&s->env, q, r);
        s->m.evictions_prefill += r->n_ev;
        s->m.tokens_evicted += r->evicted_tokens;
        struct client *c = srv_client_by_id(s, g->waiting[i]);
        g->waiting[i] = 0;
        if (q->orphaned)
            orphan = q;
        if (!c || c->state != C_BUSY)
            ;
        else if (r->rc)
            srv_reply_error(s, c, r->rc < -4095 ? r->rc : CAKE_EINTERNAL, "%s failed: %s",
                            frame_type_name(w->type),
                            r->rc < -4095 ? cake_strerror(r->rc) : strerror(-r->rc));
        else {
            Cake__PrefillReply pr = CAKE__PREFILL_REPLY__INIT;
            pr.preference = w->pref;
            pr.n_evicted_layers = r->n_ev, pr.evicted_layers = (uint32_t *)r->ev_layers;
            srv_reply(s, c, w->type, &pr.base);
        }
    }
    if (orphan) /* a rank died meanwhile: the whole group goes */
        srv_seq_remove(s, orphan);
}
