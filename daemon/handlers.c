/* handlers.c - what each request does (see server_int.h): one table names each request's
 * body message, handler and rights (HELLO first, administrators only); the dispatcher checks
 * them, unpacks the body once with the bounded allocator and frees it after the handler.
 * Handlers check ownership and state, act on pool, tenants and sequences, and reply; heavy
 * work goes to the workers (work.c) and replies when it completes; the metrics text is
 * metrics.c's. */
#define _GNU_SOURCE /* struct ucred */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cake/cake.h"
#include "frame.h"
#include "pressure.h"
#include "server_int.h"

/* ---- handlers -------------------------------------------------------------- */


/* The wire carries libcake's enum values (cake.h), which SEQ_OPEN casts to the daemon's
 * (policy.h): one set of numbers, checked here where they meet. */
#define SAME(a, b) _Static_assert((int)(a) == (int)(b), #a " differs from " #b)
SAME(CAKE_MODE_PARITY, POLICY_PARITY); SAME(CAKE_MODE_FIXED, POLICY_FIXED);
SAME(CAKE_POLICY_CAKE, POLICY_CAKE); SAME(CAKE_POLICY_FULL, POLICY_FULL);
SAME(CAKE_POLICY_STREAMINGLLM, POLICY_STREAMING); SAME(CAKE_POLICY_H2O, POLICY_H2O);
SAME(CAKE_POLICY_TOVA, POLICY_TOVA); SAME(CAKE_POLICY_SNAPKV, POLICY_SNAPKV);
SAME(CAKE_POLICY_PYRAMIDKV, POLICY_PYRAMIDKV); SAME(CAKE_POLICY_ADAKV, POLICY_ADAKV);
SAME(CAKE_ALLOC_DEFAULT, POLICY_ALLOC_DEFAULT); SAME(CAKE_ALLOC_PREFERENCE, POLICY_ALLOC_PREFERENCE);
SAME(CAKE_ALLOC_UNIFORM, POLICY_ALLOC_UNIFORM); SAME(CAKE_ALLOC_PYRAMID, POLICY_ALLOC_PYRAMID);
SAME(CAKE_ALLOC_NONE, POLICY_ALLOC_NONE);
SAME(CAKE_IND_DEFAULT, POLICY_IND_DEFAULT); SAME(CAKE_IND_MEAN_VAR, POLICY_IND_MEAN_VAR);
SAME(CAKE_IND_MEAN, POLICY_IND_MEAN); SAME(CAKE_IND_VAR, POLICY_IND_VAR);
SAME(CAKE_IND_LAST, POLICY_IND_LAST); SAME(CAKE_IND_POSITION, POLICY_IND_POSITION);
SAME(CAKE_POOL_DEFAULT, POLICY_POOL_DEFAULT); SAME(CAKE_POOL_AVG, POLICY_POOL_AVG);
SAME(CAKE_POOL_MAX, POLICY_POOL_MAX); SAME(CAKE_POOL_NONE, POLICY_POOL_NONE);
SAME(CAKE_DECODE_DEFAULT, POLICY_DECODE_DEFAULT); SAME(CAKE_DECODE_EVICT, POLICY_DECODE_EVICT);
SAME(CAKE_DECODE_PREFILL_ONLY, POLICY_DECODE_PREFILL_ONLY);
SAME(CAKE_F32, KERN_F32); SAME(CAKE_F16, KERN_F16); SAME(CAKE_BF16, KERN_BF16);
SAME(SERVER_MAX_GPUS, SEQ_MAX_GPUS);
_Static_assert(SEQ_MAX_LAYERS <= POLICY_MAX_LAYERS, "a sequence's layers fit the policy's");
#undef SAME

/* May this peer administer (quotas, other tenants' details)? root, caked's own uid, and
 * members of --admin-group (primary or supplementary group, as the kernel reports them). */
static int admin_right(const struct server *s, const struct client *c)
{
    if (c->cred.uid == 0 || c->cred.uid == s->owner_uid)
        return 1;
    if (s->admin_gid == (gid_t)-1)
        return 0;
    if (c->cred.gid == s->admin_gid)
        return 1;
    gid_t g[256];
    socklen_t len = sizeof g;
    if (getsockopt(c->fd, SOL_SOCKET, SO_PEERGROUPS, g, &len) < 0)
        return 0;
    for (size_t i = 0; i < len / sizeof(gid_t); i++)
        if (g[i] == s->admin_gid)
            return 1;
    return 0;
}

