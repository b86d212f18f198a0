/* Sizes, options and the configuration file. */
#include <criterion/criterion.h>
#include <sys/stat.h>
#include <stdio.h>
#include <unistd.h>

#include "config.h"
#include "http.h"
#include "pressure.h"

Test(config, sizes)
{
    uint64_t v;
    cr_assert_eq(config_parse_size("64K", &v), 0);
    cr_assert_eq(v, 65536);
    cr_assert_eq(config_parse_size("1GiB", &v), 0);
    cr_assert_eq(v, 1ull << 30);
    cr_assert_eq(config_parse_size("512mb", &v), 0);
    cr_assert_eq(v, 512ull << 20);
    cr_assert_eq(config_parse_size("12345", &v), 0);
    cr_assert_eq(v, 12345);
    cr_assert_eq(config_parse_size("-1G", &v), -1);
    cr_assert_eq(config_parse_size("1X", &v), -1);
    cr_assert_eq(config_parse_size("", &v), -1);
    cr_assert_eq(config_parse_size("99999999999T", &v), -1); /* overflow */
}

Test(config, defaults_and_options)
{
    static struct config c;
    char err[256];
    config_defaults(&c);
    cr_assert_gt(c.srv.host_pool_bytes, 0);
    cr_assert_leq(c.srv.host_pool_bytes, 1ull << 30);
    cr_assert_eq(c.srv.page_bytes, 65536);
    cr_assert(strstr(c.srv.socket_path, "caked"));
    cr_assert_eq(config_set(&c, "io", "epoll", err, sizeof err), 0);
    cr_assert_eq(c.srv.io, LOOP_EPOLL);
    cr_assert_eq(config_set(&c, "page-size", "3000", err, sizeof err), -1);
    cr_assert(strstr(err, "power of two"), "%s", err);
    cr_assert_eq(config_set(&c, "nonsense", "1", err, sizeof err), -1);
    cr_assert_eq(c.srv.metrics_listen[0], 0, "no HTTP unless asked");
    /* under pressure: re-slicing with a 5 s wait and 64-token floors unless told */
    cr_assert_eq(c.srv.pressure, PRESSURE_RESLICE);
    cr_assert_float_eq(c.srv.pressure_wait_s, 5.0, 1e-12);
    cr_assert_eq(c.srv.min_tokens, 64);
    cr_assert_eq(config_set(&c, "pressure", "refuse", err, sizeof err), 0);
    cr_assert_eq(c.srv.pressure, PRESSURE_REFUSE);
    cr_assert_eq(config_set(&c, "pressure", "park", err, sizeof err), 0);
    cr_assert_eq(c.srv.pressure, PRESSURE_PARK);
    cr_assert_eq(config_set(&c, "pressure", "shrink", err, sizeof err), -1);
    cr_assert(strstr(err, "reslice, park or refuse"), "%s", err);
    cr_assert_eq(config_set(&c, "pressure-wait", "0.25", err, sizeof err), 0);
    cr_assert_float_eq(c.srv.pressure_wait_s, 0.25, 1e-12);
    cr_assert_eq(config_set(&c, "pressure-wait", "-1", err, sizeof err), -1);
    cr_assert_eq(config_set(&c, "pressure-wait", "", err, sizeof err), -1);
    cr_assert_eq(config_set(&c, "min-tokens", "0", err, sizeof err), -1);
    cr_assert_eq(config_set(&c, "min-tokens", "12x", err, sizeof err), -1);
    cr_assert_eq(config_set(&c, "min-tokens", "256", err, sizeof err), 0);
    cr_assert_eq(c.srv.min_tokens, 256);
}

Test(config, metrics_listen_addresses)
{
    static const struct { const char *spec, *host, *port; } ok[] = {
        {"9464", "127.0.0.1", "9464"}, {"0.0.0.0:80", "0.0.0.0", "80"},
        {"*:9464", "", "9464"}, {"[::1]:9464", "::1", "9464"},
        {"metrics.local:0", "metrics.local", "0"},
    };
    char host[256], port[16], err[256];
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        cr_assert_eq(http_parse_listen(ok[i].spec, host, sizeof host, port, sizeof port), 0,
                     "%s", ok[i].spec);
        cr_assert_str_eq(host, ok[i].host, "%s", ok[i].spec);
        cr_assert_str_eq(port, ok[i].port, "%s", ok[i].spec);
    }
    static const char *const bad[] = {"", "x", ":80", "::1:80", "[::1]", "h:65536", "h:-1",
                                      "h:80x", "[]:80"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_assert_eq(http_parse_listen(bad[i], host, sizeof host, port, sizeof port), -1,
                     "%s", bad[i]);
    static struct config c;
    config_defaults(&c);
    cr_assert_eq(config_set(&c, "metrics-listen", "::1:80", err, sizeof err), -1);
    cr_assert(strstr(err, "metrics-listen"), "%s", err);
    cr_assert_eq(config_set(&c, "metrics-listen", "127.0.0.1:9464", err, sizeof err), 0);
    cr_assert_str_eq(c.srv.metrics_listen, "127.0.0.1:9464");
}

