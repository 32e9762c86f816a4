/* Paged decode attention on CPU: one query token per sequence, read from the paged KV cache in place.
 *
 * The torch twin is kernels/reference.py `paged_attention` (and kernels/batched.py, the fallback where no
 * C compiler is found). Each (sequence, KV head) pair is one work item, shared out by OpenMP (the
 * runtime torch itself loaded): pass 1 walks the sequence's block table and scores every key against the
 * query heads of that KV head (their rows grouped, so each key row is read once), then a float32 softmax,
 * then pass 2 walks the blocks again and sums the value rows. Keys and values are read once, where they
 * lie; nothing is gathered or padded. float32 and bfloat16 caches; all arithmetic in float32.
 *
 * Layouts (elements, not bytes):
 *   q, out       row r, head h, dim d at r * row_stride + h * head_dim + d
 *   k/v cache    [num_blocks, block_size, num_kv_heads, head_dim], contiguous
 *   block_tables [batch, bt_stride] int64; seq_lens [batch] int64; rows [batch] int64 (q/out row of each)
 * window <= 0: no sliding window; softcap <= 0: no soft-capping. Returns 0, or -1 if memory ran out.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* A row of head_dim values as float32: the row itself (float32 cache) or its conversion into tmp. */
static inline __attribute__((always_inline)) const float *row_f32(const void *base, int64_t index, int bf16, float *restrict tmp, int64_t n) {
    if (!bf16) return (const float *)base + index;
    const uint16_t *src = (const uint16_t *)base + index;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) tmp[i] = bf16_to_f32(src[i]);
    return tmp;
}

/* One key or value row per (token, KV head) walked block by block: a block's rows of every KV head are one
 * contiguous run of memory (block_size * num_kv_heads * head_dim values), read front to back. */
static inline __attribute__((always_inline)) int attend_sequence(void *out, int64_t out_row_stride, const void *q, int64_t q_row_stride,
                           const void *k_cache, const void *v_cache, int64_t row, const int64_t *block_table,
                           int64_t seq_len, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           int64_t block_size, float scale, int64_t window, float softcap, int bf16) {
    const int64_t first = (window > 0 && seq_len > window) ? seq_len - window : 0;
    const int64_t n = seq_len - first;
    const int64_t D = head_dim, H = num_heads, G = num_heads / num_kv_heads;
    /* scores [H][n], query [H][D], accumulators [H][D], one converted row [D] */
    float *buf = malloc(sizeof(float) * (size_t)(H * n + 2 * H * D + D));
    if (!buf) return -1;
    float *scores = buf, *query = buf + H * n, *acc = query + H * D, *tmp = acc + H * D;
    for (int64_t h = 0; h < H; h++) {
        const float *src = row_f32(q, row * q_row_stride + h * D, bf16, tmp, D);
        for (int64_t d = 0; d < D; d++) query[h * D + d] = src[d] * scale;
    }
    const int64_t token_stride = num_kv_heads * D;
    for (int64_t t = first; t < seq_len; t++) { /* pass 1: scores */
        const int64_t slot = block_table[t / block_size] * block_size + t % block_size;
        for (int64_t kv = 0; kv < num_kv_heads; kv++) {
            const float *key = row_f32(k_cache, slot * token_stride + kv * D, bf16, tmp, D);
            for (int64_t h = kv * G; h < (kv + 1) * G; h++) {
                const float *qh = query + h * D;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < D; d++) s += qh[d] * key[d];
                if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
                scores[h * n + (t - first)] = s;
            }
        }
    }
    for (int64_t h = 0; h < H; h++) { /* softmax */
        float *s = scores + h * n, top = -INFINITY, sum = 0.0f;
        for (int64_t i = 0; i < n; i++) top = s[i] > top ? s[i] : top;
        for (int64_t i = 0; i < n; i++) {
            s[i] = expf(s[i] - top);
            sum += s[i];
        }
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < n; i++) s[i] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)(H * D));
    for (int64_t t = first; t < seq_len; t++) { /* pass 2: weighted values */
        const int64_t slot = block_table[t / block_size] * block_size + t % block_size;
        for (int64_t kv = 0; kv < num_kv_heads; kv++) {
            const float *value = row_f32(v_cache, slot * token_stride + kv * D, bf16, tmp, D);
            for (int64_t h = kv * G; h < (kv + 1) * G; h++) {
                const float p = scores[h * n + (t - first)];
                float *a = acc + h * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) a[d] += p * value[d];
            }
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const int64_t at = row * out_row_stride + h * D;
        if (bf16) {
            uint16_t *dst = (uint16_t *)out + at;
            for (int64_t d = 0; d < D; d++) dst[d] = f32_to_bf16(acc[h * D + d]);
        } else {
            memcpy((float *)out + at, acc + h * D, sizeof(float) * (size_t)D);
        }
    }
    free(buf);
    return 0;
}


