/* dtype.c - bulk conversions and names of element types; thread count helper. */
#include <strings.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kern.h"

int kern_dtype_parse(const char *s)
{
    if (!strcasecmp(s, "f32") || !strcasecmp(s, "float32") || !strcasecmp(s, "fp32"))
        return KERN_F32;
    if (!strcasecmp(s, "f16") || !strcasecmp(s, "float16") || !strcasecmp(s, "fp16"))
        return KERN_F16;
    if (!strcasecmp(s, "bf16") || !strcasecmp(s, "bfloat16"))
        return KERN_BF16;
    return -1;
}

const char *kern_dtype_name(enum kern_dtype t)
{
    switch (t) {
    case KERN_F32: return "f32";
    case KERN_F16: return "f16";
    case KERN_BF16: return "bf16";
    }
    return "?";
}

void kern_to_f32(enum kern_dtype t, const void *src, float *restrict dst, size_t n)
{
    if (t == KERN_F32) {
        memcpy(dst, src, n * sizeof(float));
    } else if (t == KERN_BF16) {
        const uint16_t *restrict s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = kern_bf16_to_f32(s[i]);
    } else {
        const uint16_t *restrict s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = kern_f16_to_f32(s[i]);
    }
}

void kern_from_f32(enum kern_dtype t, const float *restrict src, void *dst, size_t n)
{
    if (t == KERN_F32) {
        memcpy(dst, src, n * sizeof(float));
    } else if (t == KERN_BF16) {
        uint16_t *restrict d = dst;
        for (size_t i = 0; i < n; i++)
            d[i] = kern_f32_to_bf16(src[i]);
    } else {
        uint16_t *restrict d = dst;
        for (size_t i = 0; i < n; i++)
            d[i] = kern_f32_to_f16(src[i]);
    }
}

int kern_threads(int n)
{
    if (n > 0)
        return n;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
