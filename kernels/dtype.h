/* dtype.h - element types of keys, values and queries, and conversions to f32.
 *
 * bf16 is the upper half of an IEEE float32; f16 is IEEE binary16. Conversions are
 * static inline so the kernels' inner loops vectorize. Rounding back to a half type
 * (round to nearest even) exists only for parity mode, which reproduces the reference
 * implementation's habit of storing probabilities and statistics in the model dtype. */
#ifndef CAKE_DTYPE_H
#define CAKE_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum kern_dtype {
    KERN_F32 = 0,
    KERN_F16 = 1,
    KERN_BF16 = 2,
};

static inline size_t kern_dtype_size(enum kern_dtype t)
{
    return t == KERN_F32 ? 4 : 2;
}

/* Parses "f32"/"float32", "f16"/"fp16"/"float16", "bf16"/"bfloat16"; -1 if unknown. */
int kern_dtype_parse(const char *s);
const char *kern_dtype_name(enum kern_dtype t);

static inline float kern_bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t kern_f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float kern_bf16_to_f32(uint16_t h)
{
    return kern_bits_to_f32((uint32_t)h << 16);
}

/* Round to nearest even; NaN stays NaN (quiet). */
static inline uint16_t kern_f32_to_bf16(float f)
{
    uint32_t u = kern_f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__FLT16_MAX__)
static inline float kern_f16_to_f32(uint16_t h)
{
    _Float16 x;
    memcpy(&x, &h, sizeof x);
    return (float)x;
}

static inline uint16_t kern_f32_to_f16(float f)
{
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, sizeof h);
    return h;
}
#else
/* Portable fallback for compilers without _Float16. */
static inline float kern_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f)
        return kern_bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        float v = (float)man * (1.0f / 16777216.0f); /* man * 2^-24 */
        return sign ? -v : v;
    }
    return kern_bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t kern_f32_to_f16(float f)
{
    uint32_t u = kern_f32_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return sign | 0x7e00u;
    if (a >= 0x477ff000u) /* rounds to >= 65520: inf */
        return sign | 0x7c00u;
    if (a < 0x38800000u) { /* subnormal or zero in f16 */
        float v = kern_bits_to_f32(a) * 16777216.0f; /* in units of 2^-24 */
        uint32_t m = (uint32_t)v;
        float r = v - (float)m;
        if (r > 0.5f || (r == 0.5f && (m & 1u)))
            m++;
        return sign | (uint16_t)m;
    }
    a += 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return sign | (uint16_t)(a >> 13);
}
#endif

/* Rounds an f32 to the given dtype and back (identity for f32). */
static inline float kern_round_to(enum kern_dtype t, float f)
{
    if (t == KERN_BF16)
        return kern_bf16_to_f32(kern_f32_to_bf16(f));
    if (t == KERN_F16)
        return kern_f16_to_f32(kern_f32_to_f16(f));
    return f;
}

/* Element i of a typed array, as f32. */
static inline float kern_load(enum kern_dtype t, const void *p, size_t i)
{
    if (t == KERN_BF16)
        return kern_bf16_to_f32(((const uint16_t *)p)[i]);
    if (t == KERN_F16)
        return kern_f16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* Converts n elements to f32 (dst must not alias src). */
void kern_to_f32(enum kern_dtype t, const void *src, float *dst, size_t n);
/* Converts n f32 values to dtype t (round to nearest even). */
void kern_from_f32(enum kern_dtype t, const float *src, void *dst, size_t n);

#endif
