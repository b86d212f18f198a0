/* config.c - defaults, option and file parsing (see config.h). */
#include <ctype.h>
#include <pwd.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../client/include/cake/cake.h"
#include "config.h"
#include "http.h"
#include "pressure.h"
#include "tenant.h"

int config_parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || errno || s[0] == '-')
        return -1;
    uint64_t mul = 1;
    switch (toupper((unsigned char)*end)) {
    case 'K': mul = 1ull << 10; end++; break;
    case 'M': mul = 1ull << 20; end++; break;
    case 'G': mul = 1ull << 30; end++; break;
    case 'T': mul = 1ull << 40; end++; break;
    default: break;
    }
    if (mul > 1 && (*end == 'i' || *end == 'I'))
        end++;
    if (*end == 'B' || *end == 'b')
        end++;
    if (*end || (v && mul > UINT64_MAX / v))
        return -1;
    *out = v * mul;
    return 0;
}

void config_defaults(struct config *c)
{
    memset(c, 0, sizeof(*c));
    cake_default_socket(c->srv.socket_path, sizeof c->srv.socket_path);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    uint64_t ram = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : (4ull << 30);
    c->srv.host_pool_bytes = ram / 4 < (1ull << 30) ? ram / 4 : (1ull << 30);
    c->srv.page_bytes = 64 << 10;
    c->srv.io = LOOP_AUTO;
    c->srv.workers = 0;
    c->srv.kernel_threads = 1;
    c->srv.pressure = PRESSURE_RESLICE;
    c->srv.pressure_wait_s = 5.0;
    c->srv.min_tokens = 64;
}

#define FAIL(...) (snprintf(err, (size_t)len, __VA_ARGS__), -1)

/* The tenant field a size key sets (min, max, gpu-min, gpu-max), or NULL. */
static uint64_t *size_key(struct tenant_cfg *t, const char *key)
{
    return !strcmp(key, "min")       ? &t->min_bytes
           : !strcmp(key, "max")     ? &t->max_bytes
           : !strcmp(key, "gpu-min") ? &t->gpu_min_bytes
           : !strcmp(key, "gpu-max") ? &t->gpu_max_bytes
                                     : NULL;
}

