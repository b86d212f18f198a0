/* gpupool.c - CUDA VMM pools shared by file descriptor (see gpupool.h). */
#include <cuda.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpupool.h"

/* The driver API is reached through the runtime (cudaGetDriverEntryPointByVersion) rather than
 * by linking libcuda: programs then start on machines without a driver and say so. */
#define DRIVER_FNS(X)                                                                      \
    X(cuInit) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDeviceGetUuid)                        \
    X(cuMemGetAllocationGranularity) X(cuMemCreate) X(cuMemRelease) X(cuMemAddressReserve) \
    X(cuMemAddressFree) X(cuMemMap) X(cuMemUnmap) X(cuMemSetAccess)                        \
    X(cuMemExportToShareableHandle) X(cuMemImportFromShareableHandle) X(cuGetErrorString)

static struct {
#define FIELD(name) __typeof__(&name) name;
    DRIVER_FNS(FIELD)
#undef FIELD
    int loaded;
} drv;

static int load_driver(const char **why)
{
    if (drv.loaded)
        return drv.loaded > 0 ? 0 : -ENOTSUP;
    drv.loaded = -1;
    enum cudaDriverEntryPointQueryResult q;
#define LOAD(name)                                                                        \
    if (cudaGetDriverEntryPointByVersion(#name, (void **)&drv.name, 12000, cudaEnableDefault, \
                                         &q) != cudaSuccess || q != cudaDriverEntryPointSuccess) { \
        *why = "the CUDA driver is not available (" #name ")";                            \
        return -ENOTSUP;                                                                  \
    }
    DRIVER_FNS(LOAD)
#undef LOAD
    drv.loaded = 1;
    return 0;
}

static int fail(CUresult r, const char *what, const char **why)
{
    const char *s = NULL;
    if (drv.cuGetErrorString)
        drv.cuGetErrorString(r, &s);
    static __thread char buf[160];
    snprintf(buf, sizeof buf, "%s: %s", what, s ? s : "CUDA error");
    *why = buf;
    return r == CUDA_ERROR_OUT_OF_MEMORY ? -ENOMEM : r == CUDA_ERROR_NOT_SUPPORTED ? -ENOTSUP : -EIO;
}

#define CU(call, what)                          \
    do {                                        \
        CUresult r_ = (call);                   \
        if (r_ != CUDA_SUCCESS)                 \
            return fail(r_, what, why);         \
    } while (0)

static void format_uuid(const CUuuid *u, char *out, size_t len)
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, len, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12],
             b[13], b[14], b[15]);
}

/* The ordinal of the GPU with this UUID (NULL/"": 0). */
static int find_device(const char *uuid, int *dev, char *name, const char **why)
{
    int n = 0, rc = load_driver(why);
    if (rc)
        return rc;
    CU(drv.cuInit(0), "cuInit");
    CU(drv.cuDeviceGetCount(&n), "cuDeviceGetCount");
    for (int i = 0; i < n; i++) {
        CUdevice d;
        CUuuid u;
        CU(drv.cuDeviceGet(&d, i), "cuDeviceGet");
        CU(drv.cuDeviceGetUuid(&u, d), "cuDeviceGetUuid");
        format_uuid(&u, name, 48);
        if (!uuid || !uuid[0] || !strcasecmp(uuid, name) || !strcasecmp(uuid, name + 4)) {
            *dev = i;
            return 0;
        }
    }
    *why = n ? "no GPU with that UUID (nvidia-smi -L lists them)" : "no CUDA device";
    return -ENODEV;
}

static void alloc_prop(CUmemAllocationProp *prop, int device)
{
    memset(prop, 0, sizeof(*prop));
    prop->type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop->location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop->location.id = device;
    prop->requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
}

