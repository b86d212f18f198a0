/* errors.c - names of error codes, shared by caked and libcake. */
#include <string.h>

#include "cake/cake.h"

const char *cake_strerror(int err)
{
    switch (err) {
    case 0: return "success";
    case CAKE_EPROTO: return "protocol error (malformed or unexpected frame)";
    case CAKE_EVERSION: return "protocol version mismatch";
    case CAKE_EOOM: return "out of memory in the pool or over the tenant's quota";
    case CAKE_ENOSEQ: return "no such sequence";
    case CAKE_EINVAL: return "invalid argument";
    case CAKE_EPERM: return "permission denied";
    case CAKE_ESHUTDOWN: return "caked shut down or the connection closed";
    case CAKE_ETOOBIG: return "request over a size limit";
    case CAKE_ESTATE: return "request out of order";
    case CAKE_EINTERNAL: return "internal error in caked";
    case CAKE_ENOTCONN: return "not connected";
    }
    if (err < 0 && err > -4096)
        return strerror(-err);
    return "unknown error";
}