int config_set(struct config *c, const char *key, const char *v, char *err, int len)
{
    uint64_t n;
    if (!strcmp(key, "socket")) {
        if (strlen(v) >= sizeof c->srv.socket_path || !v[0])
            return FAIL("socket path too long or empty: %s", v);
        strcpy(c->srv.socket_path, v);
    } else if (!strcmp(key, "admin-group")) {
        if (strlen(v) >= sizeof c->srv.admin_group)
            return FAIL("admin group name too long: %s", v);
        strcpy(c->srv.admin_group, v);
    } else if (!strcmp(key, "socket-group")) {
        if (strlen(v) >= sizeof c->srv.socket_group)
            return FAIL("group name too long: %s", v);
        strcpy(c->srv.socket_group, v);
    } else if (!strcmp(key, "host-pool")) {
        if (config_parse_size(v, &n) || n == 0)
            return FAIL("bad size for host-pool: %s (use e.g. 512M, 4G)", v);
        c->srv.host_pool_bytes = n;
    } else if (!strcmp(key, "metrics-listen")) {
        char host[256], port[16];
        if (strlen(v) >= sizeof c->srv.metrics_listen ||
            http_parse_listen(v, host, sizeof host, port, sizeof port))
            return FAIL("metrics-listen must be PORT, HOST:PORT, [IPV6]:PORT or *:PORT: %s", v);
        strcpy(c->srv.metrics_listen, v);
    } else if (!strcmp(key, "log-level")) {
        static const char *const lv[] = {"error", "warning", "info", "debug"};
        int k = 0;
        while (k < 4 && strcmp(v, lv[k]))
            k++;
        if (k == 4)
            return FAIL("log-level must be error, warning, info or debug: %s", v);
        c->srv.log_level = k + 1;
    } else if (!strcmp(key, "heap-limit")) {
        if (config_parse_size(v, &n) || n == 0)
            return FAIL("bad size for heap-limit: %s (use e.g. 512M, 4G)", v);
        c->srv.heap_limit_bytes = n;
    } else if (!strcmp(key, "gpu-pool")) { /* SIZE[@GPU-UUID] */
        char size[64];
        const char *at = strchr(v, '@');
        size_t sl = at ? (size_t)(at - v) : strlen(v);
        if (sl >= sizeof size || (at && strlen(at + 1) >= sizeof c->srv.gpu[0].uuid))
            return FAIL("bad gpu-pool: %s (SIZE or SIZE@GPU-UUID)", v);
        if (c->srv.n_gpus == SERVER_MAX_GPUS)
            return FAIL("at most %d gpu-pool entries", SERVER_MAX_GPUS);
        memcpy(size, v, sl), size[sl] = 0;
        if (config_parse_size(size, &n) || n == 0)
            return FAIL("bad size for gpu-pool: %s", v);
        struct server_gpu_cfg *g = &c->srv.gpu[c->srv.n_gpus++];
        g->bytes = n;
        snprintf(g->uuid, sizeof g->uuid, "%s", at ? at + 1 : "");
    } else if (!strcmp(key, "gpu-ipc")) { /* auto | legacy */
        if (strcmp(v, "auto") && strcmp(v, "legacy"))
            return FAIL("gpu-ipc must be auto or legacy: %s", v);
        c->srv.gpu_ipc_legacy = !strcmp(v, "legacy");
    } else if (!strcmp(key, "page-size")) {
        if (config_parse_size(v, &n) || n < 4096 || (n & (n - 1)) || n > (1ull << 30))
            return FAIL("page-size must be a power of two from 4K to 1G: %s", v);
        c->srv.page_bytes = n;
    } else if (!strcmp(key, "max-clients-per-uid")) {
        char *end;
        long x = strtol(v, &end, 10);
        if (*end || x < 1 || x > 1000000)
            return FAIL("max-clients-per-uid must be 1..1000000: %s", v);
        c->srv.max_per_uid = (uint32_t)x;
    } else if (!strcmp(key, "hello-timeout")) {
        char *end;
        double x = strtod(v, &end);
        if (*end || !(x >= 0.1 && x <= 3600))
            return FAIL("hello-timeout must be 0.1..3600 seconds: %s", v);
        c->srv.hello_timeout_s = x;
    } else if (!strcmp(key, "pressure")) {
        int m = pressure_mode_parse(v);
        if (m <= 0)
            return FAIL("pressure must be reslice, park or refuse: %s", v);
        c->srv.pressure = m;
    } else if (!strcmp(key, "pressure-wait")) {
        char *end;
        double x = strtod(v, &end);
        if (end == v || *end || !(x >= 0 && x <= 3600))
            return FAIL("pressure-wait must be 0..3600 seconds: %s", v);
        c->srv.pressure_wait_s = x;
    } else if (!strcmp(key, "min-tokens")) {
        char *end;
        long x = strtol(v, &end, 10);
        if (end == v || *end || x < 1 || x > (1L << 24))
            return FAIL("min-tokens must be 1..16777216: %s", v);
        c->srv.min_tokens = (uint32_t)x;
    } else if (!strcmp(key, "segment-size")) {
        if (config_parse_size(v, &n) || n < (4u << 20) || (n & (n - 1)) || n > (1ull << 40))
            return FAIL("segment-size must be a power of two of at least 4M: %s", v);
        c->srv.segment_bytes = n;
    } else if (!strcmp(key, "huge-pages")) {
        c->srv.hugepages = !strcmp(v, "1") || !strcmp(v, "yes") || !strcmp(v, "on") || !strcmp(v, "true");
    } else if (!strcmp(key, "io")) {
        if (!strcmp(v, "auto"))
            c->srv.io = LOOP_AUTO;
        else if (!strcmp(v, "uring") || !strcmp(v, "io_uring"))
            c->srv.io = LOOP_URING;
        else if (!strcmp(v, "epoll"))
            c->srv.io = LOOP_EPOLL;
        else
            return FAIL("io must be uring, epoll or auto: %s", v);
    } else if (!strcmp(key, "workers") || !strcmp(key, "kernel-threads")) {
        char *end;
        long x = strtol(v, &end, 10);
        if (*end || x < 0 || x > 1024)
            return FAIL("thread count must be 0..1024: %s", v);
        if (key[0] == 'w')
            c->srv.workers = (int)x;
        else
            c->srv.kernel_threads = (int)x;
    } else {
        return FAIL("unknown option: %s", key);
    }
    return 0;
}