Test(config, file_with_tenants_and_errors)
{
    char path[] = "/tmp/caked-conf-XXXXXX";
    int fd = mkstemp(path);
    FILE *f = fdopen(fd, "w");
    fprintf(f, "# test\nhost-pool = 2G   # inline comment\nworkers = 3\n"
               "tenant vllm weight=2 min=1G max=6G gpu-min=8G gpu-max=40G\n"
               "tenant batch uid=1001,root,1003 max=512M pressure=refuse min-tokens=128\n");
    fclose(f);
    static struct config c;
    char err[256] = "";
    config_defaults(&c);
    cr_assert_eq(config_load(&c, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c.srv.host_pool_bytes, 2ull << 30);
    cr_assert_eq(c.srv.workers, 3);
    cr_assert_eq(c.n_tenants, 2);
    cr_assert_str_eq(c.tenants[0].name, "vllm");
    cr_assert_eq(c.tenants[0].weight, 2);
    cr_assert_eq(c.tenants[0].min_bytes, 1ull << 30);
    cr_assert_eq(c.tenants[0].max_bytes, 6ull << 30);
    cr_assert_eq(c.tenants[0].gpu_min_bytes, 8ull << 30);
    cr_assert_eq(c.tenants[0].gpu_max_bytes, 40ull << 30);
    cr_assert_eq(c.tenants[1].gpu_max_bytes, 0, "no gpu-max: the weighted share");
    cr_assert_eq(c.tenants[0].n_uids, 0, "no uid given: caked's own (server_create)");
    cr_assert_eq(c.tenants[1].n_uids, 3);
    cr_assert_eq(c.tenants[1].uids[0], 1001);
    cr_assert_eq(c.tenants[1].uids[1], 0, "user names resolve");
    cr_assert_eq(c.tenants[1].uids[2], 1003);
    cr_assert_eq(c.tenants[0].pressure, 0, "caked's --pressure");
    cr_assert_eq(c.tenants[1].pressure, PRESSURE_REFUSE);
    cr_assert_eq(c.tenants[1].min_tokens, 128);
    f = fopen(path, "w");
    fprintf(f, "tenant t pressure=sometimes\n");
    fclose(f);
    config_defaults(&c);
    cr_assert_eq(config_load(&c, path, err, sizeof err), -1);
    cr_assert(strstr(err, "reslice, park or refuse"), "%s", err);
    f = fopen(path, "w");
    fprintf(f, "tenant t uid=no-such-user-here\n");
    fclose(f);
    config_defaults(&c);
    cr_assert_eq(config_load(&c, path, err, sizeof err), -1);
    cr_assert(strstr(err, "no such user"), "%s", err);
    f = fopen(path, "w");
    fprintf(f, "host-pool = 1G\ntenant bad min=2G max=1G\n");
    fclose(f);
    config_defaults(&c);
    cr_assert_eq(config_load(&c, path, err, sizeof err), -1);
    cr_assert(strstr(err, ":2:"), "error names the line: %s", err);
    /* a comment line over the buffer: an error, never its tail parsed as options */
    f = fopen(path, "w");
    fputs("# ", f);
    for (int i = 0; i < 1100; i++)
        fputc('x', f);
    fputs(" host-pool = 8M\n", f);
    fclose(f);
    config_defaults(&c);
    uint64_t before = c.srv.host_pool_bytes;
    cr_assert_eq(config_load(&c, path, err, sizeof err), -1);
    cr_assert(strstr(err, ":1: line longer"), "%s", err);
    cr_assert_eq(c.srv.host_pool_bytes, before);
    /* a configuration another user can change is refused (it names uids and the socket) */
    f = fopen(path, "w");
    fputs("host-pool = 64M\n", f);
    fclose(f);
    chmod(path, 0666);
    cr_assert_eq(config_load(&c, path, err, sizeof err), -1);
    cr_assert(strstr(err, "mode 0666"), "%s", err);
    chmod(path, 0644);
    if (geteuid() == 0) {
        cr_assert_eq(chown(path, 65534, (gid_t)-1), 0);
        cr_assert_eq(config_load(&c, path, err, sizeof err), -1);
        cr_assert(strstr(err, "uid 65534"), "%s", err);
        cr_assert_eq(chown(path, 0, (gid_t)-1), 0);
    }
    cr_assert_eq(config_load(&c, path, err, sizeof err), 0, "%s", err);
    unlink(path);
    /* a directory is not a configuration */
    cr_assert_eq(config_load(&c, "/tmp", err, sizeof err), -1);
    cr_assert(strstr(err, "not a regular file"), "%s", err);
}
