/* gpupool.c - CUDA VMM pools shared by file descriptor (see gpupool.h). */
#include <cuda.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>
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

static int reserve_and_map(struct gpupool *p, const char **why)
{
    CUdeviceptr va;
    CU(drv.cuMemAddressReserve(&va, p->bytes, 0, 0, 0), "cuMemAddressReserve");
    CUresult r = drv.cuMemMap(va, p->bytes, 0, (CUmemGenericAllocationHandle)p->handle, 0);
    if (r != CUDA_SUCCESS) {
        drv.cuMemAddressFree(va, p->bytes);
        return fail(r, "cuMemMap", why);
    }
    CUmemAccessDesc acc = {{CU_MEM_LOCATION_TYPE_DEVICE, p->device}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    r = drv.cuMemSetAccess(va, p->bytes, &acc, 1);
    if (r != CUDA_SUCCESS) {
        drv.cuMemUnmap(va, p->bytes);
        drv.cuMemAddressFree(va, p->bytes);
        return fail(r, "cuMemSetAccess", why);
    }
    p->va = va;
    return 0;
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
    CUmemAllocationProp prop = {0};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = p->device;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    size_t g = 0;
    CU(drv.cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "granularity");
    p->granularity = g;
    p->bytes = (p->bytes + g - 1) / g * g;
    return 0;
}

int gpupool_create(struct gpupool *p, uint64_t bytes, const char *uuid, const char **why)
{
    memset(p, 0, sizeof(*p));
    p->bytes = bytes;
    int rc = setup(p, uuid, why);
    if (rc)
        return rc;
    CUmemAllocationProp prop = {0};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = p->device;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    CUmemGenericAllocationHandle h;
    CU(drv.cuMemCreate(&h, p->bytes, &prop, 0), "cuMemCreate");
    p->handle = h;
    if ((rc = reserve_and_map(p, why))) {
        drv.cuMemRelease(h);
        return rc;
    }
    return 0;
}

int gpupool_export(const struct gpupool *p, int *fd, const char **why)
{
    int out = -1;
    CU(drv.cuMemExportToShareableHandle(&out, (CUmemGenericAllocationHandle)p->handle,
                                    CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
       "cuMemExportToShareableHandle");
    *fd = out;
    return 0;
}

int gpupool_import(struct gpupool *p, int fd, uint64_t bytes, const char *uuid, const char **why)
{
    memset(p, 0, sizeof(*p));
    p->bytes = bytes;
    int rc = setup(p, uuid, why);
    if (rc)
        return rc;
    if (p->bytes != bytes) {
        *why = "pool size is not a multiple of the allocation granularity";
        return -EINVAL;
    }
    CUmemGenericAllocationHandle h;
    CU(drv.cuMemImportFromShareableHandle(&h, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
       "cuMemImportFromShareableHandle");
    p->handle = h;
    if ((rc = reserve_and_map(p, why))) {
        drv.cuMemRelease(h);
        return rc;
    }
    return 0;
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
    if (p->va) {
        drv.cuMemUnmap(p->va, p->bytes);
        drv.cuMemAddressFree(p->va, p->bytes);
    }
    if (p->handle)
        drv.cuMemRelease((CUmemGenericAllocationHandle)p->handle);
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
