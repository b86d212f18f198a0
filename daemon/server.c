/* server.c - caked's lifecycle (see server.h): pools, loop, workers, the listening socket
 * and signals; configuration reloads; the pools' hooks; shutdown. Connections are conn.c's,
 * the sequence table seqtab.c's, what requests do handlers.c's. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "cake/cake.h"
#include "frame.h"
#include "config.h"
#include "http.h"
#include "pressure.h"
#include "server_int.h"


/* --log-level: lines above it are not written (error 0, warning 1, info 2, debug 3) */
static int log_level = SRV_LOG_INFO;

__attribute__((format(printf, 2, 0))) static void vlog(int level, const char *fmt, va_list ap)
{
    static const char *const tag[] = {"error: ", "warning: ", "", ""};
    if (level > log_level)
        return;
    char ts[32];
    time_t t = time(NULL);
    struct tm tm;
    localtime_r(&t, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%d %H:%M:%S", &tm);
    fprintf(stderr, "%s caked[%d]: %s", ts, (int)getpid(), tag[level]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void srv_log(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(SRV_LOG_INFO, fmt, ap);
    va_end(ap);
}

void srv_logl(int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(level, fmt, ap);
    va_end(ap);
}

static void on_work(void *arg, uint32_t ev)
{
    struct server *s = arg;
    (void)ev;
    workers_reap(s->workers);
}

uint64_t srv_gpu_bytes(const struct server *s)
{
    uint64_t b = 0;
    for (uint32_t i = 0; i < s->n_gpus; i++)
        b += s->gpus[i].bytes;
    return b;
}

/* Applies the configured tenants (weights, minimums, maximums, uids); 0, or -EINVAL with
 * the reason logged and nothing changed. Tenants configured before and absent now become
 * ordinary ones (weight 1, no minimum or maximum) and are forgotten once idle. */
static int apply_tenants(struct server *s, const struct tenant_cfg *tc, int n)
{
    uint64_t min_sum = 0, gmin_sum = 0;
    for (int i = 0; i < n; i++)
        min_sum += tc[i].min_bytes, gmin_sum += tc[i].gpu_min_bytes;
    if (min_sum > s->pool.bytes) {
        srv_logl(SRV_LOG_ERROR, "the tenants' minimums sum to %llu bytes, over the host pool's %llu: no one "
                "else could open anything (lower min= or raise --host-pool)",
                (unsigned long long)min_sum, (unsigned long long)s->pool.bytes);
        return -EINVAL;
    }
    if (gmin_sum > srv_gpu_bytes(s)) {
        srv_logl(SRV_LOG_ERROR, "the tenants' GPU minimums sum to %llu bytes, over the GPU pools' "
                 "%llu (lower gpu-min= or raise --gpu-pool)", (unsigned long long)gmin_sum,
                 (unsigned long long)srv_gpu_bytes(s));
        return -EINVAL;
    }
    const uint32_t own = (uint32_t)s->owner_uid; /* a tenant naming no uid: caked's own */
#define UIDS(t) ((t)->n_uids ? (t)->uids : &own), ((t)->n_uids ? (t)->n_uids : 1)
    for (int i = 0; i < n; i++) { /* all or nothing: check every one first */
        int rc = tenant_configure_check(&s->tenants, tc[i].name, UIDS(&tc[i]));
        if (rc) {
            srv_logl(SRV_LOG_ERROR, "tenant %s: %s", tc[i].name, rc == -EEXIST
                    ? "one of its uids is attached under that name as a tenant of its own"
                    : strerror(-rc));
            return rc;
        }
    }
    for (uint32_t k = 0; k < s->tenants.n; k++) {
        struct tenant *t = &s->tenants.t[k];
        int still = 0;
        for (int i = 0; i < n && !still; i++)
            still = !strcmp(tc[i].name, t->name);
        if (t->in_use && t->configured && !still) {
            t->configured = 0, t->weight = 1, t->min_bytes = t->max_bytes = 0;
            t->gpu_min_bytes = t->gpu_max_bytes = 0;
            t->pressure = 0, t->min_tokens = 0;
            srv_tenant_gc(s, t);
        }
    }
    for (int i = 0; i < n; i++) { /* checked above: only memory can fail now */
        struct tenant_quota q = {tc[i].weight, tc[i].min_bytes, tc[i].max_bytes,
                                 tc[i].gpu_min_bytes, tc[i].gpu_max_bytes, tc[i].pressure,
                                 tc[i].min_tokens};
        int rc = tenant_configure(&s->tenants, tc[i].name, UIDS(&tc[i]), &q);
        if (rc) {
            srv_logl(SRV_LOG_ERROR, "tenant %s: %s", tc[i].name, strerror(-rc));
            return rc;
        }
    }
#undef UIDS
    return 0;
}

/* SIGHUP: the tenants and quotas of --config again (the rest needs a restart). */
static void reload(struct server *s)
{
    if (!s->cfg.config_path[0]) {
        srv_log("SIGHUP: no --config to read again; nothing changed");
        return;
    }
    static struct config c; /* large: not on the loop's stack */
    char err[512];
    config_defaults(&c);
    if (config_load(&c, s->cfg.config_path, err, sizeof err)) {
        srv_logl(SRV_LOG_WARNING, "SIGHUP: %s; nothing changed", err);
        return;
    }
    sd_notify(0, "RELOADING=1");
    if (apply_tenants(s, c.tenants, c.n_tenants) == 0)
        srv_log("SIGHUP: %d tenants from %s (quotas set with cachectl on them are replaced; "
                "other options apply at restart)", c.n_tenants, s->cfg.config_path);
    sd_notify(0, "READY=1");
}

static void on_signal(void *arg, uint32_t ev)
{
    struct server *s = arg;
    struct signalfd_siginfo si;
    (void)ev;
    while (read(s->sig_fd, &si, sizeof si) == sizeof si) {
        if (si.ssi_signo == SIGHUP) {
            reload(s);
            continue;
        }
        if (!s->stopping) {
            srv_log("%s: shutting down", strsignal((int)si.ssi_signo));
            sd_notify(0, "STOPPING=1");
        }
        s->stopping = 1;
    }
}

/* Raises the soft fd limit to the hard one (as Redis does) and fits the client limit under
 * it, keeping room for the pool, GPU pools, the loop and a reserve; holds a spare fd for
 * refusing connections when out of fds anyway. */
static void fd_limits(struct server *s)
{
    struct rlimit rl;
    s->max_clients = SERVER_MAX_CLIENTS;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        if (rl.rlim_cur < rl.rlim_max) {
            rlim_t want = rl.rlim_max == RLIM_INFINITY ? SERVER_MAX_CLIENTS + 256 : rl.rlim_max;
            struct rlimit up = {want, rl.rlim_max};
            if (want > rl.rlim_cur && setrlimit(RLIMIT_NOFILE, &up) == 0)
                rl.rlim_cur = want;
        }
        /* besides clients: 64 for caked itself, and one memfd per host pool segment */
        rlim_t reserve = 64 + (rlim_t)s->pool.n_segs;
        if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < SERVER_MAX_CLIENTS + reserve) {
            s->max_clients = rl.rlim_cur > reserve + 32 ? (uint32_t)(rl.rlim_cur - reserve) : 32;
            srv_log("file descriptor limit %llu: at most %u clients (%llu kept for caked and its "
                    "%u pool segments; raise LimitNOFILE / ulimit -n for more)",
                    (unsigned long long)rl.rlim_cur, s->max_clients, (unsigned long long)reserve,
                    s->pool.n_segs);
        }
    }
    s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    s->max_per_uid = s->cfg.max_per_uid ? s->cfg.max_per_uid : s->max_clients / 2;
    if (s->max_per_uid > s->max_clients)
        s->max_per_uid = s->max_clients;
    if (!s->cfg.hello_timeout_s)
        s->cfg.hello_timeout_s = 5.0;
}

/* Socket activation (systemd's caked.socket): the one listening Unix stream socket passed as
 * fd 3 is served as it is (its path, modes and owner are the unit's; caked never removes it).
 * 1 when used, 0 when none was passed, -EINVAL when what was passed is not one such socket. */
static int listen_passed(struct server *s)
{
    int n = sd_listen_fds(1);
    if (n <= 0)
        return 0;
    if (n != 1 || sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0) {
        srv_logl(SRV_LOG_ERROR, "socket activation passed %d fds: caked serves exactly one listening Unix stream "
                "socket", n);
        for (int i = 0; i < n; i++)
            close(SD_LISTEN_FDS_START + i);
        return -EINVAL;
    }
    int fd = SD_LISTEN_FDS_START;
    struct sockaddr_un a;
    socklen_t len = sizeof a;
    if (getsockname(fd, (struct sockaddr *)&a, &len) == 0 && a.sun_path[0])
        snprintf(s->cfg.socket_path, sizeof s->cfg.socket_path, "%s", a.sun_path);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    s->listen_fd = fd;
    s->activated = 1;
    return 1;
}

static int listen_on(struct server *s)
{
    int rc = listen_passed(s);
    if (rc)
        return rc < 0 ? rc : 0;
    char why[512];
    int fd = sockpath_listen(&s->sp, s->cfg.socket_path, s->cfg.socket_group, why, sizeof why);
    if (fd < 0) {
        srv_logl(SRV_LOG_ERROR, "%s", why);
        return fd;
    }
    s->listen_fd = fd;
    return 0;
}

static void human_bytes(uint64_t b, char *out, size_t len)
{
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)b;
    int i = 0;
    while (v >= 1024 && i < 4)
        v /= 1024, i++;
    snprintf(out, len, "%.4g %s", v, u[i]);
}

