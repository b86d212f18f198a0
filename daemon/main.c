/* caked - the CAKE KV-cache daemon.
 *
 *   caked [--socket PATH] [--host-pool SIZE] [--page-size SIZE] [--gpu-pool SIZE[@UUID]] [--gpu-ipc auto|legacy] [--huge-pages]
 *         [--io uring|epoll|auto] [--workers N] [--kernel-threads N]
 *         [--socket-group NAME] [--admin-group NAME] [--segment-size SIZE] [--heap-limit SIZE]
 *         [--metrics-listen [HOST:]PORT] [--config FILE]
 *         [--max-clients-per-uid N] [--hello-timeout SECS]
 *         [--pressure reslice|park|refuse] [--pressure-wait SECS] [--min-tokens N]
 *         [--version] [--help]
 *
 * Runs in the foreground and logs to stderr (a service manager captures both). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cake/cake.h"
#include "config.h"
#include "server.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: caked [options]\n"
            "  --socket PATH         control socket (default $XDG_RUNTIME_DIR/caked.sock,\n"
            "                        else /tmp/caked-$UID/caked.sock)\n"
            "  --host-pool SIZE      host pool size, e.g. 512M, 8G (default min(1G, RAM/4))\n"
            "  --page-size SIZE      pool page size, power of two (default 64K)\n"
            "  --heap-limit SIZE     caked's own memory for sequences (indicators, selection\n"
            "                        buffers), shared by tenants by weight (default: host pool)\n"
            "  --gpu-pool SIZE[@GPU-UUID]  device memory shared with engines (CUDA VMM)\n"
            "  --gpu-ipc auto|legacy  share it by VMM fds, per tenant (legacy: one CUDA IPC handle\n"
            "                        that every engine maps: no isolation between tenants)\n"
            "  --huge-pages          back the pool with huge pages when the system has them\n"
            "  --io uring|epoll|auto event loop backend (default auto: io_uring if usable)\n"
            "  --workers N           scoring threads (default: one per core)\n"
            "  --kernel-threads N    threads inside one scoring job (default 1)\n"
            "  --socket-group NAME   let this group connect (socket mode 0660; default 0600)\n"
            "  --admin-group NAME    members may administer (quotas, every tenant's details);\n"
            "                        root and caked's own uid always may\n"
            "  --segment-size SIZE   pool segment: the unit of memory a tenant maps (default\n"
            "                        4M, larger for pools over 4G: at most 1024 segments)\n"
            "  --max-clients-per-uid N  connections a uid other than root and caked's may hold\n"
            "                        (default: half the client limit)\n"
            "  --hello-timeout SECS  a connection that has not sent HELLO by then is closed (5)\n"
            "  --pressure reslice|park|refuse  when a request's pages do not fit: lower the\n"
            "                        budgets of the tenant's running sequences by CAKE's own\n"
            "                        scores and let it wait for the room (default reslice),\n"
            "                        park idle GPU sequences in host memory first, or refuse\n"
            "  --pressure-wait SECS  how long a request may wait for room (default 5)\n"
            "  --min-tokens N        no re-slice leaves a layer fewer tokens (default 64)\n"
            "  --log-level LEVEL     error, warning, info (default: attaches, departures,\n"
            "                        refusals) or debug\n"
            "  --metrics-listen [HOST:]PORT  serve Prometheus metrics at http://HOST:PORT/metrics\n"
            "                        and /healthz (HOST default 127.0.0.1; * every address;\n"
            "                        default off)\n"
            "  --config FILE         options and tenants (caked.conf(5))\n"
            "  -V, --version, -h, --help\n"
            "man caked, man caked.conf, man cachectl\n");
}

int main(int argc, char **argv)
{
    static struct config cfg;
    config_defaults(&cfg);
    static const struct option opts[] = {
        {"socket", 1, 0, 's'}, {"host-pool", 1, 0, 'p'}, {"page-size", 1, 0, 'P'},
        {"gpu-pool", 1, 0, 'G'}, {"gpu-ipc", 1, 0, 'I'},
        {"huge-pages", 0, 0, 'H'}, {"io", 1, 0, 'i'}, {"workers", 1, 0, 'w'},
        {"kernel-threads", 1, 0, 'k'}, {"socket-group", 1, 0, 'g'}, {"config", 1, 0, 'c'},
        {"admin-group", 1, 0, 'A'}, {"segment-size", 1, 0, 'S'},
        {"max-clients-per-uid", 1, 0, 'U'}, {"hello-timeout", 1, 0, 'T'},
        {"heap-limit", 1, 0, 'L'}, {"log-level", 1, 0, 'l'}, {"metrics-listen", 1, 0, 'M'},
        {"pressure", 1, 0, 'R'}, {"pressure-wait", 1, 0, 'W'}, {"min-tokens", 1, 0, 'm'},
        {"version", 0, 0, 'V'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0},
    };
    static const char *const keys[128] = {
        ['s'] = "socket", ['p'] = "host-pool", ['P'] = "page-size", ['i'] = "io", ['G'] = "gpu-pool", ['I'] = "gpu-ipc",
        ['w'] = "workers", ['k'] = "kernel-threads", ['g'] = "socket-group",
        ['A'] = "admin-group", ['S'] = "segment-size", ['U'] = "max-clients-per-uid",
        ['T'] = "hello-timeout", ['L'] = "heap-limit", ['l'] = "log-level", ['M'] = "metrics-listen",
        ['R'] = "pressure", ['W'] = "pressure-wait", ['m'] = "min-tokens",
    };
    char err[512];
    /* the config file first, so the command line overrides it */
    for (int i = 1; i < argc; i++) {
        const char *file = !strcmp(argv[i], "--config") && i + 1 < argc ? argv[i + 1]
                           : !strncmp(argv[i], "--config=", 9)          ? argv[i] + 9
                                                                        : NULL;
        if (file && config_load(&cfg, file, err, sizeof err)) {
            fprintf(stderr, "caked: %s\n", err);
            return 2;
        }
        if (file && !realpath(file, cfg.srv.config_path)) /* read again on SIGHUP */
            snprintf(cfg.srv.config_path, sizeof cfg.srv.config_path, "%s", file);
    }
    int o;
    while ((o = getopt_long(argc, argv, "hV", opts, NULL)) != -1) {
        switch (o) {
        case 'c': break;
        case 'H': cfg.srv.hugepages = 1; break;
        case 'V': printf("caked %s (protocol %d)\n", CAKE_VERSION, CAKE_PROTOCOL_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        case '?': usage(stderr); return 2;
        default:
            if (config_set(&cfg, keys[o], optarg, err, sizeof err)) {
                fprintf(stderr, "caked: %s\n", err);
                return 2;
            }
        }
    }
    if (optind < argc) {
        usage(stderr);
        return 2;
    }
    struct server *s;
    if (server_create(&cfg.srv, cfg.tenants, cfg.n_tenants, &s))
        return 1;
    int rc = server_run(s);
    server_destroy(s);
    return rc ? 1 : 0;
}
