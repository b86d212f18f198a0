/* Fuzz target for caked's configuration file (config_load: the file SIGHUP reads again while
 * caked serves): any bytes as the file's text give 0 or -1 with a message naming the file
 * and line, never a crash or a read past what was parsed; a file that loads leaves at most
 * CONFIG_MAX_TENANTS tenants, each with a valid name. Built as a libFuzzer binary with
 * -DCAKE_FUZZ=ON (clang); its corpus is replayed as an ordinary test. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "tenant.h"

static char path[64];

__attribute__((destructor)) static void cleanup(void)
{
    if (path[0]) {
        unlink(path);
        *strrchr(path, '/') = 0;
        rmdir(path);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!path[0]) { /* a file of our own, mode 0600: config_load refuses one others may write */
        strcpy(path, "/tmp/caked-fuzzconf-XXXXXX");
        if (!mkdtemp(path))
            abort();
        strcat(path, "/caked.conf");
    }
    FILE *f = fopen(path, "w");
    if (!f || fchmod(fileno(f), 0600) || fwrite(data, 1, size, f) != size || fclose(f))
        abort();
    static struct config c;
    char err[512];
    config_defaults(&c);
    err[0] = 0;
    int rc = config_load(&c, path, err, sizeof err);
    if (rc != 0 && rc != -1)
        __builtin_trap();
    if (rc && strncmp(err, path, strlen(path)))
        __builtin_trap(); /* a refusal names the file (and its line) */
    if (!rc) {
        if (c.n_tenants < 0 || c.n_tenants > CONFIG_MAX_TENANTS)
            __builtin_trap();
        for (int i = 0; i < c.n_tenants; i++)
            if (!tenant_name_ok(c.tenants[i].name))
                __builtin_trap();
    }
    return 0;
}
