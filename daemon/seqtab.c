/* seqtab.c - the sequence table (ids are slot + generation, so a stale id never names a
 * newer sequence), the quarantine of sequences ended by others' actions, shard groups'
 * endings and tenants' collection once nothing holds them (see server_int.h). Loop thread
 * only. */
#define _GNU_SOURCE /* struct ucred */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cake/cake.h"
#include "frame.h"
#include "server_int.h"

int srv_seq_new(struct server *s, uint64_t *id)
{
    for (uint32_t i = 0; i < s->n_slots; i++)
        if (!s->slots[i].s) {
            *id = ((uint64_t)++s->slots[i].gen << 32) | (i + 1);
            return (int)i;
        }
    if (s->n_slots == s->cap_slots) {
        uint32_t cap = s->cap_slots ? s->cap_slots * 2 : 256;
        struct seq_slot *n = realloc(s->slots, sizeof(*n) * cap);
        if (!n)
            return -1;
        s->slots = n, s->cap_slots = cap;
    }
    uint32_t i = s->n_slots++;
    s->slots[i] = (struct seq_slot){NULL, 1};
    *id = ((uint64_t)1 << 32) | (i + 1);
    return (int)i;
}

struct seq *srv_seq_find(struct server *s, uint64_t id)
{
    uint32_t i = (uint32_t)id - 1;
    if ((uint32_t)id == 0 || i >= s->n_slots || !s->slots[i].s || s->slots[i].s->id != id)
        return NULL;
    return s->slots[i].s;
}

static void seq_remove_one(struct server *s, struct seq *q)
{
    struct tenant *t = q->tenant;
    s->slots[(uint32_t)q->id - 1].s = NULL;
    s->n_seqs--;
    seq_free(&s->env, q);
    srv_tenant_gc(s, t); /* its last sequence, its owner gone */
}

void srv_group_end(struct server *s, struct shard_group *g, const char *why)
{
    for (struct shard_group **pp = &s->groups; *pp; pp = &(*pp)->next)
        if (*pp == g) {
            *pp = g->next;
            break;
        }
    for (uint32_t i = 0; i < g->n; i++) {
        struct seq *m = g->member[i];
        if (g->waiting[i]) { /* a rank waiting at the layer barrier */
            struct client *c = srv_client_by_id(s, g->waiting[i]);
            if (c && c->state == C_BUSY)
                srv_reply_error(s, c, CAKE_ENOSEQ, "shard group ended: %s", why);
        }
        if (!m)
            continue;
        m->group = NULL;
        if (m->busy)
            m->orphaned = 1, __atomic_store_n(&m->cancel, 1, __ATOMIC_RELAXED); /* freed after */
        else if (srv_client_by_id(s, m->owner))
            srv_quarantine(s, m); /* its owner may be writing its pages right now */
        else
            seq_remove_one(s, m);
    }
    free(g);
}

void srv_tenant_gc(struct server *s, struct tenant *t)
{
    if (!t || !tenant_idle(t))
        return;
    pool_release_owner(&s->pool, t->id);
    for (uint32_t i = 0; i < s->n_gpus; i++)
        pool_release_owner(&s->gpus[i].pages, t->id);
    tenant_release(&s->tenants, t);
}

void srv_quarantine(struct server *s, struct seq *q)
{
    s->slots[(uint32_t)q->id - 1].s = NULL;
    s->n_seqs--;
    q->next_q = s->quarantine, s->quarantine = q;
}

/* Frees what was quarantined for client id (it called again, or is gone). */
void srv_release_quarantine(struct server *s, uint64_t id)
{
    for (struct seq **pp = &s->quarantine; *pp;) {
        struct seq *q = *pp;
        if (q->owner == id) {
            struct tenant *t = q->tenant;
            *pp = q->next_q;
            seq_free(&s->env, q);
            srv_tenant_gc(s, t);
        } else {
            pp = &q->next_q;
        }
    }
}

void srv_seq_remove(struct server *s, struct seq *q)
{
    if (q->group) {
        char why[96];
        snprintf(why, sizeof why, "shard %u was closed or its owner exited", q->shard);
        struct shard_group *g = q->group;
        g->member[q->shard] = NULL; /* freed below, whatever its state */
        g->waiting[q->shard] = 0;
        q->group = NULL;
        srv_group_end(s, g, why);
    }
    seq_remove_one(s, q);
}

/* A sequence the client may act on: one it opened on this connection. (Administrators and
 * other connections of its tenant may look at it, never act on it.) */
struct seq *srv_seq_of(struct server *s, struct client *c, uint64_t id)
{
    struct seq *q = srv_seq_find(s, id);
    return q && q->owner == c->id ? q : NULL;
}
