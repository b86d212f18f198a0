/* tenant.c - tenants and admission (see tenant.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "check.h"
#include "tenant.h"

int tenant_name_ok(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > TENANT_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

static struct tenant *add(struct tenants *ts, const char *name, uint32_t uid)
{
    /* a tenant's index (its id - 1) never changes: the array is allocated once */
    if (!ts->t) { /* allocated once: tenant pointers stay valid for the daemon's life */
        if (!(ts->t = calloc(TENANT_MAX, sizeof(*ts->t))))
            return NULL;
        ts->cap = TENANT_MAX;
    }
    uint32_t i = 0;
    while (i < ts->n && ts->t[i].in_use) /* a slot released earlier, else a new one */
        i++;
    if (i == TENANT_MAX)
        return NULL;
    if (i == ts->n)
        ts->n++;
    struct tenant *t = &ts->t[i];
    memset(t, 0, sizeof(*t));
    t->id = i + 1, t->in_use = 1;
    ts->live++;
    strncpy(t->name, name, TENANT_NAME_MAX);
    t->uid = uid, t->uids[0] = uid, t->n_uids = 1, t->weight = 1;
    return t;
}

int tenant_listed(const struct tenant *t)
{
    return t->in_use && (t->clients || t->used_bytes || t->gpu_used_bytes || t->configured);
}

int tenant_idle(const struct tenant *t)
{
    return t->in_use && !t->configured && !t->conns && !t->clients && !t->sequences &&
           !t->used_bytes && !t->gpu_used_bytes && !t->heap_bytes;
}

void tenant_release(struct tenants *ts, struct tenant *t)
{
    memset(t, 0, sizeof(*t)); /* name "" never matches a lookup */
    ts->live--;
}

int tenant_has_uid(const struct tenant *t, uint32_t uid)
{
    for (uint32_t i = 0; i < t->n_uids; i++)
        if (t->uids[i] == uid)
            return 1;
    return 0;
}

struct tenant *tenant_get(struct tenants *ts, const char *name, uint32_t uid, int create,
                          int *err)
{
    int configured_elsewhere = 0;
    for (uint32_t i = 0; i < ts->n; i++) {
        struct tenant *t = &ts->t[i];
        if (strcmp(t->name, name))
            continue;
        if (tenant_has_uid(t, uid))
            return t;
        configured_elsewhere |= t->configured;
    }
    if (configured_elsewhere) {
        *err = -EPERM;
        return NULL;
    }
    struct tenant *t = create ? add(ts, name, uid) : NULL;
    if (!t)
        *err = -ENOMEM;
    return t;
}

static struct tenant *configured_slot(struct tenants *ts, const char *name, uint32_t uid0)
{
    for (uint32_t i = 0; i < ts->n; i++)
        if (!strcmp(ts->t[i].name, name) && (ts->t[i].configured || tenant_has_uid(&ts->t[i], uid0)))
            return &ts->t[i];
    return NULL;
}

int tenant_configure_check(struct tenants *ts, const char *name, const uint32_t *uids, uint32_t n)
{
    if (!n || n > TENANT_MAX_UIDS)
        return -EINVAL;
    struct tenant *t = configured_slot(ts, name, uids[0]);
    /* a uid already attached under this name as a tenant of its own would then have two */
    for (uint32_t i = 0; i < ts->n; i++)
        for (uint32_t k = 0; k < n; k++)
            if (&ts->t[i] != t && !strcmp(ts->t[i].name, name) && tenant_has_uid(&ts->t[i], uids[k]))
                return -EEXIST;
    return 0;
}

int tenant_configure(struct tenants *ts, const char *name, const uint32_t *uids, uint32_t n,
                     const struct tenant_quota *q)
{
    int rc = tenant_configure_check(ts, name, uids, n);
    if (rc)
        return rc;
    struct tenant *t = configured_slot(ts, name, uids[0]);
    if (!t && !(t = add(ts, name, uids[0])))
        return -ENOMEM;
    memcpy(t->uids, uids, n * sizeof(*uids));
    t->n_uids = n, t->uid = uids[0];
    t->weight = q->weight ? q->weight : 1;
    t->min_bytes = q->min_bytes, t->max_bytes = q->max_bytes;
    t->gpu_min_bytes = q->gpu_min_bytes, t->gpu_max_bytes = q->gpu_max_bytes;
    t->pressure = q->pressure, t->min_tokens = q->min_tokens;
    t->configured = 1;
    return 0;
}

void tenants_fini(struct tenants *ts)
{
    free(ts->t);
    memset(ts, 0, sizeof(*ts));
}

static int active(const struct tenant *t)
{
    return t->clients || t->used_bytes || t->gpu_used_bytes || t->heap_bytes || t->configured;
}

static uint64_t weighted_share(const struct tenants *ts, const struct tenant *t, uint64_t pool_bytes)
{
    uint64_t wsum = 0;
    for (uint32_t i = 0; i < ts->n; i++)
        if (active(&ts->t[i]) || &ts->t[i] == t)
            wsum += ts->t[i].weight;
    if (!wsum)
        return pool_bytes;
    return (uint64_t)((double)pool_bytes * t->weight / (double)wsum);
}