static int setup(struct gpupool *p, const char *uuid, const char **why)
{
    int rc = find_device(uuid, &p->device, p->uuid, why);
    if (rc)
        return rc;
    /* the runtime's primary context, so kernels launched through it see the mapping */
    if (cudaSetDevice(p->device) != cudaSuccess || cudaFree(0) != cudaSuccess) {
        *why = "cannot make a CUDA context on that GPU";
        return -EIO;
    }
    CUmemAllocationProp prop;
    alloc_prop(&prop, p->device);
    size_t g = 0;
    CU(drv.cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "granularity");
    p->granularity = g;
    p->bytes = (p->bytes + g - 1) / g * g;
    return 0;
}

int gpupool_granularity(const char *uuid, uint64_t *g, const char **why)
{
    struct gpupool p;
    memset(&p, 0, sizeof p);
    int rc = setup(&p, uuid, why);
    *g = p.granularity;
    return rc;
}

int gpupool_create(struct gpupool *p, uint64_t bytes, uint64_t seg_bytes, const char *uuid,
                   const char **why)
{
    memset(p, 0, sizeof(*p));
    p->bytes = bytes;
    int rc = setup(p, uuid, why);
    if (rc)
        return rc;
    if (!seg_bytes || seg_bytes % p->granularity) {
        *why = "GPU pool segments must be a multiple of the allocation granularity";
        return -EINVAL;
    }
    p->seg_bytes = seg_bytes;
    p->n_segs = (uint32_t)((p->bytes + seg_bytes - 1) / seg_bytes);
    if (!(p->seg = calloc(p->n_segs, sizeof(*p->seg)))) {
        *why = "out of memory";
        return -ENOMEM;
    }
    CUdeviceptr va;
    CUresult r = drv.cuMemAddressReserve(&va, p->bytes, 0, 0, 0);
    if (r != CUDA_SUCCESS) {
        free(p->seg);
        p->seg = NULL;
        return fail(r, "cuMemAddressReserve", why);
    }
    p->va = va;
    return 0;
}

uint64_t gpupool_seg_len(const struct gpupool *p, uint32_t i)
{
    uint64_t off = (uint64_t)i * p->seg_bytes;
    return p->bytes - off < p->seg_bytes ? p->bytes - off : p->seg_bytes;
}