/* pool_ops of the host pool: a replaced segment's old memfd is punched out and closed by a
 * worker (freeing 8 MiB of resident pages takes ~1 ms: the loop must not wait for it) */
struct retire_job {
    struct job job;
    int fd;
    uint64_t bytes;
};

static void retire_run(struct job *j)
{
    struct retire_job *r = (struct retire_job *)j;
    pool_retire_fd(r->fd, r->bytes);
}

static void retire_done(struct job *j)
{
    free(j);
}

static void srv_retire_seg(void *ud, int fd, uint64_t bytes)
{
    struct server *s = ud;
    struct retire_job *r = calloc(1, sizeof(*r));
    if (!r || !s->workers) {
        free(r);
        pool_retire_fd(fd, bytes);
        return;
    }
    r->job.run = retire_run, r->job.done = retire_done, r->fd = fd, r->bytes = bytes;
    workers_submit(s->workers, &r->job);
}

/* pool_ops of a GPU pool: a segment's fresh allocation (a legacy pool has its memory) */
static int srv_gpu_seg_fresh(void *ud, struct pool *p, uint32_t i, const char **why)
{
    struct srv_gpu *g = ud;
    (void)p;
    return g->gpu.legacy ? 0 : gpupool_seg_fresh(&g->gpu, i, why);
}