static void h_hello(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    const Cake__Hello *m = (const Cake__Hello *)msg;
    if (m->protocol_version != CAKE_PROTOCOL_VERSION) {
        uint32_t v = m->protocol_version;
        c->close_after_flush = 1;
        srv_reply_error(s, c, CAKE_EVERSION, "protocol version %u not supported (caked speaks %u)",
                    v, CAKE_PROTOCOL_VERSION);
        return;
    }
    if (c->tenant) {
        srv_reply_error(s, c, CAKE_ESTATE, "HELLO was already sent on this connection");
        return;
    }
    const char *name = m->service && m->service[0] ? m->service : "default";
    if (!tenant_name_ok(name)) {
        srv_reply_error(s, c, CAKE_EINVAL, "service name must be 1..63 chars of [A-Za-z0-9._-]");
        return;
    }
    int err = 0;
    struct tenant *t = tenant_get(&s->tenants, name, c->cred.uid, 1, &err);
    if (!t) {
        if (err == -EPERM)
            srv_reply_error(s, c, CAKE_EPERM, "service %s is configured for other uids than %u",
                            name, (unsigned)c->cred.uid);
        else
            srv_reply_error(s, c, CAKE_EOOM, "too many tenants");
        return;
    }
    int want_pool = m->want_pool;
    c->shrink_idle = want_pool && m->shrink_idle;
    /* administration is asked for (cachectl does, engines do not) and granted by right */
    c->admin = m->admin && admin_right(s, c);
    if (want_pool) { /* an engine: it will be sent its tenant's segments (srv_queue_maps) */
        for (uint32_t k = 0; k < 1 + s->n_gpus; k++) {
            const struct pool *p = k ? &s->gpus[k - 1].pages : &s->pool;
            if (k && s->gpus[k - 1].gpu.legacy)
                continue; /* one handle for the whole pool, in this reply */
            if (!(c->seg_sent[k] = calloc(p->n_segs, sizeof(uint32_t)))) {
                srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
                return;
            }
            c->seg_epoch[k] = UINT64_MAX;
        }
    }
    c->tenant = t;
    c->engine = want_pool; /* control clients (cachectl) do not count toward fair shares */
    tenant_attach(t, c->engine, +1);
    srv_logl(c->engine ? SRV_LOG_INFO : SRV_LOG_DEBUG, /* cachectl's: debug */
             "client %llu attached: tenant %s (uid %u, pid %d), %s%s", (unsigned long long)c->id,
             t->name, (unsigned)c->cred.uid, (int)c->cred.pid, c->engine ? "engine" : "control",
             c->admin ? ", administrator" : "");
    Cake__HelloReply r = CAKE__HELLO_REPLY__INIT;
    r.protocol_version = CAKE_PROTOCOL_VERSION;
    r.client_id = c->id;
    r.tenant = t->name;
    r.pool_bytes = s->pool.bytes;
    r.page_bytes = s->pool.page_bytes;
    r.segment_bytes = s->pool.seg_bytes;
    r.daemon_version = (char *)CAKE_VERSION;
    r.admin = c->admin;
    Cake__GpuPool gp[SERVER_MAX_GPUS], *gpp[SERVER_MAX_GPUS];
    for (uint32_t i = 0; i < s->n_gpus && want_pool; i++) {
        struct srv_gpu *g = &s->gpus[i];
        gp[i] = (Cake__GpuPool)CAKE__GPU_POOL__INIT;
        gp[i].uuid = g->uuid, gp[i].bytes = g->bytes, gp[i].segment_bytes = g->pages.seg_bytes;
        if (g->gpu.legacy) /* no segments: the whole pool's handle travels in the reply */
            gp[i].ipc_handle = (ProtobufCBinaryData){sizeof g->gpu.ipc, g->gpu.ipc};
        gpp[i] = &gp[i];
    }
    if (want_pool && s->n_gpus)
        r.n_gpus = s->n_gpus, r.gpus = gpp;
    srv_reply(s, c, MSG_HELLO, &r.base);
}

/* A sequence opened into table slot `slot`: it is in the table, the client told. */
static void open_reply(struct server *s, struct client *c, int slot, struct seq *q)
{
    s->slots[slot].s = q;
    s->n_seqs++;
    Cake__SeqOpenReply r = CAKE__SEQ_OPEN_REPLY__INIT;
    r.seq_id = q->id, r.tokens_per_page = q->tpp;
    r.desc_bytes = q->desc_bytes;
    r.scratch_bytes = (uint64_t)q->win_n * s->pool.page_bytes - q->desc_bytes;
    r.n_window_pages = q->win_n, r.window_pages = q->win_pages;
    srv_reply(s, c, MSG_SEQ_OPEN, &r.base);
}

