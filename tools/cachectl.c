/* cachectl - shows and steers a running caked.
 *
 *   cachectl [--socket PATH] [--server-uid UID] [--timeout SECS] [--json] [-i SECS] COMMAND
 *     status                 daemon, pool and counts
 *     tenants                tenants: weight, minimum, cap, bytes used, sequences
 *     sequences              open sequences (every tenant's for administrators: root,
 *                            caked's uid, --admin-group; else the caller's tenant's)
 *     seq ID                 one sequence: its policy's components, then layer by
 *                            layer: preference, budget, kept
 *     metrics                Prometheus text
 *     quota TENANT [--uid UID] [--weight N] [--min SIZE] [--max SIZE]   (administrators;
 *                            changes only the values given)
 *
 * A human table by default; --json is the stable interface (one JSON object per
 * command, documented in tools/README.md). -i SECS repeats the command every SECS seconds.
 * --timeout SECS bounds the wait for each reply (default 5; 0 waits forever).
 * Exit status: 0 ok, 1 error, 2 usage. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <unistd.h>

#include "../proto/frame.h"
#include "cake.pb-c.h"
#include "cake/cake.h"
#include "internal.h"
#include "util.h"

static int json;

static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || s[0] == '-')
        return -1;
    uint64_t m = 1;
    switch (*end) {
    case 'k': case 'K': m = 1ull << 10; end++; break;
    case 'm': case 'M': m = 1ull << 20; end++; break;
    case 'g': case 'G': m = 1ull << 30; end++; break;
    case 't': case 'T': m = 1ull << 40; end++; break;
    }
    if (*end == 'i')
        end++;
    if (*end == 'B')
        end++;
    if (*end)
        return -1;
    *out = v * m;
    return 0;
}

/* One request; prints the daemon's message on error. */
static int call(cake_ctx *c, uint16_t type, const ProtobufCMessage *m, uint8_t **b, size_t *n)
{
    int rc = cake_internal_rpc(c, type, m, b, n);
    if (rc)
        fprintf(stderr, "cachectl: %s: %s%s%s\n", frame_type_name(type), cake_strerror(rc),
                cake_errstr(c)[0] ? ": " : "", cake_errstr(c));
    return rc;
}