int srv_gpu_seg_export(struct server *s, uint32_t gpu, uint32_t i)
{
    const char *why = NULL;
    int fd = -1;
    int rc = gpupool_seg_export(&s->gpus[gpu].gpu, i, &fd, &why);
    return rc ? rc : fd;
}

/* pool_ops of the host pool: each segment registered with CUDA while mapped */
static void srv_host_seg_mapped(void *ud, struct pool *p, uint32_t i, int mapped)
{
    (void)ud;
    void *at = p->base + (uint64_t)i * p->seg_bytes;
    const char *why = NULL;
    if (mapped)
        gpupool_register_host(at, (size_t)pool_seg_pages(p, i) * p->page_bytes, &why);
    else
        gpupool_unregister_host(at);
}

/* A switch from the environment (CAKED_TRACE and the benchmarks' comparisons): set to "1". */
static int env_on(const char *name)
{
    const char *v = getenv(name);
    return v && !strcmp(v, "1");
}

int server_create(const struct server_cfg *cfg, const struct tenant_cfg *tcfg, int n_tenants,
                  struct server **out)
{
    struct server *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->cfg = *cfg;
    log_level = cfg->log_level ? cfg->log_level - 1 : SRV_LOG_INFO; /* 0: the default */
    s->listen_fd = s->sig_fd = s->spare_fd = -1;
    s->owner_uid = geteuid();
    s->t_start = clock_now_s();
    s->admin_gid = (gid_t)-1;
    if (cfg->admin_group[0]) {
        struct group *g = getgrnam(cfg->admin_group);
        if (!g) {
            srv_logl(SRV_LOG_ERROR, "admin group %s: no such group", cfg->admin_group);
            free(s);
            return -EINVAL;
        }
        s->admin_gid = g->gr_gid;
    }
    /* block the shutdown signals before any thread exists, so every thread inherits the
     * mask and they arrive only through the signalfd */
    sigset_t ss;
    sigemptyset(&ss);
    sigaddset(&ss, SIGTERM);
    sigaddset(&ss, SIGINT);
    sigaddset(&ss, SIGHUP); /* reload, never the default (death with a stale socket) */
    pthread_sigmask(SIG_BLOCK, &ss, NULL);
    signal(SIGPIPE, SIG_IGN);
    const char *why = NULL;
    int rc = pool_init(&s->pool, cfg->host_pool_bytes, cfg->page_bytes, cfg->segment_bytes,
                       cfg->hugepages, &why);
    if (rc) {
        srv_logl(SRV_LOG_ERROR, "host pool: %s (%s)", why, strerror(-rc));
        goto fail;
    }
    for (uint32_t i = 0; i < cfg->n_gpus; i++) {
        struct srv_gpu *g = &s->gpus[i];
        const struct server_gpu_cfg *gc = &cfg->gpu[i];
        /* VMM: one allocation per segment, each tenant's passed to its engines alone;
         * legacy IPC (asked for explicitly): one allocation every engine maps */
        uint64_t gran = 0, seg = 0;
        if (cfg->gpu_ipc_legacy) {
            rc = gpupool_create_legacy(&g->gpu, gc->bytes, gc->uuid, &why);
        } else if (!(rc = gpupool_granularity(gc->uuid, &gran, &why))) {
            uint64_t bytes = (gc->bytes + gran - 1) / gran * gran;
            seg = cfg->segment_bytes ? cfg->segment_bytes : pool_default_seg_bytes(bytes, cfg->page_bytes);
            rc = gpupool_create(&g->gpu, bytes, seg, gc->uuid, &why);
        }
        if (rc) {
            srv_logl(SRV_LOG_ERROR, "GPU pool %u: %s%s", i, why, rc == -ENOTSUP && !cfg->gpu_ipc_legacy
                    ? " (--gpu-ipc legacy shares one CUDA IPC handle instead, without isolating "
                      "tenants)" : "");
            goto fail;
        }
        s->n_gpus = i + 1;
        g->bytes = g->gpu.bytes;
        _Static_assert(sizeof g->uuid == sizeof g->gpu.uuid, "one UUID size");
        memcpy(g->uuid, g->gpu.uuid, sizeof g->uuid); /* (snprintf: a false -Wrestrict) */
        g->uuid[sizeof g->uuid - 1] = 0;
        for (uint32_t j = 0; j < i; j++)
            if (!strcmp(s->gpus[j].uuid, g->uuid)) {
                srv_logl(SRV_LOG_ERROR, "GPU pool %u: %s already has a pool", i, g->uuid);
                rc = -EINVAL;
                goto fail;
            }
        /* the same pages and layout as the host pool: GPU sequences hold their K/V here */
        int nw = cfg->workers > 0 ? cfg->workers : (int)sysconf(_SC_NPROCESSORS_ONLN);
        struct pool_ops ops = {.fresh = srv_gpu_seg_fresh, .ud = g};
        if ((rc = pool_init_external(&g->pages, (void *)(uintptr_t)g->gpu.va, g->gpu.bytes,
                                     cfg->page_bytes, g->gpu.legacy ? g->gpu.bytes : seg, &ops,
                                     &why)) ||
            (rc = gpuexec_create(&g->x, g->gpu.device, nw, &why))) {
            srv_logl(SRV_LOG_ERROR, "GPU pool %u: %s", i, why);
            goto fail;
        }
        if (env_on("CAKED_TRACE"))
            gpuexec_set_timing(g->x, 1); /* the trace's kernel times (decode steps, stages) */
    }
    struct pool_ops hops = {.retire = srv_retire_seg, .ud = s};
    /* where a GPU exists, each host segment is registered for fast copies as it is mapped
     * (engines do the same) */
    if (s->n_gpus) {
        hops.mapped = srv_host_seg_mapped;
        s->host_registered = 1;
    }
    pool_set_ops(&s->pool, &hops);
    if ((rc = apply_tenants(s, tcfg, n_tenants)))
        goto fail;
    const char *jd = getenv("CAKED_TEST_JOB_DELAY_MS"); /* tests only: at most 60 s */
    unsigned long job_delay_ms = jd ? strtoul(jd, NULL, 10) : 0;
    job_delay_ms = job_delay_ms < 60000 ? job_delay_ms : 60000;
    const char *lw = getenv("CAKED_TEST_LAYERWISE"); /* tests only */
    unsigned long layerwise = lw ? strtoul(lw, NULL, 10) : 0;
    const char *sw = getenv("CAKED_TEST_STAGE_ON_WORKER"); /* tests only */
    unsigned long stage_worker = sw ? strtoul(sw, NULL, 10) : 0;
    s->env = (struct seq_env){
        .pool = &s->pool, .tenants = &s->tenants, .n_gpus = s->n_gpus,
        .trace = env_on("CAKED_TRACE"),
        .job_delay_us = (unsigned)job_delay_ms * 1000,
        .workers_only = env_on("CAKED_DECODE_ON_WORKERS"),
        .observe_workers = env_on("CAKED_OBSERVE_ON_WORKERS"),
        .ordered = env_on("CAKED_COMPACT_ORDERED"),
        .recompute = env_on("CAKED_DECODE_RECOMPUTE"), .shift = env_on("CAKED_DECODE_SHIFT"),
        .layerwise = layerwise < 1000 ? (unsigned)layerwise : 1000,
        .stage_worker = stage_worker < 1000 ? (unsigned)stage_worker : 1000,
        .threads = cfg->kernel_threads > 0 ? cfg->kernel_threads : 1,
        .heap_limit = cfg->heap_limit_bytes ? cfg->heap_limit_bytes : s->pool.bytes,
        .heap_used = &s->heap_used,
    };
    for (uint32_t i = 0; i < s->n_gpus; i++)
        s->env.gpu_pools[i] = &s->gpus[i].pages, s->env.gpus[i] = s->gpus[i].x;
    if ((rc = loop_create(cfg->io, &s->loop, &s->io_name, &why))) {
        srv_logl(SRV_LOG_ERROR, "event loop: %s (%s)", why ? why : "failed", strerror(-rc));
        goto fail;
    }
    if (why)
        srv_log("%s; using epoll", why);
    if ((rc = workers_start(&s->workers, cfg->workers)))
        goto fail;
    fd_limits(s);
    if ((rc = listen_on(s)))
        goto fail;
    s->sig_fd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
    if (s->sig_fd < 0 || loop_add(s->loop, s->sig_fd, LOOP_IN, on_signal, s, &s->sig_h) ||
        loop_add(s->loop, s->listen_fd, LOOP_IN, srv_on_accept, s, &s->listen_h) ||
        loop_add(s->loop, workers_fd(s->workers), LOOP_IN, on_work, s, &s->work_h)) {
        rc = -EIO;
        goto fail;
    }
    if (cfg->metrics_listen[0]) {
        char err[512];
        if ((rc = http_start(s, cfg->metrics_listen, &s->http, err, sizeof err))) {
            srv_logl(SRV_LOG_ERROR, "%s", err);
            goto fail;
        }
    }
    char pb[32], pg[32], gb[32];
    human_bytes(s->pool.bytes, pb, sizeof pb);
    human_bytes(s->pool.page_bytes, pg, sizeof pg);
    for (uint32_t i = 0; i < s->n_gpus; i++) {
        human_bytes(s->gpus[i].bytes, gb, sizeof gb);
        srv_log("GPU pool %u: %s on %s (shared by %s); host segments %s with CUDA", i, gb,
                s->gpus[i].uuid, s->gpus[i].gpu.legacy ? "one legacy IPC handle, every tenant"
                                                       : "file descriptors per segment and tenant",
                s->host_registered ? "registered" : "not registered");
    }
    char sb[32];
    human_bytes(s->pool.seg_bytes, sb, sizeof sb);
    srv_log("caked %s listening on %s (%s); host pool %s in %u pages of %s, segments of %s%s; "
           "%s event loop; %d workers", CAKE_VERSION, s->cfg.socket_path,
           s->activated ? "passed by systemd" : cfg->socket_group[0] ? "mode 0660" : "mode 0600",
           pb, s->pool.pages, pg, sb,
           s->pool.hugepages ? " (huge pages)" : "", s->io_name,
           cfg->workers > 0 ? cfg->workers : (int)sysconf(_SC_NPROCESSORS_ONLN));
    *out = s;
    return 0;
fail:
    server_destroy(s);
    return rc;
}