static void h_seq_open(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    const Cake__SeqOpen *m = (const Cake__SeqOpen *)msg;
    struct seq_open_args a = {
        .layers = m->layers, .q_heads = m->q_heads, .kv_heads = m->kv_heads,
        .head_dim = m->head_dim, .dtype = m->dtype, .prompt_len = m->prompt_len,
        .max_new = m->max_new_tokens, .gpu = m->placement == 1,
    };
    int bad_gpu = 0;
    if (a.gpu && m->gpu_uuid && m->gpu_uuid[0]) { /* which GPU pool ("" : the first) */
        bad_gpu = 1;
        for (uint32_t i = 0; i < s->n_gpus; i++)
            if (!strcmp(s->gpus[i].uuid, m->gpu_uuid))
                a.gpu_dev = i, bad_gpu = 0;
    }
    int bad_place = m->placement > 1;
    uint64_t gkey = m->shard_group;
    uint32_t shards = m->shards > 1 ? m->shards : 0, shard = m->shard;
    policy_cfg_default(&a.cfg, m->layers ? m->layers : 1, 1024);
    int bad_mode = 0;
    if (m->policy) {
        bad_mode = m->policy->mode > POLICY_FIXED;
        a.cfg.mode = (enum policy_mode)m->policy->mode;
        a.cfg.cache_size = m->policy->cache_size, a.cfg.window = m->policy->window;
        a.cfg.tau1 = m->policy->tau1, a.cfg.tau2 = m->policy->tau2, a.cfg.gamma = m->policy->gamma;
        a.cfg.cascading = m->policy->cascading, a.cfg.decode_slack = m->policy->decode_slack;
        /* out-of-range values are refused by policy_cfg_check with the reason */
        a.cfg.kind = (enum policy_kind)m->policy->kind;
        a.cfg.alloc = (enum policy_alloc)m->policy->alloc;
        a.cfg.indicator = (enum policy_ind)m->policy->indicator;
        a.cfg.pool = (enum policy_pool)m->policy->pool;
        a.cfg.pool_kernel = m->policy->pool_kernel;
        a.cfg.decode = (enum policy_decode)m->policy->decode;
        a.cfg.sinks = m->policy->sinks;
        a.cfg.pyramid_beta = m->policy->pyramid_beta, a.cfg.ada_alpha = m->policy->ada_alpha;
        a.cfg.run_width = m->policy->run_width;
    }
    if (bad_gpu) {
        srv_reply_error(s, c, CAKE_EINVAL, "caked has no GPU pool on that GPU");
        return;
    }
    if (bad_mode || bad_place) {
        srv_reply_error(s, c, CAKE_EINVAL, bad_mode ? "policy mode must be 0 (parity) or 1 (fixed)"
                                                    : "placement must be 0 (host) or 1 (GPU)");
        return;
    }
    struct shard_group *g = NULL;
    if (shards) {
        if (!gkey) {
            srv_reply_error(s, c, CAKE_EINVAL, "a sharded sequence needs a nonzero group key");
            return;
        }
        g = shard_find(s->groups, c->tenant, gkey);
        const char *bad = shard_join_check(g, &a, shards, shard);
        for (uint32_t i = 0; g && !bad && i < g->n; i++)
            if (g->member[i] && g->member[i]->owner == c->id)
                bad = "each shard of a group needs its own connection (a layer's barrier would "
                      "wait on the connection itself)";
        if (bad) {
            srv_reply_error(s, c, CAKE_EINVAL, "%s", bad);
            return;
        }
    }
    if (!shards) {
        const char *why = "out of memory";
        int rc = srv_seq_open(s, c, &a, &why);
        if (rc == CAKE_EOOM && pressure_wait_open(s, c, &a, why))
            return; /* waits for room (pressure.h) */
        if (rc == CAKE_EOOM)
            srv_oom(s, c, why);
        if (rc)
            srv_reply_error(s, c, rc < -4095 ? rc : CAKE_EINTERNAL, "%s", why);
        return;
    }
    uint64_t id;
    int slot = srv_seq_new(s, &id);
    if (slot < 0) {
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    struct seq *q;
    const char *why = "out of memory";
    int rc = seq_open(&s->env, &a, c->tenant, id, c->id, &q, &why);
    if (!rc && shards && !g) {
        if (!(g = calloc(1, sizeof(*g)))) {
            seq_free(&s->env, q);
            rc = CAKE_EINTERNAL, why = "out of memory";
        } else {
            g->key = gkey, g->tenant = c->tenant, g->n = shards;
            g->next = s->groups, s->groups = g;
        }
    }
    if (!rc && g) {
        g->member[shard] = q, g->joined++;
        q->group = g, q->shard = shard;
    }
    if (rc) {
        if (rc == CAKE_EOOM)
            srv_oom(s, c, why);
        srv_reply_error(s, c, rc < -4095 ? rc : CAKE_EINTERNAL, "%s", why);
        return;
    }
    open_reply(s, c, slot, q);
}

int srv_seq_open(struct server *s, struct client *c, const struct seq_open_args *a,
                 const char **why)
{
    uint64_t id;
    int slot = srv_seq_new(s, &id);
    if (slot < 0) {
        *why = "out of memory";
        return CAKE_EINTERNAL;
    }
    struct seq *q;
    int rc = seq_open(&s->env, a, c->tenant, id, c->id, &q, why);
    if (rc)
        return rc;
    open_reply(s, c, slot, q);
    return 0;
}

static void h_reserve(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    const Cake__LayerRef *m = (const Cake__LayerRef *)msg;
    uint64_t id = m->seq_id;
    uint32_t layer = m->layer;
    struct seq *q = srv_seq_of(s, c, id);
    if (!q) {
        srv_reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)id);
        return;
    }
    const char *why = "";
    int rc = seq_reserve(&s->env, q, layer, &why);
    if (rc == CAKE_EOOM && pressure_wait_reserve(s, c, q, layer, why))
        return; /* waits for room (pressure.h) */
    if (rc) {
        if (rc == CAKE_EOOM)
            srv_oom(s, c, why);
        srv_reply_error(s, c, rc, "%s", why);
        return;
    }
    srv_reply(s, c, MSG_PREFILL_RESERVE, NULL);
}

static void h_prefill(struct server *s, struct client *c, const ProtobufCMessage *msg, int observe)
{
    uint64_t id;
    uint32_t layer;
    double pref = 0;
    int lse = 0;
    if (observe) {
        const Cake__LayerRef *m = (const Cake__LayerRef *)msg;
        id = m->seq_id, layer = m->layer, lse = m->lse;
    } else {
        const Cake__PrefillSubmit *m = (const Cake__PrefillSubmit *)msg;
        id = m->seq_id, layer = m->layer, pref = m->preference;
    }
    struct seq *q = srv_seq_of(s, c, id);
    if (!q) {
        srv_reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)id);
        return;
    }
    const char *why = "";
    int rc = seq_prefill_check(q, layer, &why);
    if (!rc) /* the engine's log-sum-exps: copied out and checked before the job */
        rc = seq_take_lse(&s->env, q, layer, lse, &why);
    if (rc) {
        srv_reply_error(s, c, rc, "%s", why);
        return;
    }
    struct seq **one = malloc(sizeof(*one));
    if (!one) {
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    one[0] = q;
    if (!q->group) /* pages in segments drained for another tenant move in this job */
        seq_reloc_prepare(&s->env, q);
    work_start(s, c, observe ? MSG_PREFILL_OBSERVE : MSG_PREFILL_SUBMIT, one, 1, layer, observe, pref);
}

