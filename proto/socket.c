/* socket.c - the default control socket path, shared by caked, libcake and cachectl. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "cake/cake.h"

int cake_default_socket(char *buf, size_t len)
{
    const char *e = getenv("CAKED_SOCKET"), *x = getenv("XDG_RUNTIME_DIR");
    int n;
    if (e && *e)
        n = snprintf(buf, len, "%s", e);
    else if (x && *x)
        n = snprintf(buf, len, "%s/caked.sock", x);
    else
        n = snprintf(buf, len, "/tmp/caked-%u/caked.sock", (unsigned)getuid());
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}