#define FETCH(kind, var, type, msg)                                                       \
    uint8_t *b_;                                                                          \
    size_t n_;                                                                            \
    if (call(c, type, msg, &b_, &n_))                                                     \
        return 1;                                                                         \
    ProtobufCAllocator al_ = cake_internal_allocator(c);                                  \
    __typeof__(cake__##kind##__unpack(NULL, 0, NULL)) var = cake__##kind##__unpack(&al_, n_, b_); \
    cake_internal_free(c, b_);                                                            \
    if (!var) {                                                                           \
        fprintf(stderr, "cachectl: malformed reply\n");                                  \
        return 1;                                                                         \
    }

/* --json: one JSON document per command, built and escaped by jansson; keys in the order
 * they were set. */
static void json_out(json_t *v)
{
    char *t = json_dumps(v, JSON_PRESERVE_ORDER | JSON_COMPACT);
    if (t)
        puts(t);
    free(t);
    json_decref(v);
}

static json_t *ju(unsigned long long v) { return json_integer((json_int_t)v); }

static json_t *hex_id(unsigned long long v)
{
    char b[32];
    snprintf(b, sizeof b, "%#llx", v);
    return json_string(b);
}

static int cmd_status(cake_ctx *c)
{
    FETCH(status, s, MSG_STATUS, NULL);
    if (json) {
        json_t *gpus = json_array();
        for (size_t i = 0; i < s->n_gpus; i++)
            json_array_append_new(gpus, json_pack("{s:s, s:o, s:o}", "uuid", s->gpus[i]->uuid,
                                                  "bytes", ju(s->gpus[i]->bytes), "pages_used",
                                                  ju(s->gpus[i]->pages_used)));
        json_t *o = json_object();
        json_object_set_new(o, "version", json_string(s->daemon_version));
        json_object_set_new(o, "protocol", ju(s->protocol_version));
        json_object_set_new(o, "pid", ju(s->pid));
        json_object_set_new(o, "socket", json_string(s->socket));
        json_object_set_new(o, "io", json_string(s->io_backend));
        json_object_set_new(o, "uptime_ms", ju(s->uptime_ms));
        json_object_set_new(o, "pool_bytes", ju(s->pool_bytes));
        json_object_set_new(o, "page_bytes", ju(s->page_bytes));
        json_object_set_new(o, "pages_total", ju(s->pages_total));
        json_object_set_new(o, "pages_used", ju(s->pages_used));
        json_object_set_new(o, "tenants", ju(s->tenants));
        json_object_set_new(o, "sequences", ju(s->sequences));
        json_object_set_new(o, "clients", ju(s->clients));
        json_object_set_new(o, "gpu_pool_bytes", ju(s->gpu_pool_bytes));
        json_object_set_new(o, "gpus", gpus);
        json_object_set_new(o, "workers", ju(s->workers));
        json_object_set_new(o, "jobs_queued", ju(s->jobs_queued));
        json_object_set_new(o, "jobs_running", ju(s->jobs_running));
        json_object_set_new(o, "longest_running_us", ju(s->longest_running_us));
        json_object_set_new(o, "oldest_queued_us", ju(s->oldest_queued_us));
        json_out(o);
    } else {
        char pb[32], pg[32], ub[32];
        util_human_bytes(s->pool_bytes, pb, sizeof pb);
        util_human_bytes(s->page_bytes, pg, sizeof pg);
        util_human_bytes(s->pages_used * s->page_bytes, ub, sizeof ub);
        printf("caked %s (protocol %u), pid %u, up %.1f s, %s event loop\n", s->daemon_version,
               s->protocol_version, s->pid, s->uptime_ms / 1e3, s->io_backend);
        printf("socket     %s\n", s->socket);
        printf("host pool  %s in %llu pages of %s; %s used (%.1f%%)\n", pb,
               (unsigned long long)s->pages_total, pg, ub,
               s->pages_total ? 100.0 * s->pages_used / s->pages_total : 0.0);
        for (size_t i = 0; i < s->n_gpus; i++) {
            char gb[32], gu[32];
            util_human_bytes(s->gpus[i]->bytes, gb, sizeof gb);
            util_human_bytes(s->gpus[i]->pages_used * s->page_bytes, gu, sizeof gu);
            printf("GPU pool   %s on %s; %s used\n", gb, s->gpus[i]->uuid, gu);
        }
        printf("tenants    %u   sequences %u   clients %u\n", s->tenants, s->sequences, s->clients);
        printf("workers    %u: %u running", s->workers, s->jobs_running);
        if (s->jobs_running)
            printf(" (the longest for %.1f ms)", s->longest_running_us / 1e3);
        printf(", %u waiting", s->jobs_queued);
        if (s->jobs_queued)
            printf(" (the oldest for %.1f ms)", s->oldest_queued_us / 1e3);
        printf("\n");
    }
    cake__status__free_unpacked(s, &al_);
    return 0;
}

static int cmd_tenants(cake_ctx *c)
{
    FETCH(tenant_list, r, MSG_TENANTS, NULL);
    if (json) {
        json_t *a = json_array();
        for (size_t i = 0; i < r->n_tenants; i++) {
            Cake__Tenant *t = r->tenants[i];
            json_t *o = json_object();
            json_object_set_new(o, "name", json_string(t->name));
            json_object_set_new(o, "uid", ju(t->uid));
            json_object_set_new(o, "weight", ju(t->weight));
            json_object_set_new(o, "min_bytes", ju(t->min_bytes));
            json_object_set_new(o, "cap_bytes", ju(t->max_bytes));
            json_object_set_new(o, "used_bytes", ju(t->used_bytes));
            json_object_set_new(o, "sequences", ju(t->sequences));
            json_object_set_new(o, "clients", ju(t->clients));
            json_object_set_new(o, "oom_errors", ju(t->oom_errors));
            json_object_set_new(o, "gpu_used_bytes", ju(t->gpu_used_bytes));
            json_object_set_new(o, "gpu_min_bytes", ju(t->gpu_min_bytes));
            json_object_set_new(o, "gpu_cap_bytes", ju(t->gpu_cap_bytes));
            json_object_set_new(o, "pressure", json_string(t->pressure ? t->pressure : ""));
            json_object_set_new(o, "min_tokens", ju(t->min_tokens));
            json_object_set_new(o, "reslices", ju(t->reslices));
            json_object_set_new(o, "reslice_tokens", ju(t->reslice_tokens));
            json_object_set_new(o, "waits_granted", ju(t->waits_granted));
            json_object_set_new(o, "waits_refused", ju(t->waits_refused));
            json_array_append_new(a, o);
        }
        json_out(json_pack("{s:o}", "tenants", a));
    } else {
        printf("%-20s %6s %6s %11s %11s %11s %11s %11s %5s %7s %5s %-8s %8s %7s\n", "TENANT",
               "UID", "WEIGHT", "MIN", "CAP", "USED", "GPU CAP", "GPU USED", "SEQS", "CLIENTS",
               "OOM", "PRESSURE", "RESLICES", "WAITED");
        for (size_t i = 0; i < r->n_tenants; i++) {
            Cake__Tenant *t = r->tenants[i];
            char mn[32], cp[32], us[32], gc[32] = "-", gu[32] = "-";
            util_human_bytes(t->min_bytes, mn, sizeof mn);
            util_human_bytes(t->max_bytes, cp, sizeof cp);
            util_human_bytes(t->used_bytes, us, sizeof us);
            if (t->gpu_cap_bytes) {
                util_human_bytes(t->gpu_cap_bytes, gc, sizeof gc);
                util_human_bytes(t->gpu_used_bytes, gu, sizeof gu);
            }
            printf("%-20s %6u %6u %11s %11s %11s %11s %11s %5u %7u %5llu %-8s %8llu %7llu\n",
                   t->name, t->uid, t->weight, mn, cp, us, gc, gu, t->sequences, t->clients,
                   (unsigned long long)t->oom_errors, t->pressure ? t->pressure : "",
                   (unsigned long long)t->reslices,
                   (unsigned long long)(t->waits_granted + t->waits_refused));
        }
    }
    cake__tenant_list__free_unpacked(r, &al_);
    return 0;
}

static const char *dtype_name(uint32_t d)
{
    return d == 0 ? "f32" : d == 1 ? "f16" : d == 2 ? "bf16" : "?";
}

static const char *policy_of(const Cake__SeqInfo *q)
{
    return q->policy && *q->policy ? q->policy : "cake";
}

/* Where a sequence's K/V live (SeqInfo.placement). */
static const char *place_name(uint32_t p)
{
    return p == 0 ? "host" : p == 1 ? "gpu" : p == 2 ? "parked" : "?";
}

static json_t *seq_json(const Cake__SeqInfo *q)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", hex_id(q->seq_id));
    json_object_set_new(o, "tenant", json_string(q->tenant));
    json_object_set_new(o, "layers", ju(q->layers));
    json_object_set_new(o, "kv_heads", ju(q->kv_heads));
    json_object_set_new(o, "head_dim", ju(q->head_dim));
    json_object_set_new(o, "dtype", json_string(dtype_name(q->dtype)));
    json_object_set_new(o, "prompt_len", ju(q->prompt_len));
    json_object_set_new(o, "prefilled_layers", ju(q->prefilled_layers));
    json_object_set_new(o, "decoded_tokens", ju(q->decoded_tokens));
    json_object_set_new(o, "bytes", ju(q->bytes));
    json_object_set_new(o, "mode", json_string(q->mode ? "fixed" : "parity"));
    json_object_set_new(o, "policy", json_string(policy_of(q)));
    json_object_set_new(o, "cache_size", ju(q->cache_size));
    json_object_set_new(o, "effective_cache", ju(q->effective_cache ? q->effective_cache
                                                                    : q->cache_size));
    json_object_set_new(o, "reslices", ju(q->reslices));
    if (q->shards) {
        json_object_set_new(o, "shard_group", hex_id(q->shard_group));
        json_object_set_new(o, "shards", ju(q->shards));
        json_object_set_new(o, "shard", ju(q->shard));
    }
    if (q->gpu_uuid && q->gpu_uuid[0])
        json_object_set_new(o, "gpu_uuid", json_string(q->gpu_uuid));
    json_object_set_new(o, "placement", json_string(place_name(q->placement)));
    if (q->components && q->components[0])
        json_object_set_new(o, "components", json_string(q->components));
    return o;
}