#if defined(__AVX512F__)
#include <immintrin.h>

/* NV vectors of 16 values from a row (bfloat16 widened by a shift). */
static inline __attribute__((always_inline)) void load_row16(const void *base, int64_t index, int bf16, int nv, __m512 *dst) {
    for (int i = 0; i < nv; i++) {
        if (bf16) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index + 16 * i));
            dst[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        } else {
            dst[i] = _mm512_loadu_ps((const float *)base + index + 16 * i);
        }
    }
}

/* attend_sequence for head_dim = 16 * nv with AVX-512: the rows live in registers, each dot product
 * ends in one tree reduction (the portable loop's sum is a chain of 16 dependent adds). */
static inline __attribute__((always_inline)) int attend_sequence16(void *out, int64_t out_row_stride, const void *q, int64_t q_row_stride,
                           const void *k_cache, const void *v_cache, int64_t row, const int64_t *block_table,
                           int64_t seq_len, int64_t num_heads, int64_t num_kv_heads, int nv,
                           int64_t block_size, float scale, int64_t window, float softcap, int bf16) {
    const int64_t first = (window > 0 && seq_len > window) ? seq_len - window : 0;
    const int64_t n = seq_len - first, D = 16 * nv;
    const int64_t H = num_heads, G = num_heads / num_kv_heads, token_stride = num_kv_heads * D;
    float *buf = aligned_alloc(64, sizeof(float) * (size_t)(((H * n + 15) / 16) * 16 + 2 * H * D));
    if (!buf) return -1;
    float *query = buf, *acc = query + H * D, *scores = acc + H * D;
    const __m512 scale16 = _mm512_set1_ps(scale);
    for (int64_t h = 0; h < H; h++) {
        __m512 r[16];
        load_row16(q, row * q_row_stride + h * D, bf16, nv, r);
        for (int i = 0; i < nv; i++) _mm512_store_ps(query + h * D + 16 * i, _mm512_mul_ps(r[i], scale16));
    }
#if defined(__AVX512BF16__)
    if (bf16) { /* bfloat16 pairs multiplied and summed into float32 by one instruction (VDPBF16PS) */
        __m512bh qh[16 * 16];
        for (int64_t h = 0; h < H; h++)
            for (int i = 0; i < nv / 2; i++)
                qh[h * 8 + i] = (__m512bh)_mm512_loadu_si512((const uint16_t *)q + row * q_row_stride + h * D + 32 * i);
        for (int64_t t = first; t < seq_len; t++) {
            const int64_t slot = block_table[t / block_size] * block_size + t % block_size;
            for (int64_t kv = 0; kv < num_kv_heads; kv++) {
                __m512bh key[8];
                for (int i = 0; i < nv / 2; i++)
                    key[i] = (__m512bh)_mm512_loadu_si512((const uint16_t *)k_cache + slot * token_stride + kv * D + 32 * i);
                for (int64_t h = kv * G; h < (kv + 1) * G; h++) {
                    __m512 dot = _mm512_setzero_ps();
                    for (int i = 0; i < nv / 2; i++) dot = _mm512_dpbf16_ps(dot, qh[h * 8 + i], key[i]);
                    float s = _mm512_reduce_add_ps(dot) * scale;
                    if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
                    scores[h * n + (t - first)] = s;
                }
            }
        }
    } else
#endif
    for (int64_t t = first; t < seq_len; t++) { /* pass 1: scores */
        const int64_t slot = block_table[t / block_size] * block_size + t % block_size;
        for (int64_t kv = 0; kv < num_kv_heads; kv++) {
            __m512 key[16];
            load_row16(k_cache, slot * token_stride + kv * D, bf16, nv, key);
            for (int64_t h = kv * G; h < (kv + 1) * G; h++) {
                __m512 dot = _mm512_mul_ps(_mm512_load_ps(query + h * D), key[0]);
                for (int i = 1; i < nv; i++) dot = _mm512_fmadd_ps(_mm512_load_ps(query + h * D + 16 * i), key[i], dot);
                float s = _mm512_reduce_add_ps(dot);
                if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
                scores[h * n + (t - first)] = s;
            }
        }
    }
    for (int64_t h = 0; h < H; h++) { /* softmax */
        float *s = scores + h * n, top = -INFINITY, sum = 0.0f;
        for (int64_t i = 0; i < n; i++) top = s[i] > top ? s[i] : top;
        for (int64_t i = 0; i < n; i++) {
            s[i] = expf(s[i] - top);
            sum += s[i];
        }
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < n; i++) s[i] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)(H * D));
    for (int64_t t = first; t < seq_len; t++) { /* pass 2: weighted values */
        const int64_t slot = block_table[t / block_size] * block_size + t % block_size;
        for (int64_t kv = 0; kv < num_kv_heads; kv++) {
            __m512 value[16];
            load_row16(v_cache, slot * token_stride + kv * D, bf16, nv, value);
            for (int64_t h = kv * G; h < (kv + 1) * G; h++) {
                const __m512 p = _mm512_set1_ps(scores[h * n + (t - first)]);
                float *a = acc + h * D;
                for (int i = 0; i < nv; i++) _mm512_store_ps(a + 16 * i, _mm512_fmadd_ps(p, value[i], _mm512_load_ps(a + 16 * i)));
            }
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const int64_t at = row * out_row_stride + h * D;
        if (bf16) {
            uint16_t *dst = (uint16_t *)out + at;
            for (int64_t d = 0; d < D; d++) dst[d] = f32_to_bf16(acc[h * D + d]);
        } else {
            memcpy((float *)out + at, acc + h * D, sizeof(float) * (size_t)D);
        }
    }
    free(buf);
    return 0;
}
#endif