/* systemd's watchdog (WatchdogSec in the unit): WATCHDOG=1 twice an interval, from the loop
 * that serves the engines - and only while no worker job (nor GPU work the loop launched) has
 * run longer than the interval, so a wedged loop or a worker stuck in a call that never
 * returns (a hung GPU) gets caked restarted. Jobs waiting long (a saturated pool) do not stop it. */
static void watchdog(struct server *s)
{
    double now = clock_now_s();
    if (!s->wd_s || now - s->t_wd < s->wd_s / 2)
        return;
    struct workers_load wl;
    workers_load(s->workers, now, &wl);
    for (const struct work *w = s->flights; w; w = w->next_fl) /* the loop's launches too */
        if (now - w->t_launched > wl.oldest_running_s)
            wl.oldest_running_s = now - w->t_launched;
    if (wl.oldest_running_s >= s->wd_s) { /* stuck; a long queue alone is load, not a hang */
        if (!s->wd_withheld)
            srv_logl(SRV_LOG_ERROR, "a worker job has run %.1f s, past the watchdog's %.1f s: "
                     "systemd is no longer told caked is alive", wl.oldest_running_s, s->wd_s);
        s->wd_withheld = 1;
        return;
    }
    if (s->wd_withheld)
        srv_log("the workers move again (the longest running job %.1f s): watchdog pings resume",
                wl.oldest_running_s);
    s->wd_withheld = 0;
    s->t_wd = now;
    sd_notify(0, "WATCHDOG=1");
}

