/* metrics.c - counters, text helpers and the Prometheus text of the server's state (see
 * metrics.h). */
#define _GNU_SOURCE /* struct ucred (server_int.h) */
#include <errno.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cake/cake.h"
#include "metrics.h"
#include "server_int.h"

const double metrics_lat_bounds_s[METRICS_LAT_BUCKETS] = {
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 50e-3, 250e-3, 1.0, 5.0,
};

enum metrics_err metrics_err_kind(int code)
{
    switch (code) {
    case CAKE_EPROTO: return ERR_PROTO;
    case CAKE_EVERSION: return ERR_VERSION;
    case CAKE_EOOM: return ERR_OOM;
    case CAKE_ENOSEQ: return ERR_NOSEQ;
    case CAKE_EINVAL: return ERR_INVAL;
    case CAKE_EPERM: return ERR_PERM;
    case CAKE_ETOOBIG: return ERR_TOOBIG;
    case CAKE_ESTATE: return ERR_STATE;
    default: return ERR_INTERNAL;
    }
}

const char *metrics_err_name(enum metrics_err e)
{
    static const char *const n[ERR_KINDS] = {
        "protocol", "version", "out_of_memory", "no_sequence", "invalid", "permission",
        "too_big", "state", "internal",
    };
    return n[e];
}

static void lat_observe(struct metrics_lat *h, double s)
{
    for (int i = 0; i < METRICS_LAT_BUCKETS; i++)
        if (s <= metrics_lat_bounds_s[i]) {
            h->bucket[i]++;
            break;
        }
    h->sum_s += s;
    h->count++;
}

void metrics_observe_latency(struct metrics *m, unsigned type, double s)
{
    lat_observe(&m->lat[type <= MSG_TYPE_MAX ? type : 0], s);
}

void metrics_observe_work(struct metrics *m, enum metrics_work kind, const struct job *j,
                          double now)
{
    if (!j->t_end)
        return;
    lat_observe(&m->work[kind][STAGE_QUEUED], j->t_start - j->t_submit);
    lat_observe(&m->work[kind][STAGE_RUN], j->t_end - j->t_start);
    lat_observe(&m->work[kind][STAGE_RETURN], now - j->t_end);
}

int strbuf_printf(struct strbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            return -EINVAL;
        if ((size_t)n < room && b->s) {
            b->len += (size_t)n;
            return 0;
        }
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap - b->len <= (size_t)n)
            cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s)
            return -ENOMEM;
        b->s = s, b->cap = cap;
    }
}

/* One histogram's series (cumulative buckets, +Inf, sum, count) with its labels. */
static int histogram(struct strbuf *b, const char *name, const char *labels,
                     const struct metrics_lat *h)
{
    int rc = 0;
    uint64_t cum = 0;
    for (int i = 0; i < METRICS_LAT_BUCKETS; i++) {
        cum += h->bucket[i];
        rc |= strbuf_printf(b, "%s_bucket{%s,le=\"%g\"} %llu\n", name, labels,
                            metrics_lat_bounds_s[i], (unsigned long long)cum);
    }
    rc |= strbuf_printf(b, "%s_bucket{%s,le=\"+Inf\"} %llu\n%s_sum{%s} %.9f\n%s_count{%s} %llu\n",
                        name, labels, (unsigned long long)h->count, name, labels, h->sum_s,
                        name, labels, (unsigned long long)h->count);
    return rc;
}

/* One per-tenant series of a uint64_t field of struct tenant (at `field`): c's own tenant's
 * only unless c administers. */
static int tenant_series(const struct server *s, const struct client *c, struct strbuf *b,
                         const char *name, const char *type, const char *help, size_t field)
{
    int rc = strbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
    for (uint32_t i = 0; i < s->tenants.n; i++) {
        const struct tenant *t = &s->tenants.t[i];
        if (t->in_use && (!c || c->admin || t == c->tenant))
            rc |= strbuf_printf(b, "%s{tenant=\"%s\",uid=\"%u\"} %llu\n", name, t->name, t->uid,
                                (unsigned long long)*(const uint64_t *)((const char *)t + field));
    }
    return rc;
}