static int cmd_sequences(cake_ctx *c)
{
    Cake__ListPage pg = CAKE__LIST_PAGE__INIT;
    int more = 1;
    json_t *all = json ? json_array() : NULL;
    if (!json)
        printf("%-14s %-16s %6s %8s %9s %7s %6s %-12s %6s %6s %-6s %10s\n", "ID", "TENANT",
               "LAYERS", "PROMPT", "PREFILLED", "DECODED", "MODE", "POLICY", "CACHE", "NOW", "WHERE",
               "BYTES");
    while (more) { /* page by page: a long list does not fit one reply */
        FETCH(seq_list, r, MSG_SEQUENCES, &pg.base);
        for (size_t i = 0; i < r->n_seqs; i++) {
            Cake__SeqInfo *q = r->seqs[i];
            if (json) {
                json_array_append_new(all, seq_json(q));
            } else {
                char by[32];
                util_human_bytes(q->bytes, by, sizeof by);
                printf("%#-14llx %-16s %6u %8u %9u %7u %6s %-12s %6u %6u %-6s %10s\n",
                       (unsigned long long)q->seq_id, q->tenant, q->layers, q->prompt_len,
                       q->prefilled_layers, q->decoded_tokens, q->mode ? "fixed" : "parity",
                       policy_of(q), q->cache_size,
                       q->effective_cache ? q->effective_cache : q->cache_size,
                       place_name(q->placement), by);
            }
        }
        more = r->more && r->next > pg.after;
        pg.after = r->next;
        cake__seq_list__free_unpacked(r, &al_);
    }
    if (json)
        json_out(json_pack("{s:o}", "sequences", all));
    return 0;
}