/* Maps handle h as segment i of this process's range, readable and writable by its GPU. */
static int map_seg(struct gpupool *p, uint32_t i, CUmemGenericAllocationHandle h, const char **why)
{
    CUdeviceptr at = p->va + (uint64_t)i * p->seg_bytes;
    uint64_t len = gpupool_seg_len(p, i);
    CU(drv.cuMemMap(at, len, 0, h, 0), "cuMemMap");
    CUmemAccessDesc acc = {{CU_MEM_LOCATION_TYPE_DEVICE, p->device}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    CUresult r = drv.cuMemSetAccess(at, len, &acc, 1);
    if (r != CUDA_SUCCESS) {
        drv.cuMemUnmap(at, len);
        return fail(r, "cuMemSetAccess", why);
    }
    p->seg[i] = h;
    return 0;
}

void gpupool_seg_drop(struct gpupool *p, uint32_t i)
{
    if (!p->seg || i >= p->n_segs || !p->seg[i])
        return;
    /* an empty segment: no kernel of caked's reads it; an engine's own kernels over pages
     * it no longer holds are its bug */
    drv.cuMemUnmap(p->va + (uint64_t)i * p->seg_bytes, gpupool_seg_len(p, i));
    drv.cuMemRelease((CUmemGenericAllocationHandle)p->seg[i]);
    p->seg[i] = 0;
}

int gpupool_seg_fresh(struct gpupool *p, uint32_t i, const char **why)
{
    if (i >= p->n_segs) {
        *why = "no such GPU pool segment";
        return -EINVAL;
    }
    gpupool_seg_drop(p, i);
    CUmemAllocationProp prop;
    alloc_prop(&prop, p->device);
    CUmemGenericAllocationHandle h;
    CU(drv.cuMemCreate(&h, gpupool_seg_len(p, i), &prop, 0), "cuMemCreate");
    int rc = map_seg(p, i, h, why);
    if (rc)
        drv.cuMemRelease(h);
    return rc;
}

int gpupool_seg_export(const struct gpupool *p, uint32_t i, int *fd, const char **why)
{
    if (i >= p->n_segs || !p->seg[i]) {
        *why = "GPU pool segment has no memory";
        return -EINVAL;
    }
    int out = -1;
    CU(drv.cuMemExportToShareableHandle(&out, (CUmemGenericAllocationHandle)p->seg[i],
                                        CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
       "cuMemExportToShareableHandle");
    *fd = out;
    return 0;
}

int gpupool_seg_import(struct gpupool *p, uint32_t i, int fd, const char **why)
{
    if (i >= p->n_segs) {
        *why = "no such GPU pool segment";
        return -EINVAL;
    }
    gpupool_seg_drop(p, i);
    CUmemGenericAllocationHandle h;
    CU(drv.cuMemImportFromShareableHandle(&h, (void *)(uintptr_t)fd,
                                          CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
       "cuMemImportFromShareableHandle");
    int rc = map_seg(p, i, h, why);
    if (rc)
        drv.cuMemRelease(h);
    return rc;
}

int gpupool_create_legacy(struct gpupool *p, uint64_t bytes, const char *uuid, const char **why)
{
    memset(p, 0, sizeof(*p));
    p->bytes = bytes;
    int rc = setup(p, uuid, why);
    if (rc)
        return rc;
    void *d = NULL;
    cudaIpcMemHandle_t h;
    if (cudaMalloc(&d, p->bytes) != cudaSuccess) {
        *why = "cudaMalloc of the GPU pool failed";
        return -ENOMEM;
    }
    if (cudaIpcGetMemHandle(&h, d) != cudaSuccess) {
        cudaFree(d);
        *why = "cudaIpcGetMemHandle failed";
        return -ENOTSUP;
    }
    memcpy(p->ipc, &h, sizeof p->ipc);
    p->va = (uint64_t)(uintptr_t)d, p->legacy = 1;
    return 0;
}

int gpupool_import_legacy(struct gpupool *p, const void *ipc, uint64_t bytes, const char *uuid,
                          const char **why)
{
    memset(p, 0, sizeof(*p));
    p->bytes = bytes;
    int rc = find_device(uuid, &p->device, p->uuid, why);
    if (rc)
        return rc;
    cudaIpcMemHandle_t h;
    memcpy(&h, ipc, sizeof h);
    void *d = NULL;
    if (cudaSetDevice(p->device) != cudaSuccess ||
        cudaIpcOpenMemHandle(&d, h, cudaIpcMemLazyEnablePeerAccess) != cudaSuccess) {
        *why = "cudaIpcOpenMemHandle failed";
        return -EIO;
    }
    p->va = (uint64_t)(uintptr_t)d, p->legacy = 2;
    return 0;
}

void gpupool_destroy(struct gpupool *p)
{
    if (p->legacy) {
        if (p->legacy == 1)
            cudaFree((void *)(uintptr_t)p->va);
        else
            cudaIpcCloseMemHandle((void *)(uintptr_t)p->va);
        memset(p, 0, sizeof(*p));
        return;
    }
    for (uint32_t i = 0; p->seg && i < p->n_segs; i++)
        gpupool_seg_drop(p, i);
    if (p->va)
        drv.cuMemAddressFree(p->va, p->bytes);
    free(p->seg);
    memset(p, 0, sizeof(*p));
}

int gpupool_register_host(void *addr, size_t bytes, const char **why)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || !n) {
        *why = "no CUDA device";
        return -ENOTSUP;
    }
    cudaError_t e = cudaHostRegister(addr, bytes, cudaHostRegisterDefault);
    if (e != cudaSuccess) {
        *why = cudaGetErrorString(e);
        return -EIO;
    }
    return 0;
}

void gpupool_unregister_host(void *addr)
{
    cudaHostUnregister(addr);
}