int metrics_render(struct server *s, const struct client *c, struct strbuf *b)
{
    int rc = 0;
#define P(...) rc |= strbuf_printf(b, __VA_ARGS__)
    P("# HELP caked_pool_bytes Size of the host pool.\n# TYPE caked_pool_bytes gauge\n"
      "caked_pool_bytes %llu\n", (unsigned long long)s->pool.bytes);
    P("# HELP caked_pool_page_bytes Size of one pool page.\n# TYPE caked_pool_page_bytes gauge\n"
      "caked_pool_page_bytes %llu\n", (unsigned long long)s->pool.page_bytes);
    P("# HELP caked_pool_pages Pool pages by state.\n# TYPE caked_pool_pages gauge\n"
      "caked_pool_pages{state=\"used\"} %u\ncaked_pool_pages{state=\"free\"} %u\n", s->pool.used,
      pool_free_pages(&s->pool));
    P("# HELP caked_pool_draining_segments Host pool segments draining for another tenant.\n"
      "# TYPE caked_pool_draining_segments gauge\ncaked_pool_draining_segments %u\n"
      "# HELP caked_pool_promised_pages Host pool pages of emptied segments promised to a "
      "waiting tenant.\n# TYPE caked_pool_promised_pages gauge\ncaked_pool_promised_pages %llu\n",
      s->pool.draining, (unsigned long long)s->pool.promised);
    uint64_t gbytes = 0;
    for (uint32_t i = 0; i < s->n_gpus; i++)
        gbytes += s->gpus[i].bytes;
    P("# HELP caked_gpu_pool_bytes Size of the GPU pools (0: none).\n# TYPE caked_gpu_pool_bytes gauge\n"
      "caked_gpu_pool_bytes %llu\n", (unsigned long long)gbytes);
    P("# HELP caked_gpu_pool_pages GPU pool pages by GPU and state.\n# TYPE caked_gpu_pool_pages gauge\n");
    for (uint32_t i = 0; i < s->n_gpus; i++)
        P("caked_gpu_pool_pages{gpu=\"%s\",state=\"used\"} %u\n"
          "caked_gpu_pool_pages{gpu=\"%s\",state=\"free\"} %u\n", s->gpus[i].uuid,
          s->gpus[i].pages.used, s->gpus[i].uuid, pool_free_pages(&s->gpus[i].pages));
    P("# HELP caked_tenants Known tenants.\n# TYPE caked_tenants gauge\ncaked_tenants %u\n",
      s->tenants.live);
    P("# HELP caked_sequences Open sequences.\n# TYPE caked_sequences gauge\ncaked_sequences %u\n",
      s->n_seqs);
    P("# HELP caked_clients Connected clients.\n# TYPE caked_clients gauge\ncaked_clients %u\n",
      s->n_clients);
    rc |= tenant_series(s, c, b, "caked_tenant_used_bytes", "gauge",
                        "Pool bytes held by each tenant.", offsetof(struct tenant, used_bytes));
    P("# HELP caked_heap_bytes caked's own memory for sequences, charged at open (--heap-limit).\n"
      "# TYPE caked_heap_bytes gauge\n"
      "caked_heap_bytes{state=\"used\"} %llu\ncaked_heap_bytes{state=\"limit\"} %llu\n",
      (unsigned long long)s->heap_used, (unsigned long long)s->env.heap_limit);
    rc |= tenant_series(s, c, b, "caked_tenant_heap_bytes", "gauge",
                        "caked's own memory for each tenant's sequences.",
                        offsetof(struct tenant, heap_bytes));
    rc |= tenant_series(s, c, b, "caked_tenant_gpu_used_bytes", "gauge",
                        "GPU pool bytes held by each tenant.",
                        offsetof(struct tenant, gpu_used_bytes));
    rc |= tenant_series(s, c, b, "caked_tenant_oom_total", "counter",
                        "Requests refused for lack of memory, per tenant.",
                        offsetof(struct tenant, oom_errors));
    P("# HELP caked_requests_total Requests by type.\n# TYPE caked_requests_total counter\n");
    for (unsigned t = 1; t <= MSG_TYPE_MAX; t++)
        P("caked_requests_total{type=\"%s\"} %llu\n", frame_type_name(t),
          (unsigned long long)s->m.requests[t]);
    P("# HELP caked_errors_total Error replies by kind.\n# TYPE caked_errors_total counter\n");
    for (int e = 0; e < ERR_KINDS; e++)
        P("caked_errors_total{kind=\"%s\"} %llu\n", metrics_err_name((enum metrics_err)e),
          (unsigned long long)s->m.errors[e]);
    P("# HELP caked_evictions_total Layer compactions.\n# TYPE caked_evictions_total counter\n"
      "caked_evictions_total{phase=\"prefill\"} %llu\ncaked_evictions_total{phase=\"decode\"} %llu\n"
      "caked_evictions_total{phase=\"reslice\"} %llu\n",
      (unsigned long long)s->m.evictions_prefill, (unsigned long long)s->m.evictions_decode,
      (unsigned long long)s->m.evictions_reslice);
    P("# HELP caked_decode_evictions_total Sequences' decode-step evictions by where they ran: "
      "launched by caked's loop itself (GPU sequences, no worker hand-off) or on a worker.\n"
      "# TYPE caked_decode_evictions_total counter\n"
      "caked_decode_evictions_total{by=\"loop\"} %llu\ncaked_decode_evictions_total{by=\"worker\"} %llu\n",
      (unsigned long long)s->m.decode_by_loop, (unsigned long long)s->m.decode_by_worker);
    P("# HELP caked_prefill_observes_total GPU sequences' prefill observes by where they ran: "
      "launched by caked's loop itself (no worker hand-off) or on a worker.\n"
      "# TYPE caked_prefill_observes_total counter\n"
      "caked_prefill_observes_total{by=\"loop\"} %llu\ncaked_prefill_observes_total{by=\"worker\"} %llu\n",
      (unsigned long long)s->m.observe_by_loop, (unsigned long long)s->m.observe_by_worker);
    P("# HELP caked_decode_lse_layers_total Layers whose decode-step eviction was given "
      "the engine's log-sum-exps for the newest token (cake_put_decode_lse) beside the older "
      "rows' carried ones: no pass over the keys.\n# TYPE caked_decode_lse_layers_total counter\ncaked_decode_lse_layers_total %llu\n",
      (unsigned long long)s->m.decode_lse_layers);
    P("# HELP caked_reslices_total Sequences whose budgets were lowered to make room.\n"
      "# TYPE caked_reslices_total counter\ncaked_reslices_total %llu\n"
      "# HELP caked_reslice_tokens_total Layer tokens given up by re-slices (sum over layers).\n"
      "# TYPE caked_reslice_tokens_total counter\ncaked_reslice_tokens_total %llu\n",
      (unsigned long long)s->m.reslices, (unsigned long long)s->m.reslice_tokens);
    P("# HELP caked_pressure_waits_total Requests that did not fit and waited for room, by "
      "outcome (granted: a refusal avoided).\n# TYPE caked_pressure_waits_total counter\n"
      "caked_pressure_waits_total{outcome=\"granted\"} %llu\n"
      "caked_pressure_waits_total{outcome=\"refused\"} %llu\n"
      "# HELP caked_pressure_waiting Requests waiting for room now.\n"
      "# TYPE caked_pressure_waiting gauge\ncaked_pressure_waiting %u\n",
      (unsigned long long)s->m.waits_granted, (unsigned long long)s->m.waits_refused,
      s->n_waiting);
    P("# HELP caked_pages_drained_total Pool pages of segments drained from one tenant for "
      "another under pressure.\n# TYPE caked_pages_drained_total counter\n"
      "caked_pages_drained_total %llu\n"
      "# HELP caked_pages_relocated_total K/V pages moved out of draining segments.\n"
      "# TYPE caked_pages_relocated_total counter\ncaked_pages_relocated_total %llu\n",
      (unsigned long long)s->m.pages_drained, (unsigned long long)s->m.pages_relocated);
    rc |= tenant_series(s, c, b, "caked_tenant_drained_pages_total", "counter",
                        "Pool pages of each tenant's segments drained for other tenants.",
                        offsetof(struct tenant, drained));
    rc |= tenant_series(s, c, b, "caked_tenant_reslices_total", "counter",
                        "Sequences of each tenant re-sliced to make room.",
                        offsetof(struct tenant, reslices));
    rc |= tenant_series(s, c, b, "caked_tenant_reslice_tokens_total", "counter",
                        "Layer tokens each tenant's sequences gave up to re-slices.",
                        offsetof(struct tenant, rs_tokens));
    P("# HELP caked_evicted_tokens_total Tokens evicted (per kv head).\n"
      "# TYPE caked_evicted_tokens_total counter\ncaked_evicted_tokens_total %llu\n",
      (unsigned long long)s->m.tokens_evicted);
    P("# HELP caked_clients_total Connections accepted.\n# TYPE caked_clients_total counter\n"
      "caked_clients_total %llu\n", (unsigned long long)s->m.clients_total);
    P("# HELP caked_clients_refused_total Connections closed at once: over the client or file "
      "descriptor limit.\n# TYPE caked_clients_refused_total counter\n"
      "caked_clients_refused_total %llu\n", (unsigned long long)s->m.clients_refused);
    P("# HELP caked_work_cancelled_total Layers not worked on because their client was gone.\n"
      "# TYPE caked_work_cancelled_total counter\ncaked_work_cancelled_total %llu\n",
      (unsigned long long)s->m.jobs_cancelled);
    P("# HELP caked_clients_lost_total Clients that disconnected while holding sequences.\n"
      "# TYPE caked_clients_lost_total counter\ncaked_clients_lost_total %llu\n",
      (unsigned long long)s->m.clients_killed);
    P("# HELP caked_request_duration_seconds Request latency inside caked, by request type "
      "(from the whole request read to the reply queued).\n"
      "# TYPE caked_request_duration_seconds histogram\n");
    for (unsigned t = 0; t <= MSG_TYPE_MAX; t++) {
        const struct metrics_lat *h = &s->m.lat[t];
        char labels[64];
        if (t == MSG_MAP || (!t && !h->count))
            continue; /* MAP is never a request; unknown types only once seen */
        snprintf(labels, sizeof labels, "type=\"%s\"", t ? frame_type_name(t) : "unknown");
        rc |= histogram(b, "caked_request_duration_seconds", labels, h);
    }
    struct workers_load wl;
    workers_load(s->workers, clock_now_s(), &wl);
    P("# HELP caked_work_queued Jobs waiting for a worker thread.\n"
      "# TYPE caked_work_queued gauge\ncaked_work_queued %u\n"
      "# HELP caked_work_running Jobs on a worker thread.\n"
      "# TYPE caked_work_running gauge\ncaked_work_running %u\n"
      "# HELP caked_work_oldest_seconds The longest a job now running has run (a stuck call "
      "shows here) and the longest a job now waiting has waited (a saturated pool), 0: none.\n"
      "# TYPE caked_work_oldest_seconds gauge\n"
      "caked_work_oldest_seconds{state=\"running\"} %.6f\n"
      "caked_work_oldest_seconds{state=\"queued\"} %.6f\n",
      wl.queued, wl.running, wl.oldest_running_s, wl.oldest_queued_s);
    P("# HELP caked_work_seconds The workers' jobs by kind (prefill: a layer's scoring and "
      "compaction; decode: a step's evictions; pressure: re-slicing and parking) and stage "
      "(queued: submitted until a worker takes it; run: on the worker; return: run done until "
      "the event loop completes it).\n"
      "# TYPE caked_work_seconds histogram\n");
    static const char *const kinds[WORK_KINDS] = {"prefill", "decode", "pressure"};
    static const char *const stages[STAGE_KINDS] = {"queued", "run", "return"};
    for (int k = 0; k < WORK_KINDS; k++)
        for (int g = 0; g < STAGE_KINDS; g++) {
            char labels[64];
            snprintf(labels, sizeof labels, "kind=\"%s\",stage=\"%s\"", kinds[k], stages[g]);
            rc |= histogram(b, "caked_work_seconds", labels, &s->m.work[k][g]);
        }
#undef P
    return rc;
}
