/* ticketlab's CSR products, float32, one CPU thread each; built by sparse_kernel.py. Inference:
 * y = x W^T + b (ticketlab_csr_linear). Training on features-first activations, at the end of
 * this file: A @ X^T and A^T @ G (ticketlab_csr_rows), the weight gradient at the survivors
 * (ticketlab_sampled_dot), and the features-first copy of a batch they read (ticketlab_transpose).
 * Also one masked Adam update (ticketlab_adam), which trains the dense path's pruned layers.
 *
 * Why a kernel of our own: torch's CSR product (MKL) runs LeNet-300-100's 784x300 layer at 5% of
 * the weights at ~17 GFLOP/s, too slow to make a ticket much faster than the dense network.
 * Here, for each tile of 32 input rows, the tile is transposed into a buffer (16x16 blocks in
 * registers), so that the inputs a surviving weight multiplies are 32 contiguous floats; each
 * output row then accumulates its survivors as 16-wide vector multiply-adds (GCC/Clang vector
 * extensions: AVX-512, AVX2 or NEON, whichever -march=native gives) and the tile of outputs is
 * transposed back. One input row (batch 1) takes a gather loop instead.
 *
 * Summation order differs from a dense matmul's (and between the two paths), so results equal
 * nn.Linear's up to float rounding. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define GROUPS 2
#define TILE (16 * GROUPS)

typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));

#if defined(__clang__)
#define INTERLEAVE_LO(a, b) \
    __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)
#define INTERLEAVE_HI(a, b) \
    __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)
#else
static const vi lo_lanes = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
static const vi hi_lanes = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
#define INTERLEAVE_LO(a, b) __builtin_shuffle(a, b, lo_lanes)
#define INTERLEAVE_HI(a, b) __builtin_shuffle(a, b, hi_lanes)
#endif

/* Rows v[0..15] of a 16x16 block become its columns: four rounds of interleaving row i with
 * row i + 8. */
static inline void transpose16(vf v[16])
{
    for (int round = 0; round < 4; round++) {
        vf next[16];
        for (int i = 0; i < 8; i++) {
            next[2 * i] = INTERLEAVE_LO(v[i], v[i + 8]);
            next[2 * i + 1] = INTERLEAVE_HI(v[i], v[i + 8]);
        }
        for (int i = 0; i < 16; i++) v[i] = next[i];
    }
}

#ifdef __AVX512F__
/* One row's products summed as 16 lanes: x gathered 16 survivors at a time. */
static inline __m512 row_lanes(const float *restrict x, const int32_t *restrict indices,
                               const float *restrict data, int32_t k, int32_t end)
{
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= end; k += 16) {
        __m512i idx = _mm512_loadu_si512((const void *)(indices + k));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(data + k), _mm512_i32gather_ps(idx, x, 4), acc);
    }
    if (k < end) {
        __mmask16 m = (__mmask16)((1u << (end - k)) - 1u);
        __m512i idx = _mm512_maskz_loadu_epi32(m, indices + k);
        __m512 xs = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, x, 4);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, data + k), xs, acc);
    }
    return acc;
}
#endif

/* One input row: y[r] = b[r] + sum_k data[k] * x[indices[k]]. With AVX-512, 16 rows' lane sums
 * are reduced together by one 16x16 transpose rather than 16 horizontal reductions. */