static int cmd_seq(cake_ctx *c, const char *arg)
{
    char *end;
    unsigned long long id = strtoull(arg, &end, 0);
    if (*end || end == arg) {
        fprintf(stderr, "cachectl: bad sequence id '%s'\n", arg);
        return 2;
    }
    Cake__SeqRef m = CAKE__SEQ_REF__INIT;
    m.seq_id = id;
    FETCH(seq_info, q, MSG_SEQ_INFO, &m.base);
    uint32_t w_tokens = q->prompt_len; /* per-layer full cache, for the kept fraction */
    if (json) {
        json_t *o = seq_json(q), *layers = json_array();
        for (size_t l = 0; l < q->n_layer; l++) {
            Cake__LayerInfo *li = q->layer[l];
            json_array_append_new(layers, json_pack("{s:o, s:f, s:o, s:o, s:o, s:o}", "layer",
                                                    ju(l), "preference", li->preference,
                                                    "budget", ju(li->budget), "prefix",
                                                    ju(li->prefix), "tokens", ju(li->tokens),
                                                    "pages", ju(li->pages)));
        }
        json_object_set_new(o, "layer", layers);
        json_out(o);
    } else {
        char by[32];
        util_human_bytes(q->bytes, by, sizeof by);
        printf("sequence %#llx of %s: %u layers, %u kv heads x %u %s, prompt %u, %u decoded, "
               "%s mode, policy %s, cache %u per layer, %s\n", (unsigned long long)q->seq_id,
               q->tenant, q->layers, q->kv_heads, q->head_dim, dtype_name(q->dtype),
               q->prompt_len, q->decoded_tokens, q->mode ? "fixed" : "parity", policy_of(q),
               q->cache_size, by);
        if (q->components && q->components[0])
            printf("%s\n", q->components);
        if (q->reslices)
            printf("re-sliced %u times to make room: %u tokens per layer now\n", q->reslices,
                   q->effective_cache);
        if (q->shards)
            printf("shard %u of %u in group %#llx\n", q->shard, q->shards,
                   (unsigned long long)q->shard_group);
        if (q->gpu_uuid && q->gpu_uuid[0])
            printf("on %s%s\n", q->gpu_uuid, q->placement == 2 ? ", parked in host memory" : "");
        printf("%5s %12s %7s %7s %7s %6s %7s  %s\n", "LAYER", "PREFERENCE", "BUDGET", "PREFIX",
               "TOKENS", "PAGES", "KEPT", "budget share");
        uint32_t maxb = 1;
        for (size_t l = 0; l < q->n_layer; l++)
            maxb = q->layer[l]->budget > maxb ? q->layer[l]->budget : maxb;
        for (size_t l = 0; l < q->n_layer; l++) {
            Cake__LayerInfo *li = q->layer[l];
            char bar[41];
            int nb = (int)(40.0 * li->budget / maxb);
            memset(bar, '#', (size_t)nb);
            bar[nb] = 0;
            if (l < q->prefilled_layers)
                printf("%5zu %12.5g %7u %7u %7u %6u %6.1f%%  %s\n", l, li->preference, li->budget,
                       li->prefix, li->tokens, li->pages,
                       w_tokens ? 100.0 * li->tokens / (w_tokens + q->decoded_tokens) : 0.0, bar);
            else
                printf("%5zu %12s %7s %7s %7u %6u %7s\n", l, "-", "-", "-", li->tokens, li->pages, "-");
        }
    }
    cake__seq_info__free_unpacked(q, &al_);
    return 0;
}

