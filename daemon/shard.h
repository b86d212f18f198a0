/* shard.h - tensor-parallel shard groups: one logical sequence split by kv heads over
 * several ranks (processes, usually one per GPU), each rank holding its own sequence (a
 * shard). The shards share one CAKE allocation: at every prefill layer caked waits until all
 * shards have scored it, combines their entropy and variance sums into the layer's one
 * preference, and every shard then allocates from the same preferences and caps, so every
 * rank records the same per-layer budgets; token selection stays with each shard's own heads
 * and no K/V crosses shards. Decode is per shard (same budgets, local selection). A group
 * lives and dies together: closing a shard, or losing its owner, frees every shard.
 *
 * This module holds the bookkeeping; the server (handlers.c) drives it. Loop thread only. */
#ifndef CAKE_SHARD_H
#define CAKE_SHARD_H

#include <stdint.h>

#include "seq.h"

#define SHARD_MAX 64

struct shard_group {
    uint64_t key;                  /* the engine's group key, per tenant */
    const struct tenant *tenant;
    uint32_t n;                    /* shards */
    uint32_t joined;
    struct seq *member[SHARD_MAX]; /* NULL until that rank opens its shard */
    /* the layer being gathered */
    uint32_t arrived;
    uint32_t observed;             /* arrivals that let caked score (the rest submitted) */
    double ent, var, pref_sum;
    uint64_t waiting[SHARD_MAX];   /* client ids waiting for the group's allocation; 0 none */
    struct shard_group *next;
};

struct shard_group *shard_find(struct shard_group *list, const struct tenant *t, uint64_t key);

/* NULL when a shard opened with (a, shards, shard) may join g (g may be NULL: a new group),
 * else why not. */
const char *shard_join_check(const struct shard_group *g, const struct seq_open_args *a,
                             uint32_t shards, uint32_t shard);

/* The preference of the layer the group gathered: CAKE's P from the summed entropy and
 * variance when every shard let caked score, else the mean of the shards' own. */
double shard_preference(const struct shard_group *g, const struct policy_cfg *cfg);

#endif
