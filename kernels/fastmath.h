/* fastmath.h - branch-free expf/logf that compilers vectorize inside loops.
 *
 * Accuracy about 2 ulp over the ranges the scoring kernel uses (softmax arguments <= 0,
 * probabilities in (0, 1]). Both are plain C on the float's bits, so the result is the
 * same on every machine and with every vector width. */
#ifndef CAKE_FASTMATH_H
#define CAKE_FASTMATH_H

#include <stdint.h>
#include <string.h>

/* e^x; exactly 0 below -87.3 (where f32 would go subnormal), saturates above 88. */
static inline float fm_expf(float x)
{
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x > 88.0f ? 88.0f : x;
    xc = xc < -87.0f ? -87.0f : xc;
    float fn = (xc * log2e + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = xc - fn * ln2_hi - fn * ln2_lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t n = (int32_t)fn;
    uint32_t bits = (uint32_t)(n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    return x < -87.3f ? 0.0f : y;
}

/* Natural log for x > 0 (Cephes logf polynomial). */
static inline float fm_logf(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    int32_t e = (int32_t)((u >> 23) & 0xffu) - 126;
    uint32_t mb = (u & 0x807fffffu) | 0x3f000000u; /* mantissa in [0.5, 1) */
    float m;
    memcpy(&m, &mb, sizeof m);
    int small = m < 0.707106781186547524f;
    e -= small;
    float f = small ? (m + m - 1.0f) : (m - 1.0f);
    float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z;
    float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return f + y + 0.693359375f * fe;
}

#endif