/* One Prometheus sample line `name{label="value",...} number` as JSON; NULL if it is not one. */
static json_t *sample_json(const char *line)
{
    const char *p = line;
    size_t n = strcspn(p, "{ ");
    if (!n)
        return NULL;
    json_t *o = json_object(), *labels = json_object();
    json_object_set_new(o, "name", json_stringn(p, n));
    p += n;
    if (*p == '{') {
        p++;
        while (*p && *p != '}') {
            size_t k = strcspn(p, "=");
            if (!p[k] || p[k + 1] != '"')
                goto bad;
            char key[128], val[512];
            size_t kl = k < sizeof key - 1 ? k : sizeof key - 1, vl = 0;
            memcpy(key, p, kl), key[kl] = 0;
            p += k + 2;
            for (; *p && *p != '"'; p++) { /* the exposition format's escapes: \\ \" \n */
                char ch = *p;
                if (ch == '\\' && p[1])
                    ch = *++p == 'n' ? '\n' : *p;
                if (vl < sizeof val - 1)
                    val[vl++] = ch;
            }
            if (*p != '"')
                goto bad;
            val[vl] = 0;
            json_object_set_new(labels, key, json_string(val));
            p++;
            if (*p == ',')
                p++;
        }
        if (*p != '}')
            goto bad;
        p++;
    }
    char *end;
    double v = strtod(p, &end);
    if (end == p)
        goto bad;
    json_object_set_new(o, "labels", labels);
    json_object_set_new(o, "value", json_real(v));
    return o;
bad:
    json_decref(labels), json_decref(o);
    return NULL;
}