static void h_decode(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    const Cake__DecodeStep *m = (const Cake__DecodeStep *)msg;
    size_t n = m->n_seq_ids;
    if (n == 0 || n > SERVER_MAX_DECODE_BATCH) {
        srv_reply_error(s, c, n ? CAKE_ETOOBIG : CAKE_EINVAL, "decode step of %zu sequences", n);
        return;
    }
    if (m->n_decode_lse && m->n_decode_lse != n) {
        srv_reply_error(s, c, CAKE_EINVAL, "decode step of %zu sequences with %zu log-sum-exp "
                        "layer sets", n, m->n_decode_lse);
        return;
    }
    srv_decode(s, c, m->seq_ids, n, 1, m->n_decode_lse ? m->decode_lse : NULL);
}

void srv_decode(struct server *s, struct client *c, const uint64_t *ids, size_t n, int record,
                const ProtobufCBinaryData *lse)
{
    struct seq **seqs = malloc(sizeof(*seqs) * n);
    if (!seqs) {
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    int need_evict = 0;
    for (size_t i = 0; i < n; i++) {
        struct seq *q = srv_seq_of(s, c, ids[i]);
        const char *why = "";
        int rc = q ? seq_decode_check(q, &why) : CAKE_ENOSEQ;
        if (!rc && q->orphaned)
            rc = CAKE_ENOSEQ;
        if (!rc) {
            q->busy = 1; /* marks duplicates in this batch */
            seqs[i] = q;
            need_evict |= seq_decode_needs_evict(q);
        }
        if (rc) {
            for (size_t k = 0; k < i; k++)
                seqs[k]->busy = 0;
            uint64_t id = ids[i];
            free(seqs);
            if (rc == CAKE_ESTATE && q && q->busy && !why[0])
                why = "sequence listed twice";
            srv_reply_error(s, c, rc, "sequence %#llx: %s", (unsigned long long)id,
                        rc == CAKE_ENOSEQ ? "no such sequence" : why);
            return;
        }
    }
    for (size_t i = 0; i < n; i++) {
        struct seq *q = seqs[i];
        q->busy = 0;
        if (!record) /* a retry keeps what its first try recorded */
            continue;
        /* which layers' log-sum-exps the engine wrote for this step; any other step's are
         * not these (dlse_at) */
        memset(q->dlse, 0, sizeof q->dlse);
        if (lse)
            memcpy(q->dlse, lse[i].data, lse[i].len < sizeof q->dlse ? lse[i].len : sizeof q->dlse);
        q->dlse_at = q->decoded;
    }
    /* parked sequences come back to the GPU first, inside this step's job */
    for (size_t i = 0; i < n; i++) {
        if (!seqs[i]->parked)
            continue;
        const char *why = "";
        int rc = seq_move_prepare(&s->env, seqs[i], 0, &why);
        if (rc) {
            struct seq_result undo = {.rc = -ECANCELED};
            for (size_t k = 0; k < i; k++)
                if (seqs[k]->moving)
                    seq_move_commit(&s->env, seqs[k], &undo);
            if (rc == CAKE_EOOM && pressure_wait_restore(s, c, seqs, (uint32_t)n, why)) {
                free(seqs);
                return; /* waits for GPU room (pressure.h) */
            }
            if (rc == CAKE_EOOM)
                srv_oom(s, c, why);
            srv_reply_error(s, c, rc < -4095 ? rc : CAKE_EINTERNAL, "sequence %#llx: %s",
                            (unsigned long long)seqs[i]->id, why);
            free(seqs);
            return;
        }
        need_evict = 1;
    }
    /* pages in segments drained for another tenant (pressure.h) move inside this step's job */
    for (size_t i = 0; i < n; i++)
        if (!seqs[i]->moving && seq_reloc_prepare(&s->env, seqs[i]))
            need_evict = 1;
    if (need_evict) {
        work_start(s, c, MSG_DECODE_STEP, seqs, (uint32_t)n, 0, 0, 0);
        return;
    }
    work_decode_reply(s, c, seqs, (uint32_t)n, 0);
    free(seqs);
}

static void h_park(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    const Cake__Park *m = (const Cake__Park *)msg;
    struct seq *q = srv_seq_of(s, c, m->seq_id);
    if (!q || q->orphaned) {
        srv_reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)m->seq_id);
        return;
    }
    if (q->gpu && !q->busy && !q->moving && q->parked == !m->restore) {
        srv_reply(s, c, MSG_PARK, NULL); /* already where it was asked to be */
        return;
    }
    const char *why = "";
    int rc = seq_move_prepare(&s->env, q, !m->restore, &why);
    struct seq **one = rc ? NULL : malloc(sizeof(*one));
    if (!rc && !one) {
        struct seq_result undo = {.rc = -ENOMEM};
        seq_move_commit(&s->env, q, &undo);
        rc = CAKE_EINTERNAL, why = "out of memory";
    }
    if (rc) {
        if (rc == CAKE_EOOM)
            srv_oom(s, c, why);
        srv_reply_error(s, c, rc < -4095 ? rc : CAKE_EINTERNAL, "%s", why);
        return;
    }
    one[0] = q;
    work_start(s, c, MSG_PARK, one, 1, 0, 0, 0);
}

