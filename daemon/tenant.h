/* tenant.h - tenants and admission control.
 *
 * A tenant is a service name declared at attach together with the uid(s) allowed to be it
 * (the peer uid from SO_PEERCRED, which the kernel proves): a configured tenant names its
 * uids (default: caked's own), and another uid declaring that name is refused; an
 * unconfigured name becomes the tenant (name, that uid) at its first attach. Each has a
 * weight, a minimum and a maximum in bytes; configured tenants exist before anyone
 * attaches. Admission: a tenant may grow to its maximum (0 = its weighted share of the
 * pool among the tenants that are attached, hold memory or are configured), always to its
 * minimum, and never into other tenants' unmet minimums. Not thread-safe (event loop thread). */
#ifndef CAKE_TENANT_H
#define CAKE_TENANT_H

#include <stdint.h>

#define TENANT_NAME_MAX 63
#define TENANT_MAX 4096 /* distinct (name, uid) pairs; attach is refused beyond it */
#define TENANT_MAX_WEIGHT 1000000u
#define TENANT_MAX_UIDS 16

struct tenant {
    uint32_t id;          /* 1 + its index: the owner of its pool segments (pool.h) */
    char name[TENANT_NAME_MAX + 1];
    uint32_t uid;         /* the first of uids (what listings show) */
    uint32_t uids[TENANT_MAX_UIDS], n_uids;
    uint32_t weight;
    uint64_t min_bytes, max_bytes;         /* host pool */
    uint64_t gpu_min_bytes, gpu_max_bytes; /* GPU pools, all together (0 max: the share) */
    /* accounting: changed only through the tenant_* functions below (tenant.c), by the
     * event loop thread */
    uint64_t used_bytes;
    uint64_t gpu_used_bytes; /* in the GPU pool (caked --gpu-pool) */
    uint64_t heap_bytes;     /* caked's own memory for its sequences (tenant_admit_heap) */
    uint32_t sequences, clients; /* clients: engines (they count toward shares) */
    uint32_t conns;       /* every connection attached as this tenant, cachectl included */
    int in_use;           /* 0: a free slot (tenant_release), reused by the next new tenant */
    uint64_t oom_errors;
    uint64_t oom_logged;  /* oom_errors when a refusal was last logged (srv_oom) */
    double t_oom_log;     /* and when */
    int configured;
    /* under pressure (pressure.h): enum pressure_mode (0: caked's --pressure) and the
     * tokens per layer no re-slice goes below (0: caked's --min-tokens) */
    int pressure;
    uint32_t min_tokens;
    uint64_t reslices, rs_tokens;        /* sequences re-sliced, layer tokens given up */
    uint64_t waits_granted, waits_refused; /* requests that waited for room, and the outcome */
    uint64_t drained;     /* pool pages of its segments drained for other tenants */
    double drain_until;   /* segments drained for it are kept until then (pressure.c) */
    /* pages its sequences were asked to give back (re-slices, parking) and have not yet
     * (seq_expect): admission counts them as given, its cap binds what it keeps */
    uint64_t giving_bytes, gpu_giving_bytes;
};

struct tenants {
    struct tenant *t;
    uint32_t n, cap; /* slots used so far (some may be free again), allocated */
    uint32_t live;   /* tenants in use */
};

/* The tenant uid may be under the name: the configured one listing uid, else (name, uid),
 * created with weight 1 when create is set. NULL with *why: the name is configured for other
 * uids (-EPERM), or no memory / too many tenants (-ENOMEM). Pointers stay valid until
 * tenants_fini (tenants are never removed). */
struct tenant *tenant_get(struct tenants *ts, const char *name, uint32_t uid, int create,
                          int *err);
/* Adds or updates the configured tenant `name` that the n uids (1..TENANT_MAX_UIDS) may be.
 * Returns 0, -ENOMEM, or -EEXIST when one of the uids already attached under that name as a
 * tenant of its own (its memory is accounted there). */