static void csr_vector(const float *restrict x, const int32_t *restrict indptr,
                       const int32_t *restrict indices, const float *restrict data,
                       const float *restrict bias, int64_t n_out, float *restrict y)
{
    int64_t r = 0;
#ifdef __AVX512F__
    for (; r + 16 <= n_out; r += 16) {
        vf lanes[16];
        for (int i = 0; i < 16; i++)
            lanes[i] = (vf)row_lanes(x, indices, data, indptr[r + i], indptr[r + i + 1]);
        transpose16(lanes);
        vf sum = bias ? *(const vf *)(bias + r) : (vf){0};
        for (int i = 0; i < 16; i++) sum += lanes[i];
        *(vf *)(y + r) = sum;
    }
    for (; r < n_out; r++) {
        const float sum = _mm512_reduce_add_ps(row_lanes(x, indices, data, indptr[r], indptr[r + 1]));
        y[r] = (bias ? bias[r] : 0.0f) + sum;
    }
#else
    for (; r < n_out; r++) {
        int32_t k = indptr[r];
        const int32_t end = indptr[r + 1];
        float partial[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (; k + 4 <= end; k += 4)
            for (int i = 0; i < 4; i++) partial[i] += data[k + i] * x[indices[k + i]];
        for (; k < end; k++) partial[0] += data[k] * x[indices[k]];
        y[r] = (bias ? bias[r] : 0.0f) + ((partial[0] + partial[1]) + (partial[2] + partial[3]));
    }
#endif
}

/* Rows b0 .. b0+w-1 of x (w <= TILE), as columns of xt[c * TILE + j]; missing rows are zeros. */
static void gather_tile(const float *restrict x, int64_t w, int64_t n_in, int64_t ldx,
                        float *restrict xt)
{
    int64_t c0 = 0;
    if (w == TILE) {
        for (; c0 + 16 <= n_in; c0 += 16)
            for (int g = 0; g < GROUPS; g++) {
                vf v[16];
                for (int j = 0; j < 16; j++) v[j] = *(const vf *)(x + (16 * g + j) * ldx + c0);
                transpose16(v);
                for (int c = 0; c < 16; c++) *(vf *)(xt + (c0 + c) * TILE + 16 * g) = v[c];
            }
    } else {
        memset(xt, 0, sizeof(float) * (size_t)n_in * TILE);
    }
    for (int64_t c = c0; c < n_in; c++)
        for (int64_t j = 0; j < w; j++) xt[c * TILE + j] = x[j * ldx + c];
}

/* yt[r * TILE + j] for j < w, back into rows of y. */
static void scatter_tile(const float *restrict yt, int64_t w, int64_t n_out, float *restrict y)
{
    int64_t r0 = 0;
    if (w == TILE) {
        for (; r0 + 16 <= n_out; r0 += 16)
            for (int g = 0; g < GROUPS; g++) {
                vf v[16];
                for (int i = 0; i < 16; i++) v[i] = *(const vf *)(yt + (r0 + i) * TILE + 16 * g);
                transpose16(v);
                for (int j = 0; j < 16; j++) *(vf *)(y + (16 * g + j) * n_out + r0) = v[j];
            }
    }
    for (int64_t j = 0; j < w; j++)
        for (int64_t r = r0; r < n_out; r++) y[j * n_out + r] = yt[r * TILE + j];
}

/* The tile buffers, kept per thread and grown as needed, 64-byte aligned: a vector load that
 * straddles two cache lines made LeNet's 784x300 layer at batch 256 1.6x slower. */
static __thread float *scratch = NULL;
static __thread size_t scratch_floats = 0;

static float *tile_buffers(size_t floats)
{
    if (floats > scratch_floats) {
        void *grown = NULL;
        if (posix_memalign(&grown, 64, sizeof(float) * floats) != 0) return NULL;
        free(scratch);
        scratch = grown;
        scratch_floats = floats;
    }
    return scratch;
}

/* A layer's weight, made once by sparse_kernel.py: a call then passes five arguments, not ten
 * (ctypes converts each one, a visible cost at batch 1). */
struct ticketlab_csr {
    const int32_t *indptr;
    const int32_t *indices;
    const float *data;
    const float *bias; /* or NULL */
    int64_t n_in;
    int64_t n_out;
};

/* x: [batch, n_in] with row stride ldx, y: [batch, n_out] contiguous. Returns 0, or -1 when
 * the tile buffers cannot be allocated. */
int ticketlab_csr_linear(const struct ticketlab_csr *weight, const float *restrict x,
                         int64_t batch, int64_t ldx, float *restrict y)
{
    const int32_t *restrict indptr = weight->indptr;
    const int32_t *restrict indices = weight->indices;
    const float *restrict data = weight->data;
    const float *restrict bias = weight->bias;
    const int64_t n_in = weight->n_in, n_out = weight->n_out;
    if (batch < 4) {
        for (int64_t b = 0; b < batch; b++)
            csr_vector(x + b * ldx, indptr, indices, data, bias, n_out, y + b * n_out);
        return 0;
    }
    float *xt = tile_buffers((size_t)(n_in + n_out) * TILE);
    if (!xt) return -1;
    float *yt = xt + (size_t)n_in * TILE;
    for (int64_t b0 = 0; b0 < batch; b0 += TILE) {
        const int64_t w = batch - b0 < TILE ? batch - b0 : TILE;
        gather_tile(x + b0 * ldx, w, n_in, ldx, xt);
        for (int64_t r = 0; r < n_out; r++) {
            const vf start = (vf){0} + (bias ? bias[r] : 0.0f);
            vf even[GROUPS], odd[GROUPS];
            for (int g = 0; g < GROUPS; g++) {
                even[g] = start;
                odd[g] = (vf){0};
            }
            int32_t k = indptr[r];
            const int32_t end = indptr[r + 1];
            for (; k + 2 <= end; k += 2) {
                const float *p = xt + (int64_t)indices[k] * TILE;
                const float *q = xt + (int64_t)indices[k + 1] * TILE;
                for (int g = 0; g < GROUPS; g++) {
                    even[g] += data[k] * *(const vf *)(p + 16 * g);
                    odd[g] += data[k + 1] * *(const vf *)(q + 16 * g);
                }
            }
            if (k < end) {
                const float *p = xt + (int64_t)indices[k] * TILE;
                for (int g = 0; g < GROUPS; g++) even[g] += data[k] * *(const vf *)(p + 16 * g);
            }
            for (int g = 0; g < GROUPS; g++) *(vf *)(yt + r * TILE + 16 * g) = even[g] + odd[g];
        }
        scatter_tile(yt, w, n_out, y + b0 * n_out);
    }
    return 0;
}

/* ---- Training: features-first activations, rows of `batch` contiguous floats ----------------
 *
 * The stacked trainer's sparse path (train/sparse_linear.py) keeps activations as [features,
 * batch], so a survivor's inputs are already one contiguous row and no transpose is needed. Rows
 * are covered by 16-wide chunks; when batch is not a multiple of 16 the last chunk starts at
 * batch - 16 and overlaps the one before it. Every lane is summed in the order of the survivors,
 * so the overlapping lanes are computed twice identically. batch < 16 is not taken here. */

/* What a chunk's sums become on the way out: ``relu`` keeps them where they are not negative
 * (NaN and -0 kept, as torch's ReLU does), ``gate`` where the same lanes of the gate row are not
 * <= 0 (torch's ReLU backward: the gradient where the ReLU's output is positive or NaN, else +0).
 * Bitwise selects, so a kept value is the sum itself: fusing changes no bit. */
static inline __attribute__((always_inline)) vf finish(vf acc, int relu, const float *restrict g)
{
    if (relu) acc = (vf)((vi)acc & ~(acc < (vf){0}));
    if (g) acc = (vf)((vi)acc & ~(*(const vf *)g <= (vf){0}));
    return acc;
}

static inline __attribute__((always_inline)) void
rows_chunks(const float *restrict xt, int64_t batch, const int32_t *restrict indices,
            const float *restrict values, int32_t k0, int32_t k1, float start, float *restrict out,
            int64_t first_chunk, const int n, int relu, const float *restrict gate)
{
    int64_t off[4];
    vf acc[4];
    for (int i = 0; i < n; i++) {
        const int64_t o = 16 * (first_chunk + i);
        off[i] = o + 16 <= batch ? o : batch - 16;
        acc[i] = (vf){0} + start;
    }
    for (int32_t k = k0; k < k1; k++) {
        const float v = values[k];
        const float *p = xt + (int64_t)indices[k] * batch;
        for (int i = 0; i < n; i++) acc[i] += v * *(const vf *)(p + off[i]);
    }
    for (int i = 0; i < n; i++)
        *(vf *)(out + off[i]) = finish(acc[i], relu, gate ? gate + off[i] : 0);
}

/* yt[r, :] = bias[r] + sum over row r's survivors k of values[k] * xt[indices[k], :], then the
 * ReLU (relu != 0) or the gate of gate[r, :] (gate != NULL) of ``finish``. Fusing them saves a
 * pass over the activations: at a sparse level that pass costs as much as the product. */
void ticketlab_csr_rows(const int32_t *restrict indptr, const int32_t *restrict indices,
                        const float *restrict values, const float *restrict bias, int64_t n_rows,
                        const float *restrict xt, int64_t batch, float *restrict yt, int relu,
                        const float *restrict gate)
{
    const int64_t chunks = (batch + 15) / 16;
    for (int64_t r = 0; r < n_rows; r++) {
        const float start = bias ? bias[r] : 0.0f;
        const float *g = gate ? gate + r * batch : 0;
        for (int64_t c = 0; c < chunks; c += 4) {
            const int64_t n = chunks - c < 4 ? chunks - c : 4;
            float *out = yt + r * batch;
            const int32_t k0 = indptr[r], k1 = indptr[r + 1];
            if (n == 4)
                rows_chunks(xt, batch, indices, values, k0, k1, start, out, c, 4, relu, g);
            else if (n == 3)
                rows_chunks(xt, batch, indices, values, k0, k1, start, out, c, 3, relu, g);
            else if (n == 2)
                rows_chunks(xt, batch, indices, values, k0, k1, start, out, c, 2, relu, g);
            else
                rows_chunks(xt, batch, indices, values, k0, k1, start, out, c, 1, relu, g);
        }
    }
}

/* out[k] = sum over the batch of gt[rows[k], :] * xt[indices[k], :]: the weight gradient at the
 * survivors only. Lanes of 16 survivors are reduced together by one 16x16 transpose. */
void ticketlab_sampled_dot(const int32_t *restrict rows, const int32_t *restrict indices,
                           int64_t nnz, const float *restrict gt, const float *restrict xt,
                           int64_t batch, float *restrict out)
{
    const int64_t chunks = (batch + 15) / 16;
    const int64_t last = batch - 16;
    vf tail_mask; /* the last chunk's lanes that the chunk before it already covered are zeroed */
    for (int j = 0; j < 16; j++) tail_mask[j] = last + j >= 16 * (chunks - 1) ? 1.0f : 0.0f;
    for (int64_t k0 = 0; k0 < nnz; k0 += 16) {
        const int64_t m = nnz - k0 < 16 ? nnz - k0 : 16;
        vf lanes[16];
        for (int64_t i = 0; i < m; i++) {
            const float *g = gt + (int64_t)rows[k0 + i] * batch;
            const float *x = xt + (int64_t)indices[k0 + i] * batch;
            vf acc = (vf){0};
            for (int64_t c = 0; c + 1 < chunks; c++)
                acc += *(const vf *)(g + 16 * c) * *(const vf *)(x + 16 * c);
            acc += (*(const vf *)(g + last) * tail_mask) * *(const vf *)(x + last);
            lanes[i] = acc;
        }
        for (int64_t i = m; i < 16; i++) lanes[i] = (vf){0};
        transpose16(lanes);
        vf sum = lanes[0];
        for (int i = 1; i < 16; i++) sum += lanes[i];
        for (int64_t i = 0; i < m; i++) out[k0 + i] = sum[i];
    }
}

/* dst[n][f][b] = src[n * ldk + b * ldb + f]: K blocks of [batch, features] rows copied
 * features-first, as the products above read them. 16x16 blocks go through registers; where
 * batch or features is not a multiple of 16 the last block overlaps the one before it (the same
 * floats written twice); below 16 a plain loop. torch's copy of the transposed view ran at ~0.5
 * GB/s: at LeNet-300-100's sparse levels it cost more than the first layer's product. */
void ticketlab_transpose(const float *restrict src, int64_t k, int64_t batch, int64_t features,
                         int64_t ldk, int64_t ldb, float *restrict dst)
{
    for (int64_t n = 0; n < k; n++) {
        const float *s = src + n * ldk;
        float *d = dst + n * features * batch;
        if (batch < 16 || features < 16) {
            for (int64_t b = 0; b < batch; b++)
                for (int64_t f = 0; f < features; f++) d[f * batch + b] = s[b * ldb + f];
            continue;
        }
        for (int64_t b0 = 0; b0 < batch; b0 += 16) {
            const int64_t b = b0 + 16 <= batch ? b0 : batch - 16;
            for (int64_t f0 = 0; f0 < features; f0 += 16) {
                const int64_t f = f0 + 16 <= features ? f0 : features - 16;
                vf v[16];
                for (int j = 0; j < 16; j++) v[j] = *(const vf *)(s + (b + j) * ldb + f);
                transpose16(v);
                for (int c = 0; c < 16; c++) *(vf *)(d + (f + c) * batch + b) = v[c];
            }
        }
    }
}

/* ---- Adam with the mask in the same pass -----------------------------------------------------
 *
 * A pruned layer trained dense is stepped by Adam and then multiplied by its mask, two passes over
 * the weights (about a third of a dense LeNet-300-100 level's step is these passes). This is
 * torch's fused CPU Adam (float32, no amsgrad/maximize, Adam's L2 weight decay) with the
 * multiplication by the mask as each weight is stored. The arithmetic is that kernel's vector path
 * as this CPU runs it: exp_avg.lerp_(grad, 1 - beta1) as fma(1 - beta1, grad - m, m) (1 - beta1 <
 * 0.5), exp_avg_sq as fma((1 - beta2) grad, grad, v beta2), the weight decay as fma(p, wd, grad).
 * Each lane is computed alone, so the result does not depend on vector width; train/adam_step.py
 * runs it only on whole vectors (n a multiple of 16, torch's scalar tail stays torch's) and only
 * after it reproduced torch's kernel bit for bit in this process. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* GCC vectorizes this loop 256 bits wide on AVX-512 CPUs unless told: torch's kernel runs 512 */
#define WIDEST_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define WIDEST_VECTORS
#endif

static inline __attribute__((always_inline)) void
adam_span(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
          const float *restrict keep, int64_t n, float c1, float c2, float b2, float bc2_sqrt,
          float eps, float neg_step, float wd, const int decay)
{
    for (int64_t i = 0; i < n; i++) {
        float grad = g[i];
        if (decay) grad = __builtin_fmaf(p[i], wd, grad);
        const float mi = __builtin_fmaf(c1, grad - m[i], m[i]);
        const float vi = __builtin_fmaf(c2 * grad, grad, v[i] * b2);
        m[i] = mi;
        v[i] = vi;
        p[i] = (p[i] + neg_step * mi / (__builtin_sqrtf(vi) / bc2_sqrt + eps)) * keep[i];
    }
}

/* One step (``step``: the count after this update, as torch's state holds it) of n weights p with
 * gradients g and moments m, v, then p *= keep. */
WIDEST_VECTORS void ticketlab_adam(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
                    const float *restrict keep, int64_t n, double lr, double beta1, double beta2,
                    double eps, double weight_decay, double step)
{
    /* in double, as torch computes them */
    const double bias_correction1 = 1 - pow(beta1, step);
    const double bias_correction2 = 1 - pow(beta2, step);
    const float neg_step = (float)(-(lr / bias_correction1));
    const float bc2_sqrt = (float)sqrt(bias_correction2);
    const float c1 = (float)(1 - beta1), c2 = (float)(1 - beta2), b2 = (float)beta2;
    const float wd = (float)weight_decay;
    if (weight_decay != 0.0)
        adam_span(p, g, m, v, keep, n, c1, c2, b2, bc2_sqrt, (float)eps, neg_step, wd, 1);
    else
        adam_span(p, g, m, v, keep, n, c1, c2, b2, bc2_sqrt, (float)eps, neg_step, wd, 0);
}