int server_run(struct server *s)
{
    /* systemd (Type=notify): serving from now on */
    sd_notifyf(0, "READY=1\nSTATUS=listening on %s\nMAINPID=%lu", s->cfg.socket_path,
               (unsigned long)getpid());
    uint64_t wd_us = 0;
    if (sd_watchdog_enabled(0, &wd_us) > 0 && wd_us)
        s->wd_s = wd_us * 1e-6, s->t_wd = -1e9;
    int tick_ms = s->wd_s && s->wd_s * 250 < 250 ? (int)(s->wd_s * 250) + 1 : 250;
    while (!s->stopping) {
        watchdog(s);
        /* GPU work the loop launched: polled between events, not slept on */
        int rc = loop_wait(s->loop, s->flights ? 0 : tick_ms);
        work_poll_flights(s);
        http_run(s->http); /* its timeouts */
        pressure_poll(s);   /* requests waiting for room: retried, or out of time */
        srv_sweep_hello(s);
        srv_free_dead(s);
        if (rc < 0) {
            srv_logl(SRV_LOG_ERROR, "event loop: %s", strerror(-rc));
            return rc;
        }
    }
    /* tell every client, stop accepting, let running work finish */
    http_stop(s->http);
    s->http = NULL;
    loop_del(s->loop, s->listen_h);
    close(s->listen_fd);
    s->listen_fd = -1;
    sockpath_unlink(&s->sp);
    while (s->n_clients) {
        srv_client_goodbye(s, s->clients[0], CAKE_ESHUTDOWN, "caked is shutting down");
    }
    srv_free_dead(s);
    while (workers_pending(s->workers) || work_poll_flights(s)) { /* the running work finishes */
        watchdog(s);
        loop_wait(s->loop, s->flights ? 0 : tick_ms < 100 ? tick_ms : 100);
    }
    srv_log("stopped");
    return 0;
}