static int parse_tenant(struct config *c, char *rest, char *err, int len)
{
    if (c->n_tenants == CONFIG_MAX_TENANTS)
        return FAIL("more than %s tenants", "256");
    struct tenant_cfg *t = &c->tenants[c->n_tenants];
    memset(t, 0, sizeof(*t));
    t->weight = 1;
    char *save = NULL, *tok = strtok_r(rest, " \t", &save);
    if (!tok || !tenant_name_ok(tok))
        return FAIL("tenant needs a name of [A-Za-z0-9._-]: %s", tok ? tok : "");
    snprintf(t->name, sizeof t->name, "%s", tok);
    while ((tok = strtok_r(NULL, " \t", &save))) {
        char *eq = strchr(tok, '=');
        if (!eq)
            return FAIL("expected key=value: %s", tok);
        *eq = 0;
        const char *v = eq + 1;
        char *end;
        if (!strcmp(tok, "uid") || !strcmp(tok, "uids")) {
            /* uid=1001,1002 or user names: the uids allowed to be this tenant */
            char list[256];
            snprintf(list, sizeof list, "%s", v);
            char *s2 = NULL;
            for (char *u = strtok_r(list, ",", &s2); u; u = strtok_r(NULL, ",", &s2)) {
                if (t->n_uids == TENANT_MAX_UIDS)
                    return FAIL("tenant %s: at most 16 uids", t->name);
                long id = strtol(u, &end, 10);
                if (*end || !*u) {
                    struct passwd pw, *pp = NULL;
                    char buf[1024];
                    if (getpwnam_r(u, &pw, buf, sizeof buf, &pp) || !pp)
                        return FAIL("no such user: %s", u);
                    id = (long)pw.pw_uid;
                } else if (id < 0 || id > UINT32_MAX - 1) {
                    return FAIL("bad uid: %s", u);
                }
                t->uids[t->n_uids++] = (uint32_t)id;
            }
            if (!t->n_uids)
                return FAIL("tenant %s: empty uid list", t->name);
        } else if (!strcmp(tok, "weight")) {
            long w = strtol(v, &end, 10);
            if (*end || w < 1 || w > TENANT_MAX_WEIGHT)
                return FAIL("weight must be 1..1000000: %s", v);
            t->weight = (uint32_t)w;
        } else if (!strcmp(tok, "pressure")) {
            if ((t->pressure = pressure_mode_parse(v)) <= 0)
                return FAIL("tenant %s: pressure must be reslice, park or refuse: %s", t->name, v);
        } else if (!strcmp(tok, "min-tokens")) {
            long x = strtol(v, &end, 10);
            if (end == v || *end || x < 1 || x > (1L << 24))
                return FAIL("tenant %s: min-tokens must be 1..16777216: %s", t->name, v);
            t->min_tokens = (uint32_t)x;
        } else if (size_key(t, tok)) { /* min, max, gpu-min, gpu-max */
            if (config_parse_size(v, size_key(t, tok)))
                return FAIL("bad size: %s", v);
        } else {
            return FAIL("unknown tenant key: %s", tok);
        }
    }
    if (t->max_bytes && t->min_bytes > t->max_bytes)
        return FAIL("tenant %s: min above max", t->name);
    if (t->gpu_max_bytes && t->gpu_min_bytes > t->gpu_max_bytes)
        return FAIL("tenant %s: gpu-min above gpu-max", t->name);
    c->n_tenants++;
    return 0;
}

int config_load(struct config *c, const char *path, char *err, int len)
{
    FILE *f = fopen(path, "r");
    struct stat st;
    if (!f || fstat(fileno(f), &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, (size_t)len, "%s: %s", path, f ? "not a regular file" : strerror(errno));
        if (f)
            fclose(f);
        return -1;
    }
    /* who may write it decides tenants, uids and the socket: root or caked's uid only */
    if ((st.st_uid != 0 && st.st_uid != geteuid()) || (st.st_mode & S_IWOTH) ||
        ((st.st_mode & S_IWGRP) && st.st_gid != 0 && st.st_gid != getegid())) {
        snprintf(err, (size_t)len, "%s: owned by uid %u with mode %04o: only root or caked's uid "
                 "may be able to change it (chown, chmod go-w)", path, (unsigned)st.st_uid,
                 (unsigned)(st.st_mode & 07777));
        fclose(f);
        return -1;
    }
    char line[1024], msg[256];
    int no = 0, rc = 0;
    while (!rc && fgets(line, sizeof line, f)) {
        no++;
        size_t ll = strlen(line);
        if (ll == sizeof line - 1 && line[ll - 1] != '\n' && !feof(f)) {
            /* never parse the tail of a long line (a comment's) as options */
            snprintf(err, (size_t)len, "%s:%d: line longer than %zu bytes", path, no,
                     sizeof line - 2);
            fclose(f);
            return -1;
        }
        char *p = line;
        char *hash = strchr(p, '#');
        if (hash)
            *hash = 0;
        while (isspace((unsigned char)*p))
            p++;
        size_t n = strlen(p);
        while (n && isspace((unsigned char)p[n - 1]))
            p[--n] = 0;
        if (!*p)
            continue;
        if (!strncmp(p, "tenant", 6) && isspace((unsigned char)p[6])) {
            rc = parse_tenant(c, p + 7, msg, sizeof msg);
        } else {
            char *eq = strchr(p, '=');
            if (!eq) {
                snprintf(msg, sizeof msg, "expected key = value");
                rc = -1;
            } else {
                *eq = 0;
                char *k = p, *v = eq + 1;
                size_t kl = strlen(k);
                while (kl && isspace((unsigned char)k[kl - 1]))
                    k[--kl] = 0;
                while (isspace((unsigned char)*v))
                    v++;
                rc = config_set(c, k, v, msg, sizeof msg);
            }
        }
        if (rc)
            snprintf(err, (size_t)len, "%s:%d: %s", path, no, msg);
    }
    fclose(f);
    return rc;
}