static int cmd_metrics(cake_ctx *c)
{
    Cake__ListPage pg = CAKE__LIST_PAGE__INIT;
    char *text = NULL;
    size_t len = 0;
    for (;;) { /* page by page: the text may be larger than one reply */
        FETCH(metrics, r, MSG_METRICS, &pg.base);
        size_t n = strlen(r->text);
        if (json) {
            char *t = realloc(text, len + n + 1);
            if (!t) {
                free(text);
                cake__metrics__free_unpacked(r, &al_);
                fprintf(stderr, "cachectl: out of memory\n");
                return 1;
            }
            memcpy(t + len, r->text, n + 1);
            text = t, len += n;
        } else {
            fputs(r->text, stdout);
        }
        pg.offset += n;
        int done = !n || pg.offset >= r->total;
        cake__metrics__free_unpacked(r, &al_);
        if (done)
            break;
    }
    if (!json)
        return 0;
    /* {"types": {name: type}, "samples": [{name, labels, value}]} */
    json_t *types = json_object(), *samples = json_array();
    for (char *line = text ? strtok(text, "\n") : NULL; line; line = strtok(NULL, "\n")) {
        char name[128], type[32];
        if (sscanf(line, "# TYPE %127s %31s", name, type) == 2)
            json_object_set_new(types, name, json_string(type));
        else if (line[0] != '#') {
            json_t *o = sample_json(line);
            if (o)
                json_array_append_new(samples, o);
        }
    }
    free(text);
    json_out(json_pack("{s:o, s:o}", "types", types, "samples", samples));
    return 0;
}

/* quota's values, from the command line (options go anywhere: before or after the command) */
static const char *q_uid, *q_weight, *q_min, *q_max, *q_gmin, *q_gmax, *q_pressure, *q_mintok;

static int cmd_quota(cake_ctx *c, const char *tenant)
{
    Cake__SetQuota m = CAKE__SET_QUOTA__INIT;
    m.tenant = (char *)tenant;
    const char *num[3] = {q_weight, q_uid, q_mintok};
    for (int k = 0; k < 3; k++) {
        if (!num[k])
            continue;
        char *end;
        long w = strtol(num[k], &end, 10);
        if (*end || !*num[k] || w < 0 || w > (long)UINT32_MAX - 1)
            return 2;
        if (k == 0)
            m.weight = (uint32_t)w, m.has_weight = 1;
        else if (k == 1)
            m.uid = (uint32_t)w, m.has_uid = 1;
        else
            m.min_tokens = (uint32_t)w, m.has_min_tokens = 1;
    }
    m.pressure = (char *)(q_pressure ? q_pressure : "");
    const struct { const char *arg; uint64_t *v; protobuf_c_boolean *has; } sizes[] = {
        {q_min, &m.min_bytes, &m.has_min}, {q_max, &m.max_bytes, &m.has_max},
        {q_gmin, &m.gpu_min_bytes, &m.has_gpu_min}, {q_gmax, &m.gpu_max_bytes, &m.has_gpu_max},
    };
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        if (!sizes[k].arg)
            continue;
        if (parse_size(sizes[k].arg, sizes[k].v))
            return 2;
        *sizes[k].has = 1;
    }
    uint8_t *b;
    size_t n;
    if (call(c, MSG_SET_QUOTA, &m.base, &b, &n))
        return 1;
    cake_internal_free(c, b);
    if (json)
        json_out(json_pack("{s:b}", "ok", 1));
    else
        printf("quota of %s set (runtime only: a restart or SIGHUP applies caked's --config "
               "again)\n", m.tenant);
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: cachectl [--socket PATH] [--server-uid UID] [--timeout SECS] [--json] [-i SECS] "
               "status|tenants|sequences|seq ID|metrics|quota TENANT [--uid UID] [--weight N] [--min SIZE] [--max SIZE] "
               "[--gpu-min SIZE] [--gpu-max SIZE] [--pressure reslice|park|refuse|default] "
               "[--min-tokens N]\n");
}