struct tenant_quota {
    uint32_t weight;
    uint64_t min_bytes, max_bytes, gpu_min_bytes, gpu_max_bytes;
    int pressure;         /* enum pressure_mode, 0: caked's */
    uint32_t min_tokens;  /* 0: caked's */
};
int tenant_configure(struct tenants *ts, const char *name, const uint32_t *uids, uint32_t n,
                     const struct tenant_quota *q);
/* Forgets t if nothing holds it any more (not configured; no connection, sequence or
 * memory). Returns 1 if it was released: its id may name another tenant later, so the
 * caller first gives up whatever the id owned (pool segments). */
int tenant_idle(const struct tenant *t);
void tenant_release(struct tenants *ts, struct tenant *t);
/* Is t worth listing (TENANTS, STATUS): an engine attached, memory held, or configured?
 * (Control connections such as cachectl's make a tenant, but not one to show.) */
int tenant_listed(const struct tenant *t);
/* Would tenant_configure succeed? (0, -EINVAL, -EEXIST; nothing changes) */
int tenant_configure_check(struct tenants *ts, const char *name, const uint32_t *uids, uint32_t n);
/* Does t admit uid? */
int tenant_has_uid(const struct tenant *t, uint32_t uid);
void tenants_fini(struct tenants *ts);

/* Effective cap of t in a pool of pool_bytes: its maximum or weighted share, at least its
 * minimum. */
uint64_t tenant_cap(const struct tenants *ts, const struct tenant *t, uint64_t pool_bytes);
/* Bytes t may take now with free_bytes free in the pool (gpu: in a GPU pool): admission
 * is bytes <= tenant_room. What its sequences owe (giving_bytes) counts as given: a tenant
 * whose share shrank still steps while its cuts come in. *own_bound: its cap (not the pool) is what limits it. */
uint64_t tenant_room(const struct tenants *ts, const struct tenant *t, int gpu, uint64_t free_bytes,
                     uint64_t pool_bytes, int *own_bound);
/* 0 if t may take `bytes` more now with free_bytes free in the pool, else CAKE_EOOM. */
int tenant_admit(const struct tenants *ts, const struct tenant *t, uint64_t bytes,
                 uint64_t free_bytes, uint64_t pool_bytes);

/* The same for the GPU pools (pool_bytes and free_bytes: the pool asked; a tenant's GPU use
 * is counted over every GPU pool): t may grow to gpu_max_bytes or else its weighted share, always to gpu_min_bytes,
 * never into other tenants' unmet GPU minimums. */
uint64_t tenant_cap_gpu(const struct tenants *ts, const struct tenant *t, uint64_t pool_bytes);
int tenant_admit_gpu(const struct tenants *ts, const struct tenant *t, uint64_t bytes,
                     uint64_t free_bytes, uint64_t pool_bytes);

/* Valid service name: 1..63 chars of [A-Za-z0-9._-]. */
int tenant_name_ok(const char *name);

/* Pool bytes taken (bytes > 0) or given back (< 0) by one of t's sequences, host pool or
 * GPU pool; giving back more than t holds is a broken invariant (CAKE_CHECK). */
void tenant_charge(struct tenant *t, int64_t bytes);
void tenant_charge_gpu(struct tenant *t, int64_t bytes);
void tenant_charge_heap(struct tenant *t, int64_t bytes);
/* Bytes t's sequences have been asked to give back (> 0) or gave / no longer owe (< 0). */
void tenant_giving(struct tenant *t, int gpu, int64_t bytes);
/* A connection attached as t (engine: it maps the pool and counts toward fair shares), or
 * left (d = -1); a sequence opened or freed; a refusal for lack of memory. */
void tenant_attach(struct tenant *t, int engine, int d);
void tenant_count_seq(struct tenant *t, int d);
void tenant_oom(struct tenant *t);
/* caked's own memory for t's sequences (indicators, selection buffers, page tables: host and
 * GPU alike) is bounded like pages: at most t's weighted share of heap_limit, and never more
 * than is left of it (heap_free). 0 or CAKE_EOOM. */
int tenant_admit_heap(const struct tenants *ts, const struct tenant *t, uint64_t bytes,
                      uint64_t heap_free, uint64_t heap_limit);

#endif