/* A tenant's holding in one kind of pool and its bounds there. */
struct held {
    uint64_t used, min, max, giving;
};

static struct held host_held(const struct tenant *t)
{
    return (struct held){t->used_bytes, t->min_bytes, t->max_bytes, t->giving_bytes};
}

static struct held gpu_held(const struct tenant *t)
{
    return (struct held){t->gpu_used_bytes, t->gpu_min_bytes, t->gpu_max_bytes, t->gpu_giving_bytes};
}

static uint64_t cap_of(const struct tenants *ts, const struct tenant *t, struct held h,
                       uint64_t pool_bytes)
{
    uint64_t cap = h.max ? (h.max < pool_bytes ? h.max : pool_bytes)
                         : weighted_share(ts, t, pool_bytes);
    /* a minimum is guaranteed whatever the others' weights (SET_QUOTA keeps min <= pool) */
    return cap > h.min ? cap : h.min;
}

/* What t may take: up to its cap, and of the free bytes what others' unmet minimums leave
 * (our own unmet minimum is ours to use, others' is not). */
static uint64_t room(const struct tenants *ts, const struct tenant *t, uint64_t free_bytes,
                     uint64_t pool_bytes, struct held (*of)(const struct tenant *), int *own_bound)
{
    struct held h = of(t);
    uint64_t cap = cap_of(ts, t, h, pool_bytes);
    uint64_t used = h.used - (h.giving < h.used ? h.giving : h.used); /* owed counts as given */
    uint64_t mine = used < cap ? cap - used : 0, reserved = 0;
    for (uint32_t i = 0; i < ts->n; i++) {
        struct held o = of(&ts->t[i]);
        if (&ts->t[i] != t && o.min > o.used)
            reserved += o.min - o.used;
    }
    uint64_t pool = free_bytes - (reserved < free_bytes ? reserved : free_bytes);
    if (own_bound)
        *own_bound = mine <= pool;
    return mine < pool ? mine : pool;
}

static int admit(const struct tenants *ts, const struct tenant *t, uint64_t bytes,
                 uint64_t free_bytes, uint64_t pool_bytes, struct held (*of)(const struct tenant *))
{
    return bytes > room(ts, t, free_bytes, pool_bytes, of, NULL) ? CAKE_EOOM : 0;
}

uint64_t tenant_room(const struct tenants *ts, const struct tenant *t, int gpu, uint64_t free_bytes,
                     uint64_t pool_bytes, int *own_bound)
{
    return room(ts, t, free_bytes, pool_bytes, gpu ? gpu_held : host_held, own_bound);
}

uint64_t tenant_cap(const struct tenants *ts, const struct tenant *t, uint64_t pool_bytes)
{
    return cap_of(ts, t, host_held(t), pool_bytes);
}

uint64_t tenant_cap_gpu(const struct tenants *ts, const struct tenant *t, uint64_t pool_bytes)
{
    return cap_of(ts, t, gpu_held(t), pool_bytes);
}

int tenant_admit(const struct tenants *ts, const struct tenant *t, uint64_t bytes,
                 uint64_t free_bytes, uint64_t pool_bytes)
{
    return admit(ts, t, bytes, free_bytes, pool_bytes, host_held);
}

int tenant_admit_gpu(const struct tenants *ts, const struct tenant *t, uint64_t bytes,
                     uint64_t free_bytes, uint64_t pool_bytes)
{
    return admit(ts, t, bytes, free_bytes, pool_bytes, gpu_held);
}

static void charge(uint64_t *held, int64_t bytes)
{
    CAKE_CHECK(bytes >= 0 || *held >= (uint64_t)-bytes);
    *held += (uint64_t)bytes;
}

void tenant_giving(struct tenant *t, int gpu, int64_t bytes)
{
    charge(gpu ? &t->gpu_giving_bytes : &t->giving_bytes, bytes);
}

void tenant_charge(struct tenant *t, int64_t bytes) { charge(&t->used_bytes, bytes); }
void tenant_charge_gpu(struct tenant *t, int64_t bytes) { charge(&t->gpu_used_bytes, bytes); }
void tenant_charge_heap(struct tenant *t, int64_t bytes) { charge(&t->heap_bytes, bytes); }

int tenant_admit_heap(const struct tenants *ts, const struct tenant *t, uint64_t bytes,
                      uint64_t heap_free, uint64_t heap_limit)
{
    if (bytes > heap_free || t->heap_bytes + bytes > weighted_share(ts, t, heap_limit))
        return CAKE_EOOM;
    return 0;
}

static void count(uint32_t *n, int d)
{
    CAKE_CHECK(d >= 0 || *n > 0);
    *n = (uint32_t)((int64_t)*n + d);
}

void tenant_attach(struct tenant *t, int engine, int d)
{
    count(&t->conns, d);
    if (engine)
        count(&t->clients, d);
}

void tenant_count_seq(struct tenant *t, int d) { count(&t->sequences, d); }
void tenant_oom(struct tenant *t) { t->oom_errors++; }