static volatile sig_atomic_t stop;
static void on_int(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv)
{
    const char *sock = NULL;
    double interval = 0;
    long server_uid = -2; /* libcake's default: root or our own uid */
    double timeout = 5.0;
    static const struct option opts[] = {
        {"socket", 1, 0, 's'}, {"json", 0, 0, 'j'}, {"interval", 1, 0, 'i'}, {"help", 0, 0, 'h'},
        {"server-uid", 1, 0, 'u'}, {"timeout", 1, 0, 't'}, {"version", 0, 0, 'V'},
        {"uid", 1, 0, 'U'}, {"weight", 1, 0, 'W'}, {"min", 1, 0, 'm'}, {"max", 1, 0, 'M'},
        {"gpu-min", 1, 0, 'g'}, {"gpu-max", 1, 0, 'G'}, {"pressure", 1, 0, 'P'},
        {"min-tokens", 1, 0, 'T'}, {0, 0, 0, 0},
    };
    int o;
    /* options anywhere ("status --json" as well as "--json status") */
    while ((o = getopt_long(argc, argv, "s:ji:hV", opts, NULL)) != -1) {
        switch (o) {
        case 'U': q_uid = optarg; break;
        case 'W': q_weight = optarg; break;
        case 'm': q_min = optarg; break;
        case 'M': q_max = optarg; break;
        case 'g': q_gmin = optarg; break;
        case 'G': q_gmax = optarg; break;
        case 'P': q_pressure = optarg; break;
        case 'T': q_mintok = optarg; break;
        case 's': sock = optarg; break;
        case 'j': json = 1; break;
        case 'i': interval = atof(optarg); if (interval <= 0) { usage(stderr); return 2; } break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("cachectl %s (protocol %d)\n", CAKE_VERSION, CAKE_PROTOCOL_VERSION); return 0;
        case 't': timeout = atof(optarg); if (timeout < 0) { usage(stderr); return 2; } break;
        case 'u': {
            char *end;
            server_uid = strtol(optarg, &end, 10);
            if (*end || server_uid < 0) { usage(stderr); return 2; }
            break;
        }
        default: usage(stderr); return 2;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[optind];
    int args = argc - optind - 1; /* words after the command */
    int known = ((!strcmp(cmd, "status") || !strcmp(cmd, "tenants") || !strcmp(cmd, "sequences") ||
                  !strcmp(cmd, "metrics")) && args == 0) ||
                ((!strcmp(cmd, "seq") || !strcmp(cmd, "quota")) && args == 1);
    int quota_opts = q_uid || q_weight || q_min || q_max || q_gmin || q_gmax || q_pressure || q_mintok;
    if (!known || (quota_opts && strcmp(cmd, "quota"))) { /* nothing is silently ignored */
        usage(stderr);
        return 2;
    }
    cake_ctx *c;
    /* administration is asked for: granted to root, caked's uid and --admin-group, others
     * see their own tenant */
    if (cake_create(&c) || cake_set_service(c, "cachectl") || cake_set_admin(c, 1) ||
        cake_set_timeout_ms(c, (int)(timeout * 1000)) ||
        (server_uid != -2 && cake_set_server_uid(c, server_uid)))
        return 1;
    int rc = cake_connect(c, sock, 0);
    if (rc) {
        fprintf(stderr, "cachectl: %s\n", cake_errstr(c)[0] ? cake_errstr(c) : cake_strerror(rc));
        cake_destroy(c);
        return 1;
    }
    signal(SIGINT, on_int);
    int tty = isatty(1);
    do {
        if (interval && tty && !json)
            printf("\033[H\033[2J");
        if (!strcmp(cmd, "status")) rc = cmd_status(c);
        else if (!strcmp(cmd, "tenants")) rc = cmd_tenants(c);
        else if (!strcmp(cmd, "sequences")) rc = cmd_sequences(c);
        else if (!strcmp(cmd, "seq")) rc = cmd_seq(c, argv[optind + 1]);
        else if (!strcmp(cmd, "metrics")) rc = cmd_metrics(c);
        else rc = cmd_quota(c, argv[optind + 1]);
        fflush(stdout);
        if (rc || !interval)
            break;
        usleep((useconds_t)(interval * 1e6));
    } while (!stop);
    if (rc == 2)
        usage(stderr);
    cake_destroy(c);
    return rc;
}