static void h_seq_close(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    const Cake__SeqRef *m = (const Cake__SeqRef *)msg;
    uint64_t id = m->seq_id;
    struct seq *q = srv_seq_of(s, c, id);
    if (!q || q->orphaned) {
        srv_reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)id);
        return;
    }
    if (q->busy) {
        srv_reply_error(s, c, CAKE_ESTATE, "sequence busy");
        return;
    }
    struct shard_group *g = q->group;
    int done = 1; /* the group's prefill is over: a rank may leave before the others */
    for (uint32_t i = 0; g && i < g->n; i++) {
        const struct seq *mb = g->member[i];
        if (mb && mb != q && mb->next_observe < mb->L)
            done = 0;
    }
    if (g && done) {
        g->member[q->shard] = NULL;
        q->group = NULL;
        int left = 0;
        for (uint32_t i = 0; i < g->n; i++)
            left |= g->member[i] != NULL;
        if (!left)
            srv_group_end(s, g, "every shard closed");
    }
    srv_seq_remove(s, q); /* mid-prefill, closing a shard ends its group */
    srv_reply(s, c, MSG_SEQ_CLOSE, NULL);
}

static void h_status(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    Cake__Status r = CAKE__STATUS__INIT;
    r.daemon_version = (char *)CAKE_VERSION;
    r.protocol_version = CAKE_PROTOCOL_VERSION;
    r.io_backend = (char *)s->io_name;
    r.uptime_ms = (uint64_t)((clock_now_s() - s->t_start) * 1e3);
    r.pool_bytes = s->pool.bytes, r.page_bytes = s->pool.page_bytes;
    r.pages_total = s->pool.pages, r.pages_used = s->pool.used;
    for (uint32_t i = 0; i < s->tenants.n; i++) /* the ones TENANTS lists */
        r.tenants += tenant_listed(&s->tenants.t[i]);
    r.sequences = s->n_seqs, r.clients = s->n_clients;
    r.pid = (uint32_t)getpid();
    r.socket = s->cfg.socket_path;
    Cake__GpuPool gp[SERVER_MAX_GPUS], *gpp[SERVER_MAX_GPUS];
    for (uint32_t i = 0; i < s->n_gpus; i++) {
        gp[i] = (Cake__GpuPool)CAKE__GPU_POOL__INIT;
        gp[i].uuid = s->gpus[i].uuid, gp[i].bytes = s->gpus[i].bytes;
        gp[i].pages_used = s->gpus[i].pages.used;
        r.gpu_pool_bytes += gp[i].bytes, r.gpu_pages_used += gp[i].pages_used;
        gpp[i] = &gp[i];
    }
    r.n_gpus = s->n_gpus, r.gpus = gpp;
    struct workers_load wl;
    workers_load(s->workers, clock_now_s(), &wl);
    r.workers = (uint32_t)workers_count(s->workers);
    r.jobs_queued = wl.queued, r.jobs_running = wl.running;
    r.longest_running_us = (uint64_t)(wl.oldest_running_s * 1e6);
    r.oldest_queued_us = (uint64_t)(wl.oldest_queued_s * 1e6);
    srv_reply(s, c, MSG_STATUS, &r.base);
}

static void fill_tenant(struct server *s, Cake__Tenant *t, const struct tenant *x)
{
    cake__tenant__init(t);
    t->name = (char *)x->name, t->uid = x->uid, t->weight = x->weight;
    t->min_bytes = x->min_bytes;
    t->max_bytes = tenant_cap(&s->tenants, x, s->pool.bytes);
    t->used_bytes = x->used_bytes, t->gpu_used_bytes = x->gpu_used_bytes;
    t->gpu_min_bytes = x->gpu_min_bytes;
    t->gpu_cap_bytes = srv_gpu_bytes(s) ? tenant_cap_gpu(&s->tenants, x, srv_gpu_bytes(s)) : 0;
    t->sequences = x->sequences, t->clients = x->clients;
    t->oom_errors = x->oom_errors;
    int mode = x->pressure ? x->pressure : s->cfg.pressure;
    t->pressure = (char *)pressure_mode_name(mode);
    t->min_tokens = x->min_tokens ? x->min_tokens : s->cfg.min_tokens;
    t->reslices = x->reslices, t->reslice_tokens = x->rs_tokens;
    t->waits_granted = x->waits_granted, t->waits_refused = x->waits_refused;
}