void server_destroy(struct server *s)
{
    if (!s)
        return;
    if (s->workers)
        workers_stop(s->workers);
    for (uint32_t i = 0; i < s->n_clients; i++) {
        close(s->clients[i]->fd);
        srv_client_free(s->clients[i]);
    }
    free(s->clients);
    srv_free_dead(s);
    for (uint32_t i = 0; i < s->n_slots; i++)
        if (s->slots[i].s)
            seq_free(&s->env, s->slots[i].s);
    free(s->slots);
    while (s->groups) {
        struct shard_group *g = s->groups;
        s->groups = g->next;
        free(g);
    }
    if (s->listen_fd >= 0) {
        close(s->listen_fd);
        sockpath_unlink(&s->sp);
    }
    while (s->quarantine) {
        struct seq *q = s->quarantine;
        s->quarantine = q->next_q;
        seq_free(&s->env, q);
    }
    http_stop(s->http);
    if (s->sig_fd >= 0)
        close(s->sig_fd);
    if (s->spare_fd >= 0)
        close(s->spare_fd);
    loop_destroy(s->loop);
    for (uint32_t i = 0; i < SERVER_MAX_GPUS; i++) {
        struct srv_gpu *g = &s->gpus[i];
        gpuexec_destroy(g->x);
        pool_fini(&g->pages);
        if (i < s->n_gpus)
            gpupool_destroy(&g->gpu);
    }
    pool_fini(&s->pool); /* unregisters its segments (srv_host_seg_mapped) */
    tenants_fini(&s->tenants);
    free(s);
}
