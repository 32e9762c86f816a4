/* The small per-layer ops of a CPU step in one pass each: residual add + RMSNorm, and SiLU-and-mul.
 *
 * Their torch twins are in kernels/reference.py (rms_norm, fused_add_rms_norm, silu_and_mul); in torch
 * each is 3-7 calls (pow, mean, add, rsqrt, mul, ...), each a pass over the rows and, with more than one
 * thread, a parallel region. Rounding follows the twins: in bfloat16 every value the twin stores in
 * bfloat16 is rounded here too (the residual sum, the normalised row before the weight, SiLU's output),
 * all arithmetic in float32. Rows are split over OpenMP threads (the runtime torch loaded).
 * Layouts: x, residual [rows, hidden] with row strides in elements and contiguous rows; outputs contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

static inline __attribute__((always_inline)) float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) float round_to(float f, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(f)) : f; }

static inline __attribute__((always_inline)) void store(void *p, int64_t i, float f, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(f);
    else
        ((float *)p)[i] = f;
}

/* exp(x) for float32 in plain arithmetic that vectorizes (Cephes' polynomial after a ln 2 range
 * reduction, within 2 ulp); inputs are clamped to the finite range of the result. */
static inline float vexpf(float x) {
    x = fminf(fmaxf(x, -87.3f), 88.7f);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* residual_out = x + residual (when residual is given; else the row is x itself);
 * out = weight * round(row * rsqrt(mean(row^2) + eps)). Inlined with bf16 a constant, so its loops vectorize. */
static inline __attribute__((always_inline)) void rms_norm_row(void *out, const void *x, void *residual_out,
                                                               const void *residual, const void *weight,
                                                               int64_t hidden, float eps, int bf16, float *row) {
    float sum = 0.0f;
    if (residual) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; i++) {
            const float v = round_to(load(x, i, bf16) + load(residual, i, bf16), bf16);
            store(residual_out, i, v, bf16);
            row[i] = v;
            sum += v * v;
        }
    } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; i++) {
            const float v = load(x, i, bf16);
            row[i] = v;
            sum += v * v;
        }
    }
    const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
#pragma omp simd
    for (int64_t i = 0; i < hidden; i++) store(out, i, load(weight, i, bf16) * round_to(row[i] * inv, bf16), bf16);
}

int pagedserve_rms_norm(void *out, const void *x, int64_t x_stride, void *residual_out, const void *residual,
                        int64_t residual_stride, const void *weight, int64_t rows, int64_t hidden, float eps,
                        int bf16, int num_threads) {
    const int64_t size = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        float row[hidden];
        const char *xr = (const char *)x + r * x_stride * size;
        const char *rr = residual ? (const char *)residual + r * residual_stride * size : NULL;
        char *ro = residual ? (char *)residual_out + r * hidden * size : NULL;
        char *o = (char *)out + r * hidden * size;
        if (bf16)
            rms_norm_row(o, xr, ro, rr, weight, hidden, eps, 1, row);
        else
            rms_norm_row(o, xr, ro, rr, weight, hidden, eps, 0, row);
    }
    return 0;
}

/* out[r] = silu(x[r, :half]) * x[r, half:]. */
static inline __attribute__((always_inline)) void silu_and_mul_row(void *out, const void *x, int64_t half, int bf16) {
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        const float gate = load(x, i, bf16), up = load(x, half + i, bf16);
        const float silu = round_to(gate / (1.0f + vexpf(-gate)), bf16);
        store(out, i, silu * up, bf16);
    }
}

int pagedserve_silu_and_mul(void *out, const void *x, int64_t x_stride, int64_t rows, int64_t half, int bf16,
                            int num_threads) {
    const int64_t size = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * x_stride * size;
        char *o = (char *)out + r * half * size;
        if (bf16)
            silu_and_mul_row(o, xr, half, 1);
        else
            silu_and_mul_row(o, xr, half, 0);
    }
    return 0;
}