static void h_tenants(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    Cake__TenantList r = CAKE__TENANT_LIST__INIT;
    Cake__Tenant *ts = calloc(s->tenants.n + 1, sizeof(*ts));
    Cake__Tenant **tp = calloc(s->tenants.n + 1, sizeof(*tp));
    if (!ts || !tp) {
        free(ts), free(tp);
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    for (uint32_t i = 0; i < s->tenants.n; i++) {
        const struct tenant *x = &s->tenants.t[i];
        if ((!c->admin && x != c->tenant) || !tenant_listed(x))
            continue; /* other tenants, and idle ones nobody configured */
        fill_tenant(s, &ts[r.n_tenants], x);
        tp[r.n_tenants] = &ts[r.n_tenants];
        r.n_tenants++;
    }
    r.tenants = tp;
    srv_reply(s, c, MSG_TENANTS, &r.base);
    free(ts), free(tp);
}

static void fill_seq(struct server *s, Cake__SeqInfo *r, const struct seq *q)
{
    cake__seq_info__init(r);
    r->seq_id = q->id, r->tenant = (char *)q->tenant->name, r->layers = q->L;
    r->kv_heads = q->Hkv, r->head_dim = q->d, r->dtype = q->dt, r->prompt_len = q->n;
    r->prefilled_layers = q->next_observe, r->decoded_tokens = q->decoded;
    r->placement = q->gpu ? (q->parked ? 2 : 1) : 0, r->gpu_bytes = seq_gpu_bytes(&s->env, q);
    if (q->gpu)
        r->gpu_uuid = s->gpus[q->gpu_dev].uuid;
    r->bytes = seq_bytes(&s->env, q), r->mode = q->cfg.mode, r->cache_size = q->cfg.cache_size;
    r->policy = (char *)policy_kind_name(q->cfg.kind);
    r->effective_cache = q->cfg.cache_size, r->reslices = q->reslices;
    if (q->next_observe == q->L && q->cfg.alloc != POLICY_ALLOC_NONE) {
        uint64_t b = 0; /* what the published budgets hold (pub: safe while a job runs) */
        for (uint32_t l = 0; l < q->L; l++)
            b += q->pub[l].budget;
        r->effective_cache = (uint32_t)(b / q->L) + q->cfg.window;
    }
    if (q->group)
        r->shard_group = q->group->key, r->shards = q->group->n, r->shard = q->shard;
}

/* One page of the sequences the client may see, from slot `after` on; a page stays well
 * inside a frame (40,000 sequences overflowed one reply). */
#define SEQ_PAGE 2048
static void h_sequences(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    uint64_t after = ((const Cake__ListPage *)msg)->after; /* empty body: 0 */
    Cake__SeqList r = CAKE__SEQ_LIST__INIT;
    Cake__SeqInfo *v = calloc(SEQ_PAGE, sizeof(*v));
    Cake__SeqInfo **p = calloc(SEQ_PAGE, sizeof(*p));
    if (!v || !p) {
        free(v), free(p);
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    for (uint64_t i = after; i < s->n_slots; i++) {
        const struct seq *q = s->slots[i].s;
        if (!q || q->orphaned || (!c->admin && q->tenant != c->tenant))
            continue;
        if (r.n_seqs == SEQ_PAGE) {
            r.more = 1, r.next = i;
            break;
        }
        fill_seq(s, &v[r.n_seqs], q);
        p[r.n_seqs] = &v[r.n_seqs];
        r.n_seqs++;
    }
    r.seqs = p;
    srv_reply(s, c, MSG_SEQUENCES, &r.base);
    free(v), free(p);
}

static void h_seq_info(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    const Cake__SeqRef *m = (const Cake__SeqRef *)msg;
    uint64_t id = m->seq_id;
    struct seq *q = srv_seq_find(s, id);
    if (!q || q->orphaned || (!c->admin && q->tenant != c->tenant)) {
        srv_reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)id);
        return;
    }
    Cake__SeqInfo r;
    fill_seq(s, &r, q);
    char comp[POLICY_DESCRIBE_MAX];
    r.components = policy_describe(&q->cfg, comp, sizeof comp);
    Cake__LayerInfo *li = calloc(q->L, sizeof(*li));
    Cake__LayerInfo **lp = calloc(q->L, sizeof(*lp));
    if (!li || !lp) {
        free(li), free(lp);
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    for (uint32_t l = 0; l < q->L; l++) { /* what was published: a job may be running */
        cake__layer_info__init(&li[l]);
        li[l].budget = q->pub[l].budget, li[l].prefix = q->pub[l].prefix;
        li[l].tokens = q->pub[l].tokens, li[l].pages = q->pub[l].pages;
        li[l].preference = q->pub[l].preference;
        lp[l] = &li[l];
    }
    r.n_layer = q->L, r.layer = lp;
    srv_reply(s, c, MSG_SEQ_INFO, &r.base);
    free(li), free(lp);
}

/* Original positions of a layer's slots, at most POSITIONS_PAGE per reply (a frame holds
 * them: each at most 5 bytes). */
#define POSITIONS_PAGE 65536u

static void h_positions(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    const Cake__PositionsRequest *m = (const Cake__PositionsRequest *)msg;
    struct seq *q = srv_seq_of(s, c, m->seq_id);
    if (!q) {
        srv_reply_error(s, c, CAKE_ENOSEQ, "no sequence %#llx", (unsigned long long)m->seq_id);
        return;
    }
    if (q->busy) {
        srv_reply_error(s, c, CAKE_ESTATE, "sequence busy");
        return;
    }
    if (m->layer >= q->L || m->kv_head >= q->Hkv || m->from > q->layer[m->layer].tokens) {
        srv_reply_error(s, c, CAKE_EINVAL, "layer %u, kv head %u, slot %u: the sequence has %u "
                        "layers of %u kv heads%s", m->layer, m->kv_head, m->from, q->L, q->Hkv,
                        m->layer < q->L ? " and fewer slots" : "");
        return;
    }
    uint32_t tokens = q->layer[m->layer].tokens, n = tokens - m->from;
    n = n < POSITIONS_PAGE ? n : POSITIONS_PAGE;
    n = n < m->max ? n : m->max;
    uint32_t *pos = malloc(sizeof(uint32_t) * ((size_t)n + 1));
    if (!pos) {
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    int got = seq_positions(&s->env, q, m->layer, m->kv_head, m->from, n, pos);
    if (got < 0) {
        free(pos);
        if (got == -EAGAIN)
            srv_reply_error(s, c, CAKE_ESTATE, "the layer's positions are on the GPU until the "
                            "prompt is prefilled, and every GPU context is busy: ask again");
        else
            srv_reply_error(s, c, CAKE_EINTERNAL, "positions from the GPU: %s", strerror(-got));
        return;
    }
    Cake__Positions r = CAKE__POSITIONS__INIT;
    r.tokens = tokens;
    r.n_position = (size_t)got;
    r.position = pos;
    srv_reply(s, c, MSG_POSITIONS, &r.base);
    free(pos);
}

/* The metrics text from the requested offset, at most METRICS_PAGE bytes of it per reply. */
#define METRICS_PAGE (512u << 10)

static void h_metrics(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    uint64_t off = ((const Cake__ListPage *)msg)->offset; /* empty body: 0 */
    struct strbuf b = {0};
    if (metrics_render(s, c, &b)) {
        free(b.s);
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory for the metrics");
        return;
    }
    if (off > b.len) {
        free(b.s);
        srv_reply_error(s, c, CAKE_EINVAL, "offset %llu beyond the metrics' %zu bytes",
                        (unsigned long long)off, b.len);
        return;
    }
    size_t n = b.len - off < METRICS_PAGE ? b.len - off : METRICS_PAGE;
    char *text = malloc(n + 1);
    if (!text) {
        free(b.s);
        srv_reply_error(s, c, CAKE_EINTERNAL, "out of memory");
        return;
    }
    memcpy(text, b.s + off, n), text[n] = 0;
    Cake__Metrics r = CAKE__METRICS__INIT;
    r.text = text, r.total = b.len;
    srv_reply(s, c, MSG_METRICS, &r.base);
    free(text), free(b.s);
}

/* Sets the fields given (has_*) of one existing tenant; the sum of every tenant's minimum
 * stays within the pool. */
static void h_set_quota(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    const Cake__SetQuota *m = (const Cake__SetQuota *)msg; /* freed by the dispatcher */
    const char *name = m->tenant ? m->tenant : "";
    int has_w = m->has_weight || m->weight, has_min = m->has_min || m->min_bytes;
    int has_max = m->has_max || m->max_bytes, has_mt = m->has_min_tokens || m->min_tokens;
    const char *pm = m->pressure ? m->pressure : "";
    int mode = !*pm ? -2 : !strcmp(pm, "default") ? 0 : pressure_mode_parse(pm);
    if (mode == -1) {
        srv_reply_error(s, c, CAKE_EINVAL, "pressure must be reslice, park, refuse or default");
        return;
    }
    if (has_mt && m->min_tokens > (1u << 24)) {
        srv_reply_error(s, c, CAKE_EINVAL, "min-tokens must be at most 16777216");
        return;
    }
    if (!tenant_name_ok(name)) {
        srv_reply_error(s, c, CAKE_EINVAL, "bad tenant name");
        return;
    }
    if (has_w && (m->weight < 1 || m->weight > TENANT_MAX_WEIGHT)) {
        srv_reply_error(s, c, CAKE_EINVAL, "weight must be 1..1000000");
        return;
    }
    struct tenant *t = NULL;
    uint32_t found = 0;
    for (uint32_t i = 0; i < s->tenants.n; i++) {
        struct tenant *x = &s->tenants.t[i];
        if (!strcmp(x->name, name) && (!m->has_uid || tenant_has_uid(x, m->uid)))
            t = x, found++;
    }
    if (!found) {
        srv_reply_error(s, c, CAKE_ENOSEQ, "no tenant %s%s (tenants are configured in caked.conf "
                        "or made by an engine's attach)", name, m->has_uid ? " with that uid" : "");
        return;
    }
    if (found > 1) {
        srv_reply_error(s, c, CAKE_EINVAL, "%u tenants are named %s (one per uid): name the uid",
                        found, name);
        return;
    }
    uint64_t nmin = has_min ? m->min_bytes : t->min_bytes, nmax = has_max ? m->max_bytes : t->max_bytes;
    if (nmax && nmin > nmax) {
        srv_reply_error(s, c, CAKE_EINVAL, "minimum %llu above maximum %llu",
                        (unsigned long long)nmin, (unsigned long long)nmax);
        return;
    }
    int has_gmin = m->has_gpu_min || m->gpu_min_bytes, has_gmax = m->has_gpu_max || m->gpu_max_bytes;
    uint64_t gmin = has_gmin ? m->gpu_min_bytes : t->gpu_min_bytes;
    uint64_t gmax = has_gmax ? m->gpu_max_bytes : t->gpu_max_bytes;
    if (gmax && gmin > gmax) {
        srv_reply_error(s, c, CAKE_EINVAL, "GPU minimum %llu above GPU maximum %llu",
                        (unsigned long long)gmin, (unsigned long long)gmax);
        return;
    }
    uint64_t other_min = 0, other_gmin = 0, gpu_bytes = srv_gpu_bytes(s);
    for (uint32_t i = 0; i < s->tenants.n; i++)
        if (&s->tenants.t[i] != t)
            other_min += s->tenants.t[i].min_bytes, other_gmin += s->tenants.t[i].gpu_min_bytes;
    if (nmin > s->pool.bytes || other_min + nmin > s->pool.bytes) {
        srv_reply_error(s, c, CAKE_EINVAL, "the tenants' minimums would sum to %llu bytes, over "
                        "the pool's %llu", (unsigned long long)(other_min + nmin),
                        (unsigned long long)s->pool.bytes);
        return;
    }
    if (gmin > gpu_bytes || other_gmin + gmin > gpu_bytes) {
        srv_reply_error(s, c, CAKE_EINVAL, "the tenants' GPU minimums would sum to %llu bytes, "
                        "over the GPU pools' %llu", (unsigned long long)(other_gmin + gmin),
                        (unsigned long long)gpu_bytes);
        return;
    }
    if (has_w)
        t->weight = m->weight;
    t->min_bytes = nmin, t->max_bytes = nmax;
    t->gpu_min_bytes = gmin, t->gpu_max_bytes = gmax;
    if (mode != -2)
        t->pressure = mode;
    if (has_mt)
        t->min_tokens = m->min_tokens;
    t->configured = 1; /* kept while caked runs, even when idle */
    srv_log("quota for tenant %s (uid %u) set by uid %u: weight %u min %llu max %llu gpu-min "
            "%llu gpu-max %llu pressure %s min-tokens %u", t->name, t->uid, c->cred.uid, t->weight,
            (unsigned long long)t->min_bytes, (unsigned long long)t->max_bytes,
            (unsigned long long)t->gpu_min_bytes, (unsigned long long)t->gpu_max_bytes,
            pressure_mode_name(t->pressure ? t->pressure : s->cfg.pressure),
            t->min_tokens ? t->min_tokens : s->cfg.min_tokens);
    srv_reply(s, c, MSG_SET_QUOTA, NULL);
}

static void h_ping(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    (void)msg;
    srv_reply(s, c, MSG_PING, NULL);
}

static void h_observe(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    h_prefill(s, c, msg, 1);
}

static void h_submit(struct server *s, struct client *c, const ProtobufCMessage *msg)
{
    h_prefill(s, c, msg, 0);
}

/* Who may send a request, and in what state. */
enum {
    H_ANON = 1,  /* allowed before HELLO */
    H_ADMIN = 2, /* administrators only (asked for at HELLO and granted by right) */
};

/* Every request: its body's message (NULL: the body is ignored), its handler, its rights.
 * The dispatcher unpacks the body once, with the bounded allocator, and frees it after the
 * handler returns: a handler copies what it keeps. */
static const struct {
    const ProtobufCMessageDescriptor *body;
    void (*fn)(struct server *s, struct client *c, const ProtobufCMessage *m);
    unsigned flags;
} handlers[MSG_TYPE_MAX + 1] = {
    [MSG_HELLO] = {&cake__hello__descriptor, h_hello, H_ANON},
    [MSG_SEQ_OPEN] = {&cake__seq_open__descriptor, h_seq_open, 0},
    [MSG_PREFILL_RESERVE] = {&cake__layer_ref__descriptor, h_reserve, 0},
    [MSG_PREFILL_OBSERVE] = {&cake__layer_ref__descriptor, h_observe, 0},
    [MSG_PREFILL_SUBMIT] = {&cake__prefill_submit__descriptor, h_submit, 0},
    [MSG_DECODE_STEP] = {&cake__decode_step__descriptor, h_decode, 0},
    [MSG_SEQ_CLOSE] = {&cake__seq_ref__descriptor, h_seq_close, 0},
    [MSG_STATUS] = {NULL, h_status, 0},
    [MSG_TENANTS] = {NULL, h_tenants, 0},
    [MSG_SEQUENCES] = {&cake__list_page__descriptor, h_sequences, 0},
    [MSG_SEQ_INFO] = {&cake__seq_ref__descriptor, h_seq_info, 0},
    [MSG_METRICS] = {&cake__list_page__descriptor, h_metrics, 0},
    [MSG_SET_QUOTA] = {&cake__set_quota__descriptor, h_set_quota, H_ADMIN},
    [MSG_PING] = {NULL, h_ping, H_ANON},
    [MSG_POSITIONS] = {&cake__positions_request__descriptor, h_positions, 0},
    [MSG_PARK] = {&cake__park__descriptor, h_park, 0},
    /* MSG_MAP: caked -> engine only, no handler */
};

void srv_dispatch(struct server *s, struct client *c)
{
    unsigned t = c->h.type;
    c->t0 = clock_now_s();
    if (t & FRAME_REPLY || t == MSG_ERROR) {
        srv_reply_error(s, c, CAKE_EPROTO, "clients send requests, not replies (type %#x)", t);
        return;
    }
    if (t > MSG_TYPE_MAX || !handlers[t].fn) { /* the stream stays in step: answer, go on */
        srv_reply_error(s, c, CAKE_EPROTO, t == MSG_MAP ? "MAP frames come from caked only"
                                                        : "unknown message type %u", t);
        return;
    }
    s->m.requests[t]++;
    /* the client called again: pages ended by others' actions may go (srv_quarantine) */
    srv_release_quarantine(s, c->id);
    unsigned flags = handlers[t].flags;
    if (!(flags & H_ANON) && !c->tenant) {
        srv_reply_error(s, c, CAKE_ESTATE, "send HELLO first");
        return;
    }
    if ((flags & H_ADMIN) && !c->admin) {
        srv_reply_error(s, c, CAKE_EPERM, "%s is reserved to administrators: root, caked's uid "
                        "%u%s, asking for it at attach (as cachectl does)", frame_type_name(t),
                        (unsigned)s->owner_uid,
                        s->admin_gid != (gid_t)-1 ? ", the members of --admin-group" : "");
        return;
    }
    ProtobufCMessage *m = NULL;
    struct frame_alloc fa;
    ProtobufCAllocator al;
    if (handlers[t].body) {
        frame_alloc_init(&fa, UNPACK_LIMIT(c->h.body_len), &al);
        m = protobuf_c_message_unpack(handlers[t].body, &al, c->h.body_len, c->body);
        if (!m) {
            srv_reply_error(s, c, CAKE_EPROTO, "malformed %s body", frame_type_name(t));
            return;
        }
    }
    handlers[t].fn(s, c, m);
    if (m)
        protobuf_c_message_free_unpacked(m, &al);
}

