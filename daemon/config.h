/* config.h - caked's command line and optional configuration file. */
#ifndef CAKE_CONFIG_H
#define CAKE_CONFIG_H

#include <stdint.h>

#include "server.h"

#define CONFIG_MAX_TENANTS 256

struct config {
    struct server_cfg srv;
    struct tenant_cfg tenants[CONFIG_MAX_TENANTS];
    int n_tenants;
};

/* Parses "64K", "1G", "512MiB", "1048576"; 0 on success, -1 on bad input or overflow. */
int config_parse_size(const char *s, uint64_t *out);

/* Defaults: socket under $XDG_RUNTIME_DIR (else /tmp/caked-$UID/), a host pool of
 * min(1 GiB, a quarter of RAM), 64 KiB pages, io auto, one worker per core. */
void config_defaults(struct config *c);

/* Reads FILE: "key = value" lines (socket, socket-group, host-pool, page-size, huge-pages,
 * io, workers, kernel-threads, admin-group, segment-size) and "tenant NAME [uid=UID,...]
 * [weight=N] [min=SIZE] [max=SIZE]" (uid: numbers or user names, default caked's own uid);
 * '#' comments. Returns 0 or -1 with "file:line: message" in err. */
int config_load(struct config *c, const char *path, char *err, int errlen);

/* Applies one option (the same keys as the file); returns 0 or -1 with a message. */
int config_set(struct config *c, const char *key, const char *value, char *err, int errlen);

#endif
