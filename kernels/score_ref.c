/* score_ref.c - the window scoring written the obvious way in double precision.
 *
 * The yardstick for kern_score_layer and the CUDA kernels in tests: one query row at a
 * time, full softmax, then the statistics, with no tiling, no fast math and no rounding
 * to a model dtype. Slow (it stores a [n_q][n] row block per head) and meant to be. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>

#include "kern.h"

int kern_score_layer_ref(const struct kern_score_args *a, struct kern_score_out *out)
{
    const struct kern_kv *kv = a->kv;
    if (!kv || !a->q || !out || kv->kv_heads == 0 || a->q_heads % kv->kv_heads ||
        a->n_q == 0 || a->n_q > kv->n_tokens || a->n_scored > kv->n_tokens - a->n_q)
        return -EINVAL;
    uint32_t H = a->q_heads, G = H / kv->kv_heads, nq = a->n_q, n = kv->n_tokens;
    uint32_t d = kv->head_dim, S = a->n_scored;
    double scale = 1.0 / sqrt((double)d);
    double *A = malloc(sizeof(double) * (size_t)nq * n);
    double *i0 = malloc(sizeof(double) * (S ? S : 1));
    double *ind = calloc((size_t)kv->kv_heads * (S ? S : 1), sizeof(double));
    if (!A || !i0 || !ind) {
        free(A), free(i0), free(ind);
        return -ENOMEM;
    }
    double E = 0.0, V = 0.0;
    for (uint32_t h = 0; h < H; h++) {
        uint32_t g = h / G;
        for (uint32_t i = 0; i < nq; i++) {
            double *row = A + (size_t)i * n, mx = -INFINITY, sum = 0.0;
            uint32_t lim = n - nq + i + 1;
            for (uint32_t j = 0; j < n; j++) {
                if (j >= lim) {
                    row[j] = -INFINITY;
                    continue;
                }
                const void *kp = kern_kv_key(kv, g, j);
                double dot = 0.0;
                for (uint32_t x = 0; x < d; x++)
                    dot += (double)kern_load(a->q_dtype, a->q, ((size_t)h * nq + i) * d + x) *
                           (double)kern_load(kv->dtype, kp, x);
                row[j] = dot * scale;
                if (row[j] > mx)
                    mx = row[j];
            }
            for (uint32_t j = 0; j < n; j++)
                sum += row[j] == -INFINITY ? 0.0 : exp(row[j] - mx);
            for (uint32_t j = 0; j < n; j++)
                row[j] = row[j] == -INFINITY ? 0.0 : exp(row[j] - mx) / sum;
            for (uint32_t j = 0; j < S; j++)
                E -= row[j] * log(row[j] + 1e-10);
        }
        for (uint32_t j = 0; j < S; j++) {
            double mean = 0.0, var = 0.0;
            for (uint32_t i = 0; i < nq; i++)
                mean += A[(size_t)i * n + j];
            mean /= nq;
            if (nq >= 2) {
                for (uint32_t i = 0; i < nq; i++) {
                    double dl = A[(size_t)i * n + j] - mean;
                    var += dl * dl;
                }
                var /= nq - 1;
            }
            V += var;
            i0[j] = a->var_only ? var : mean + (double)a->gamma * var;
        }
        int64_t r = a->pool_kernel ? a->pool_kernel / 2 : 2;
        for (uint32_t j = 0; j < S; j++) {
            double s = 0.0, m = -INFINITY;
            for (int64_t o = -r; o <= r; o++) {
                int64_t jj = (int64_t)j + o;
                if (jj >= 0 && jj < S)
                    s += i0[jj], m = i0[jj] > m ? i0[jj] : m;
            }
            double p = a->pool == KERN_POOL_AVG ? s / (double)(2 * r + 1)
                     : a->pool == KERN_POOL_MAX ? m : i0[j];
            ind[(size_t)g * S + j] += p / G;
        }
    }
    for (size_t x = 0; x < (size_t)kv->kv_heads * S; x++)
        out->indicator[x] = (float)ind[x];
    out->entropy = E, out->variance = V;
    free(A), free(i0), free(ind);
    return 0;
}