/* attend_sequence with the common head sizes and dtypes as constants, so that its loops unroll fully. */
static int attend_dispatch(void *out, int64_t out_row_stride, const void *q, int64_t q_row_stride,
                           const void *k_cache, const void *v_cache, int64_t row, const int64_t *block_table,
                           int64_t seq_len, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           int64_t block_size, float scale, int64_t window, float softcap, int bf16) {
#define ATTEND(D, BF16) attend_sequence(out, out_row_stride, q, q_row_stride, k_cache, v_cache, row, block_table, \
                                        seq_len, num_heads, num_kv_heads, D, block_size, scale, window, softcap, BF16)
#if defined(__AVX512F__)
#define ATTEND16(NV, BF16) attend_sequence16(out, out_row_stride, q, q_row_stride, k_cache, v_cache, row, block_table, \
                                             seq_len, num_heads, num_kv_heads, NV, block_size, scale, window, softcap, BF16)
    if (head_dim == 64) return bf16 ? ATTEND16(4, 1) : ATTEND16(4, 0);
    if (head_dim == 128) return bf16 ? ATTEND16(8, 1) : ATTEND16(8, 0);
    if (head_dim % 16 == 0 && head_dim <= 256) return ATTEND16((int)(head_dim / 16), bf16);
#undef ATTEND16
#endif
    return ATTEND(head_dim, bf16);
#undef ATTEND
}

int pagedserve_decode_attention(void *out, int64_t out_row_stride, const void *q, int64_t q_row_stride,
                                const void *k_cache, const void *v_cache, const int64_t *rows,
                                const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens,
                                int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                int64_t block_size, float scale, int64_t window, float softcap, int bf16,
                                int num_threads) {
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int64_t b = 0; b < batch; b++) {
        if (seq_lens[b] <= 0) continue;
        failed |= attend_dispatch(out, out_row_stride, q, q_row_stride, k_cache, v_cache, rows[b],
                                  block_tables + b * bt_stride, seq_lens[b], num_heads, num_kv_heads, head_dim,
                                  block_size, scale, window, softcap, bf16) != 0;
    }
    return failed ? -1 : 0;
}
