/* The kernel of fate.runtime._experts: routed experts computed straight from the bytes of their files.
 *
 * An expert file read whole into a buffer (a slot) holds its three MatMulNBits-quantized
 * projections at offsets the manifest records (fate.artifacts.slots). run_experts() computes
 * every routed expert of one layer in one call, with the GIL released:
 *
 *     y[dest[a]] = down(act(gate(x[rows[a]]), up(x[rows[a]])))   for each assignment a
 *
 * Weights, MatMulNBits' layout (compiler/quantize.py): B uint8 [N, blocks, bs*bits/8], codes packed
 * low bits first along K; scales float [N*blocks]; zero points uint8 packed the same way per row.
 * dequant(B)[n, k] = (code - zp[n, k/bs]) * scale[n, k/bs].
 *
 * accuracy level 4 (the compiler's default): activations are quantized to int8 per block of bs,
 * symmetric (scale = max|a| / 127, round half to even), as onnxruntime's CompInt8 path does, and
 * each block's dot product is exact integer arithmetic:
 *     sum_i a_q[i] * (code[i] - zp) = sum_i a_q[i] * code[i] - zp * sum_i a_q[i].
 * Other levels compute in float32 on dequantized weights.
 *
 * Activations are stored permuted per 32-code chunk so that the unpacked codes line up without
 * shuffles: 4 bits [even positions, odd positions]; 2 bits [i%4 == 0, 1, 2, 3]; 8 bits as is.
 *
 * Work is split into tasks of (expert, up to TILE tokens), each a whole expert for its tokens, so
 * tasks need no barrier; a small persistent thread pool runs them. Kernels: AVX-512 VNNI, AVX-VNNI
 * and AVX2 (chosen at run time), NEON on aarch64, and portable C; all compute the same integers.
 * No Python here: runtime/native/experts.c is the module, and checks every input before it calls.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernel.h"
#include "threads.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FATE_X86 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define FATE_NEON 1
#endif

#define TILE 8       /* tokens computed together per pass over an expert's weights */
/* Weight bytes a call must pass over per thread it wakes: waking a pool thread and waiting for it to
 * report back costs tens of microseconds (measured 60 us per call on a 2-core VM), more than a small
 * model's whole layer (tiny-moe's top-2 decode: 48 KB, 20 us on one thread). */
#define BYTES_PER_THREAD (1 << 20)
#define CHUNK 32     /* codes per SIMD step */

typedef struct {
    const uint8_t *qweight;
    const uint8_t *scales; /* float32, possibly unaligned: read with memcpy */
    const uint8_t *zeros;
    const uint8_t *bias;   /* float32 or NULL */
    int64_t n, k, blocks, block_bytes, zero_row;
} proj_t;

/* Kernels, in order of preference; set at start (fate_kernel_init) and by fate_set_kernel (tests). */
enum { K_PORTABLE, K_AVX2, K_VNNI, K_VNNI512, K_NEON, K_COUNT };
static const char *const kernel_names[] = {"portable", "avx2", "avx-vnni", "avx512-vnni", "neon"};
static int kernel = K_PORTABLE;

/* ------------------------------------------------------------------ small helpers */

static inline float load_f32(const uint8_t *p, int64_t i) {
    float v;
    memcpy(&v, p + 4 * i, 4);
    return v;
}

static inline int zero_point(const proj_t *p, int64_t n, int64_t block, int bits) {
    const uint8_t *row = p->zeros + n * p->zero_row;
    int per = 8 / bits;
    return (row[block / per] >> ((block % per) * bits)) & ((1 << bits) - 1);
}

/* Position of natural index r (0 <= r < chunk) inside its permuted chunk. */
static inline int permuted(int bits, int chunk, int r) {
    if (bits == 4) return (r & 1) * (chunk / 2) + r / 2;
    if (bits == 2) return (r & 3) * (chunk / 4) + r / 4;
    return r;
}

/* Codes per permuted chunk: 64 for 4 bits (one 32-byte load unpacks into two 32-code vectors),
 * else 32; a block smaller than that is one chunk. */
static inline int chunk_of(int64_t bs, int bits) {
    int chunk = bits == 4 ? 64 : CHUNK;
    return bs >= chunk ? chunk : (int)bs;
}

/* Quantize one row of K floats into blocks of bs: a_q [blocks*bs] (permuted), scale and code sum
 * per block. Padding past K is zero. */
static void quantize_row(const float *x, int64_t k, int64_t bs, int bits, int8_t *q, float *scale, int32_t *sum) {
    int64_t blocks = (k + bs - 1) / bs;
    int chunk = chunk_of(bs, bits);
    for (int64_t j = 0; j < blocks; j++) {
        int64_t start = j * bs, stop = start + bs < k ? start + bs : k;
        float amax = 0.0f;
        int finite = 1;
        for (int64_t i = start; i < stop; i++) {
            float v = fabsf(x[i]);
            finite &= isfinite(v);
            if (v > amax) amax = v;
        }
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t s = 0;
        int8_t *out = q + start;
        memset(out, 0, (size_t)bs);
        for (int64_t i = start; i < stop; i++) {
            float r = nearbyintf(x[i] * inv);
            int v = r > 127.0f ? 127 : (r < -127.0f ? -127 : (int)r);
            int64_t local = i - start;
            out[(local / chunk) * chunk + permuted(bits, chunk, (int)(local % chunk))] = (int8_t)v;
            s += v;
        }
        /* a NaN or infinity must reach the output (and be refused there), not quantize to zeros */
        scale[j] = finite ? amax / 127.0f : NAN;
        sum[j] = s;
    }
}

/* ------------------------------------------------------------------ integer block dot products */

/* Code i of a block, packed low bits first (MatMulNBits). */
static inline int code_at(const uint8_t *w, int64_t i, int bits) {
    if (bits == 8) return w[i];
    if (bits == 4) return (w[i / 2] >> ((i & 1) * 4)) & 15;
    return (w[i / 4] >> ((i & 3) * 2)) & 3;
}

/* sum over one block of a_q[i] * code[i], portable C (also the reference the SIMD paths match). */
static int32_t block_dot_c(const uint8_t *w, const int8_t *a, int64_t bs, int bits) {
    int chunk = chunk_of(bs, bits);
    int32_t acc = 0;
    for (int64_t i = 0; i < bs; i++) {
        acc += code_at(w, i, bits) * a[(i / chunk) * chunk + permuted(bits, chunk, (int)(i % chunk))];
    }
    return acc;
}

#ifdef FATE_X86
/* One block's integer dot products for M tokens, AVX2 (maddubs) or AVX-VNNI (dpbusd): the same
 * integers either way. Written once as a macro, instantiated per instruction set and token count
 * (M is a constant, so the accumulators live in registers). */
#define DOT_AVX2(acc, c, a) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(c, a), ones))
#define DOT_VNNI(acc, c, a) acc = _mm256_dpbusd_avx_epi32(acc, c, a)
/* the same instruction, EVEX-encoded: CPUs with AVX-512 VNNI but no AVX-VNNI (AMD Zen 4, Intel
 * Ice Lake to Sapphire Rapids servers) */
#define DOT_VNNI512(acc, c, a) acc = _mm256_dpbusd_epi32(acc, c, a)

#define DEFINE_ROWS(NAME, TARGET, DOT, EXACT_U8)                                                              \
    /* the eight lanes of a row's sums, added in the one order every pass of a row uses (its bits) */           \
    __attribute__((target(TARGET))) static inline float NAME##_sum8(__m256 acc) {                               \
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));                      \
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                                                 \
        s = _mm_add_ss(s, _mm_movehdup_ps(s));                                                                  \
        return _mm_cvtss_f32(s);                                                                                \
    }                                                                                                           \
                                                                                                                \
    __attribute__((target(TARGET))) static inline void NAME##_block(const uint8_t *w, int bits, int64_t bs,     \
                                                                    const int8_t *a, int64_t a_stride, int M,  \
                                                                    __m256i *isum) {                           \
        const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);                                \
        (void)ones;                                                                                             \
        if (bits == 4 && bs >= 64) {                                                                            \
            for (int64_t c = 0; c < bs; c += 64, w += 32) {                                                     \
                __m256i b = _mm256_loadu_si256((const __m256i *)w);                                             \
                __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);      \
                for (int m = 0; m < M; m++) {                                                                   \
                    const int8_t *am = a + m * a_stride + c;                                                    \
                    DOT(isum[m], lo, _mm256_loadu_si256((const __m256i *)am));                                  \
                    DOT(isum[m], hi, _mm256_loadu_si256((const __m256i *)(am + 32)));                           \
                }                                                                                               \
            }                                                                                                   \
            return;                                                                                             \
        }                                                                                                       \
        const __m128i n4 = _mm_set1_epi8(0x0F), n2 = _mm_set1_epi8(0x03);                                      \
        for (int64_t c = 0; c < bs; c += 32) {                                                                  \
            __m256i codes, high = _mm256_setzero_si256();                                                       \
            if (bits == 4) {                                                                                    \
                __m128i b = _mm_loadu_si128((const __m128i *)w);                                                \
                codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), n4), _mm_and_si128(b, n4));       \
                w += 16;                                                                                        \
            } else if (bits == 2) {                                                                             \
                __m128i b = _mm_loadl_epi64((const __m128i *)w);                                                \
                __m128i v01 = _mm_unpacklo_epi64(_mm_and_si128(b, n2), _mm_and_si128(_mm_srli_epi16(b, 2), n2)); \
                __m128i v23 = _mm_unpacklo_epi64(_mm_and_si128(_mm_srli_epi16(b, 4), n2),                      \
                                                 _mm_and_si128(_mm_srli_epi16(b, 6), n2));                     \
                codes = _mm256_set_m128i(v23, v01);                                                             \
                w += 8;                                                                                         \
            } else {                                                                                            \
                __m256i b = _mm256_loadu_si256((const __m256i *)w);                                             \
                if (EXACT_U8) {                                                                                 \
                    codes = b;                                                                                  \
                } else { /* code = 16 * high + low keeps maddubs' pair sums inside int16 */                    \
                    codes = _mm256_and_si256(b, m4);                                                            \
                    high = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);                                       \
                }                                                                                               \
                w += 32;                                                                                        \
            }                                                                                                   \
            for (int m = 0; m < M; m++) {                                                                       \
                __m256i am = _mm256_loadu_si256((const __m256i *)(a + m * a_stride + c));                       \
                DOT(isum[m], codes, am);                                                                        \
                if (bits == 8 && !EXACT_U8) {                                                                   \
                    __m256i h = _mm256_setzero_si256();                                                         \
                    DOT(h, high, am);                                                                           \
                    isum[m] = _mm256_add_epi32(isum[m], _mm256_slli_epi32(h, 4));                               \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    __attribute__((target(TARGET))) static inline void NAME##_rows_m(const proj_t *p, int64_t n, int bits,      \
                                                                     int64_t bs, const int8_t *aq,              \
                                                                     int64_t a_stride, const float *as,         \
                                                                     const int32_t *asum, const int M,          \
                                                                     float *out) {                              \
        __m256 acc[TILE];                                                                                       \
        float corr[TILE];                                                                                       \
        for (int m = 0; m < M; m++) { acc[m] = _mm256_setzero_ps(); corr[m] = 0.0f; }                         \
        const uint8_t *wrow = p->qweight + n * p->blocks * p->block_bytes;                                      \
        const uint8_t *zrow = p->zeros + n * p->zero_row;                                                       \
        int zshift = bits == 8 ? 0 : (bits == 4 ? 1 : 2), zmask = (1 << bits) - 1, per = (1 << zshift) - 1;   \
        const uint8_t *ahead = wrow + p->blocks * p->block_bytes; /* the next row, fetched meanwhile */       \
        const int more = n + 1 < p->n;                                                                          \
        for (int64_t j = 0; j < p->blocks; j++) {                                                               \
            if (more)                                                                                           \
                for (int64_t b = 0; b < p->block_bytes; b += 64)                                                \
                    _mm_prefetch((const char *)(ahead + j * p->block_bytes + b), _MM_HINT_T0);                  \
            __m256i isum[TILE];                                                                                 \
            for (int m = 0; m < M; m++) isum[m] = _mm256_setzero_si256();                                      \
            NAME##_block(wrow + j * p->block_bytes, bits, bs, aq + j * bs, a_stride, M, isum);                  \
            float ws = load_f32(p->scales, n * p->blocks + j);                                                  \
            int zp = (zrow[j >> zshift] >> ((j & per) * bits)) & zmask;                                        \
            for (int m = 0; m < M; m++) {                                                                       \
                float f = ws * as[m * p->blocks + j];                                                           \
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_set1_ps(f), acc[m]);              \
                corr[m] += f * (float)(zp * asum[m * p->blocks + j]);                                           \
            }                                                                                                   \
        }                                                                                                       \
        for (int m = 0; m < M; m++) out[m] = NAME##_sum8(acc[m]) - corr[m];                                     \
    }                                                                                                           \
                                                                                                                \
    /* Prefill: two rows against M tokens (NAME##_rows2 calls it four tokens at a time, then one), each         \
     * activation chunk loaded once for both rows (NAME##_rows_m loads it once a row). Only the paths whose     \
     * codes need no unpacking beyond nibbles (4 bits in blocks of 64 or more; 8 bits where the dot takes       \
     * them as they are): per row and token, the same integer sums and the same float operations, in the        \
     * same order, as NAME##_rows_m (1.17-1.19x prefill at Qwen-MoE shapes, BENCHMARKS.md). */                  \
    __attribute__((target(TARGET))) static inline void NAME##_rows2_m(const proj_t *p, int64_t n, int bits,     \
                                                                      int64_t bs, const int8_t *aq,            \
                                                                      int64_t a_stride, const float *as,       \
                                                                      const int32_t *asum, const int M,        \
                                                                      float *out0, float *out1) {              \
        const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);                                \
        (void)ones;                                                                                             \
        const int64_t bb = p->block_bytes, blocks = p->blocks;                                                  \
        const uint8_t *w0row = p->qweight + n * blocks * bb, *w1row = w0row + blocks * bb;                      \
        const uint8_t *z0row = p->zeros + n * p->zero_row, *z1row = z0row + p->zero_row;                        \
        int zshift = bits == 8 ? 0 : (bits == 4 ? 1 : 2), zmask = (1 << bits) - 1, per = (1 << zshift) - 1;   \
        const uint8_t *ahead = w1row + blocks * bb; /* the next two rows, fetched meanwhile */                 \
        const int more = n + 3 < p->n;                                                                          \
        __m256 acc0[4], acc1[4];                                                                                \
        float corr0[4], corr1[4];                                                                               \
        for (int m = 0; m < M; m++) {                                                                           \
            acc0[m] = acc1[m] = _mm256_setzero_ps();                                                            \
            corr0[m] = corr1[m] = 0.0f;                                                                         \
        }                                                                                                       \
        for (int64_t j = 0; j < blocks; j++) {                                                                  \
            if (more)                                                                                           \
                for (int64_t b = 0; b < 2 * bb; b += 64)                                                        \
                    _mm_prefetch((const char *)(ahead + 2 * j * bb + b), _MM_HINT_T0);                          \
            __m256i s0[4], s1[4];                                                                               \
            for (int m = 0; m < M; m++) s0[m] = s1[m] = _mm256_setzero_si256();                                \
            const uint8_t *w0 = w0row + j * bb, *w1 = w1row + j * bb;                                           \
            const int8_t *a = aq + j * bs;                                                                      \
            for (int64_t c = 0; bits == 4 && c < bs; c += 64) {                                                 \
                __m256i b0 = _mm256_loadu_si256((const __m256i *)(w0 + c / 2));                                 \
                __m256i b1 = _mm256_loadu_si256((const __m256i *)(w1 + c / 2));                                 \
                __m256i lo0 = _mm256_and_si256(b0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), m4);     \
                __m256i lo1 = _mm256_and_si256(b1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), m4);     \
                for (int m = 0; m < M; m++) {                                                                   \
                    __m256i alo = _mm256_loadu_si256((const __m256i *)(a + m * a_stride + c));                  \
                    __m256i ahi = _mm256_loadu_si256((const __m256i *)(a + m * a_stride + c + 32));             \
                    DOT(s0[m], lo0, alo);                                                                       \
                    DOT(s0[m], hi0, ahi);                                                                       \
                    DOT(s1[m], lo1, alo);                                                                       \
                    DOT(s1[m], hi1, ahi);                                                                       \
                }                                                                                               \
            }                                                                                                   \
            for (int64_t c = 0; bits == 8 && c < bs; c += 32) {                                                 \
                __m256i b0 = _mm256_loadu_si256((const __m256i *)(w0 + c));                                     \
                __m256i b1 = _mm256_loadu_si256((const __m256i *)(w1 + c));                                     \
                for (int m = 0; m < M; m++) {                                                                   \
                    __m256i av = _mm256_loadu_si256((const __m256i *)(a + m * a_stride + c));                   \
                    DOT(s0[m], b0, av);                                                                         \
                    DOT(s1[m], b1, av);                                                                         \
                }                                                                                               \
            }                                                                                                   \
            float ws0 = load_f32(p->scales, n * blocks + j), ws1 = load_f32(p->scales, (n + 1) * blocks + j);     \
            int zp0 = (z0row[j >> zshift] >> ((j & per) * bits)) & zmask;                                       \
            int zp1 = (z1row[j >> zshift] >> ((j & per) * bits)) & zmask;                                       \
            for (int m = 0; m < M; m++) {                                                                       \
                float f0 = ws0 * as[m * blocks + j], f1 = ws1 * as[m * blocks + j];                          \
                acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0[m]), _mm256_set1_ps(f0), acc0[m]);              \
                acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[m]), _mm256_set1_ps(f1), acc1[m]);              \
                corr0[m] += f0 * (float)(zp0 * asum[m * blocks + j]);                                          \
                corr1[m] += f1 * (float)(zp1 * asum[m * blocks + j]);                                          \
            }                                                                                                   \
        }                                                                                                       \
        for (int m = 0; m < M; m++) {                                                                           \
            out0[m] = NAME##_sum8(acc0[m]) - corr0[m];                                                          \
            out1[m] = NAME##_sum8(acc1[m]) - corr1[m];                                                          \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    __attribute__((target(TARGET), unused)) static void NAME##_rows2(const proj_t *p, int64_t n, int bits,      \
                                                                   int64_t bs, const int8_t *aq,              \
                                                                   int64_t a_stride, const float *as,         \
                                                                   const int32_t *asum, int m_count,          \
                                                                   float *out0, float *out1) {                \
        int m = 0;                                                                                              \
        for (; m + 4 <= m_count; m += 4)                                                                        \
            NAME##_rows2_m(p, n, bits, bs, aq + m * a_stride, a_stride, as + m * p->blocks, asum + m * p->blocks, \
                           4, out0 + m, out1 + m);                                                              \
        for (; m < m_count; m++)                                                                                \
            NAME##_rows2_m(p, n, bits, bs, aq + m * a_stride, a_stride, as + m * p->blocks, asum + m * p->blocks, \
                           1, out0 + m, out1 + m);                                                              \
    }                                                                                                           \
                                                                                                                \
    /* Decode: one token against 4 rows per pass, so four independent accumulator chains hide the   \
     * dot instructions' latency and each block's activation scale is read once. */                       \
    __attribute__((target(TARGET))) static void NAME##_rows4(const proj_t *p, int64_t n, int bits, int64_t bs,  \
                                                             const int8_t *aq, const float *as,                 \
                                                             const int32_t *asum, float *out) {                 \
        __m256 acc[4];                                                                                          \
        __m128 corr = _mm_setzero_ps();                                                                         \
        const uint8_t *wrow[4], *zrow[4];                                                                       \
        for (int r = 0; r < 4; r++) {                                                                           \
            acc[r] = _mm256_setzero_ps();                                                                       \
            wrow[r] = p->qweight + (n + r) * p->blocks * p->block_bytes;                                        \
            zrow[r] = p->zeros + (n + r) * p->zero_row;                                                         \
        }                                                                                                       \
        int zshift = bits == 8 ? 0 : (bits == 4 ? 1 : 2), zmask = (1 << bits) - 1, per = (1 << zshift) - 1;   \
        /* the next four rows follow these in memory: fetch them while these compute (an expert read  \
         * from memory, not cache, is bandwidth-bound, and four interleaved row streams plus scales    \
         * are more than the hardware prefetcher follows well) */                                      \
        const uint8_t *ahead = wrow[0] + 4 * p->blocks * p->block_bytes;                                     \
        const int more = n + 8 <= p->n;                                                                         \
        for (int64_t j = 0; j < p->blocks; j++) {                                                               \
            if (more)                                                                                           \
                for (int64_t b = 0; b < 4 * p->block_bytes; b += 64)                                            \
                    _mm_prefetch((const char *)(ahead + j * 4 * p->block_bytes + b), _MM_HINT_T0);              \
            __m256i isum[4];                                                                                    \
            /* the four rows interleaved in one pass over the block: four independent dot chains */                 \
            if ((bits == 4 && bs % 64 == 0) || (bits == 8 && EXACT_U8)) {                                           \
                const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);                             \
                (void)ones;                                                                                         \
                __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;                                     \
                const uint8_t *w0 = wrow[0] + j * p->block_bytes, *w1 = wrow[1] + j * p->block_bytes;               \
                const uint8_t *w2 = wrow[2] + j * p->block_bytes, *w3 = wrow[3] + j * p->block_bytes;               \
                const int8_t *a = aq + j * bs;                                                                      \
                for (int64_t c = 0; bits == 4 && c < bs; c += 64) {                                                 \
                    __m256i alo = _mm256_loadu_si256((const __m256i *)(a + c));                                     \
                    __m256i ahi = _mm256_loadu_si256((const __m256i *)(a + c + 32));                                \
                    __m256i b0 = _mm256_loadu_si256((const __m256i *)(w0 + c / 2));                                 \
                    __m256i b1 = _mm256_loadu_si256((const __m256i *)(w1 + c / 2));                                 \
                    __m256i b2 = _mm256_loadu_si256((const __m256i *)(w2 + c / 2));                                 \
                    __m256i b3 = _mm256_loadu_si256((const __m256i *)(w3 + c / 2));                                 \
                    DOT(s0, _mm256_and_si256(b0, m4), alo);                                                         \
                    DOT(s1, _mm256_and_si256(b1, m4), alo);                                                         \
                    DOT(s2, _mm256_and_si256(b2, m4), alo);                                                         \
                    DOT(s3, _mm256_and_si256(b3, m4), alo);                                                         \
                    DOT(s0, _mm256_and_si256(_mm256_srli_epi16(b0, 4), m4), ahi);                                   \
                    DOT(s1, _mm256_and_si256(_mm256_srli_epi16(b1, 4), m4), ahi);                                   \
                    DOT(s2, _mm256_and_si256(_mm256_srli_epi16(b2, 4), m4), ahi);                                   \
                    DOT(s3, _mm256_and_si256(_mm256_srli_epi16(b3, 4), m4), ahi);                                   \
                }                                                                                                   \
                for (int64_t c = 0; bits == 8 && c < bs; c += 32) { /* EXACT_U8: the codes as they are */           \
                    __m256i av = _mm256_loadu_si256((const __m256i *)(a + c));                                      \
                    DOT(s0, _mm256_loadu_si256((const __m256i *)(w0 + c)), av);                                     \
                    DOT(s1, _mm256_loadu_si256((const __m256i *)(w1 + c)), av);                                     \
                    DOT(s2, _mm256_loadu_si256((const __m256i *)(w2 + c)), av);                                     \
                    DOT(s3, _mm256_loadu_si256((const __m256i *)(w3 + c)), av);                                     \
                }                                                                                                   \
                isum[0] = s0; isum[1] = s1; isum[2] = s2; isum[3] = s3;                                             \
            } else {                                                                                            \
                for (int r = 0; r < 4; r++) {                                                                   \
                    isum[r] = _mm256_setzero_si256();                                                           \
                    NAME##_block(wrow[r] + j * p->block_bytes, bits, bs, aq + j * bs, 0, 1, &isum[r]);         \
                }                                                                                               \
            }                                                                                                   \
            int sh = (int)(j & per) * bits;                                                                     \
            int64_t zb = j >> zshift;                                                                           \
            __m128 ws = _mm_setr_ps(load_f32(p->scales, n * p->blocks + j),                                    \
                                    load_f32(p->scales, (n + 1) * p->blocks + j),                              \
                                    load_f32(p->scales, (n + 2) * p->blocks + j),                              \
                                    load_f32(p->scales, (n + 3) * p->blocks + j));                             \
            __m128i zp = _mm_setr_epi32((zrow[0][zb] >> sh) & zmask, (zrow[1][zb] >> sh) & zmask,            \
                                        (zrow[2][zb] >> sh) & zmask, (zrow[3][zb] >> sh) & zmask);            \
            __m128 f = _mm_mul_ps(ws, _mm_set1_ps(as[j]));                                                      \
            /* the same float operations, in the same order, as NAME##_rows_m: one token's result never     \
             * depends on which path computed it */                                                          \
            corr = _mm_add_ps(corr, _mm_mul_ps(f, _mm_cvtepi32_ps(_mm_mullo_epi32(zp, _mm_set1_epi32(asum[j]))))); \
            for (int r = 0; r < 4; r++)                                                                         \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(f[r]), acc[r]);           \
        }                                                                                                       \
        __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(acc[0]), _mm256_extractf128_ps(acc[0], 1));             \
        __m128 t1 = _mm_add_ps(_mm256_castps256_ps128(acc[1]), _mm256_extractf128_ps(acc[1], 1));             \
        __m128 t2 = _mm_add_ps(_mm256_castps256_ps128(acc[2]), _mm256_extractf128_ps(acc[2], 1));             \
        __m128 t3 = _mm_add_ps(_mm256_castps256_ps128(acc[3]), _mm256_extractf128_ps(acc[3], 1));             \
        _MM_TRANSPOSE4_PS(t0, t1, t2, t3);                                                                      \
        __m128 total = _mm_add_ps(_mm_add_ps(t0, t2), _mm_add_ps(t1, t3));                                      \
        _mm_storeu_ps(out, _mm_sub_ps(total, corr));                                                            \
    }                                                                                                           \
                                                                                                                \
    __attribute__((target(TARGET))) static void NAME(const proj_t *p, int64_t n, int bits, int64_t bs,          \
                                                     const int8_t *aq, int64_t a_stride, const float *as,       \
                                                     const int32_t *asum, int m_count, float *out) {            \
        int m = 0;                                                                                              \
        for (; m + 4 <= m_count; m += 4)                                                                        \
            NAME##_rows_m(p, n, bits, bs, aq + m * a_stride, a_stride, as + m * p->blocks, asum + m * p->blocks, \
                          4, out + m);                                                                          \
        for (; m < m_count; m++)                                                                                \
            NAME##_rows_m(p, n, bits, bs, aq + m * a_stride, a_stride, as + m * p->blocks, asum + m * p->blocks, \
                          1, out + m);                                                                          \
    }

DEFINE_ROWS(row_int8_avx2, "avx2,fma", DOT_AVX2, 0)
DEFINE_ROWS(row_int8_vnni, "avx2,fma,avxvnni", DOT_VNNI, 1)
DEFINE_ROWS(row_int8_vnni512, "avx2,fma,avx512f,avx512vl,avx512vnni", DOT_VNNI512, 1)
#endif

#ifdef FATE_NEON
static inline int32x4_t dot16_neon(int32x4_t acc, uint8x16_t codes, int8x16_t a) {
    int8x16_t c = vreinterpretq_s8_u8(codes);
    int16x8_t lo = vmull_s8(vget_low_s8(c), vget_low_s8(a));
    int16x8_t hi = vmull_s8(vget_high_s8(c), vget_high_s8(a));
    return vpadalq_s16(vpadalq_s16(acc, lo), hi);
}

static void row_int8_neon(const proj_t *p, int64_t n, int bits, int64_t bs, const int8_t *aq, int64_t a_stride,
                          const float *as, const int32_t *asum, int m_count, float *out) {
    float32x4_t acc[TILE];
    float corr[TILE];
    for (int m = 0; m < m_count; m++) { acc[m] = vdupq_n_f32(0.0f); corr[m] = 0.0f; }
    const uint8_t *wrow = p->qweight + n * p->blocks * p->block_bytes;
    int64_t chunk_bytes = CHUNK * bits / 8;
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m2 = vdupq_n_u8(0x03);
    for (int64_t j = 0; j < p->blocks; j++) {
        const uint8_t *w = wrow + j * p->block_bytes;
        float ws = load_f32(p->scales, n * p->blocks + j);
        int zp = zero_point(p, n, j, bits);
        int32x4_t isum[TILE];
        for (int m = 0; m < m_count; m++) isum[m] = vdupq_n_s32(0);
        for (int64_t c = 0; c < bs; c += CHUNK, w += chunk_bytes) {
            uint8x16_t c0, c1, h0 = vdupq_n_u8(0), h1 = vdupq_n_u8(0);
            if (bits == 4 && bs >= 64) { /* 64 codes: [even 32 | odd 32] */
                uint8x16_t b0 = vld1q_u8(w), b1 = vld1q_u8(w + 16);
                for (int m = 0; m < m_count; m++) {
                    const int8_t *a = aq + m * a_stride + j * bs + c;
                    isum[m] = dot16_neon(dot16_neon(isum[m], vandq_u8(b0, m4), vld1q_s8(a)), vandq_u8(b1, m4),
                                         vld1q_s8(a + 16));
                    isum[m] = dot16_neon(dot16_neon(isum[m], vshrq_n_u8(b0, 4), vld1q_s8(a + 32)), vshrq_n_u8(b1, 4),
                                         vld1q_s8(a + 48));
                }
                c += 32;
                w += 16; /* with the loop's own step: 64 codes, 32 bytes */
                continue;
            } else if (bits == 4) {
                uint8x16_t b = vld1q_u8(w);
                c0 = vandq_u8(b, m4);
                c1 = vshrq_n_u8(b, 4);
            } else if (bits == 2) {
                uint8x8_t b = vld1_u8(w);
                c0 = vandq_u8(vcombine_u8(b, vshr_n_u8(b, 2)), m2);
                c1 = vandq_u8(vcombine_u8(vshr_n_u8(b, 4), vshr_n_u8(b, 6)), m2);
            } else {
                uint8x16_t b0 = vld1q_u8(w), b1 = vld1q_u8(w + 16);
                c0 = vandq_u8(b0, m4);
                c1 = vandq_u8(b1, m4);
                h0 = vshrq_n_u8(b0, 4);
                h1 = vshrq_n_u8(b1, 4);
            }
            for (int m = 0; m < m_count; m++) {
                const int8_t *a = aq + m * a_stride + j * bs + c;
                int8x16_t a0 = vld1q_s8(a), a1 = vld1q_s8(a + 16);
                isum[m] = dot16_neon(dot16_neon(isum[m], c0, a0), c1, a1);
                if (bits == 8) {
                    int32x4_t h = dot16_neon(dot16_neon(vdupq_n_s32(0), h0, a0), h1, a1);
                    isum[m] = vaddq_s32(isum[m], vshlq_n_s32(h, 4));
                }
            }
        }
        for (int m = 0; m < m_count; m++) {
            float f = ws * as[m * p->blocks + j];
            acc[m] = vfmaq_n_f32(acc[m], vcvtq_f32_s32(isum[m]), f);
            corr[m] += f * (float)(zp * asum[m * p->blocks + j]);
        }
    }
    for (int m = 0; m < m_count; m++) out[m] = vaddvq_f32(acc[m]) - corr[m];
}
#endif

static void row_int8_c(const proj_t *p, int64_t n, int bits, int64_t bs, const int8_t *aq, int64_t a_stride,
                       const float *as, const int32_t *asum, int m_count, float *out) {
    const uint8_t *wrow = p->qweight + n * p->blocks * p->block_bytes;
    for (int m = 0; m < m_count; m++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < p->blocks; j++) {
            float f = load_f32(p->scales, n * p->blocks + j) * as[m * p->blocks + j];
            int32_t d = block_dot_c(wrow + j * p->block_bytes, aq + m * a_stride + j * bs, bs, bits);
            acc += f * (float)(d - zero_point(p, n, j, bits) * asum[m * p->blocks + j]);
        }
        out[m] = acc;
    }
}

/* float32 compute (accuracy level 0): dequantized weights times float activations. */
static void row_float(const proj_t *p, int64_t n, int bits, int64_t bs, const float *x, int64_t x_stride, int m_count,
                      float *out) {
    const uint8_t *wrow = p->qweight + n * p->blocks * p->block_bytes;
    for (int m = 0; m < m_count; m++) out[m] = 0.0f;
    for (int64_t j = 0; j < p->blocks; j++) {
        const uint8_t *w = wrow + j * p->block_bytes;
        float ws = load_f32(p->scales, n * p->blocks + j);
        float zp = (float)zero_point(p, n, j, bits);
        int64_t stop = (j + 1) * bs < p->k ? bs : p->k - j * bs;
        for (int m = 0; m < m_count; m++) {
            const float *xs = x + m * x_stride + j * bs;
            float acc = 0.0f;
            for (int64_t i = 0; i < stop; i++) {
                acc += ((float)code_at(w, i, bits) - zp) * ws * xs[i];
            }
            out[m] += acc;
        }
    }
}

/* ------------------------------------------------------------------ one projection for a tile */

typedef struct {
    int bits;
    int64_t bs;
    int int8;
} math_t;

/* y[m, n] for rows n of `p`, m < m_count; inputs quantized (int8) or float, per `math`. */
static void project_rows(const proj_t *p, const math_t *math, const int8_t *aq, const float *as, const int32_t *asum,
                         const float *x, float *y, int64_t y_stride, int m_count, int64_t first, int64_t end) {
    int64_t a_stride = p->blocks * math->bs;
    float out[TILE], out1[TILE];
    int simd = math->int8 && math->bs % CHUNK == 0;
#ifdef FATE_X86
    /* codes the two-row prefill pass takes as they are (NAME##_rows2) */
    int plain = (math->bits == 4 && math->bs % 64 == 0) || math->bits == 8;
#endif
    for (int64_t n = first; n < end;) {
        int rows = 1;
#ifdef FATE_X86
        if (simd && plain && m_count >= 4 && n + 2 <= end && (kernel == K_VNNI512 || kernel == K_VNNI)) {
            rows = 2; /* out[m] is row n, out1[m] row n + 1 */
            if (kernel == K_VNNI512) row_int8_vnni512_rows2(p, n, math->bits, math->bs, aq, a_stride, as, asum, m_count, out, out1);
            else row_int8_vnni_rows2(p, n, math->bits, math->bs, aq, a_stride, as, asum, m_count, out, out1);
        } else if (simd && kernel != K_PORTABLE && m_count == 1 && n + 4 <= end) {
            rows = 4; /* out[r] is row n + r */
            if (kernel == K_VNNI512) row_int8_vnni512_rows4(p, n, math->bits, math->bs, aq, as, asum, out);
            else if (kernel == K_VNNI) row_int8_vnni_rows4(p, n, math->bits, math->bs, aq, as, asum, out);
            else row_int8_avx2_rows4(p, n, math->bits, math->bs, aq, as, asum, out);
        } else if (simd && kernel == K_VNNI512)
            row_int8_vnni512(p, n, math->bits, math->bs, aq, a_stride, as, asum, m_count, out);
        else if (simd && kernel == K_VNNI)
            row_int8_vnni(p, n, math->bits, math->bs, aq, a_stride, as, asum, m_count, out);
        else if (simd && kernel == K_AVX2)
            row_int8_avx2(p, n, math->bits, math->bs, aq, a_stride, as, asum, m_count, out);
        else
#endif
#ifdef FATE_NEON
        if (simd && kernel == K_NEON)
            row_int8_neon(p, n, math->bits, math->bs, aq, a_stride, as, asum, m_count, out);
        else
#endif
        if (math->int8)
            row_int8_c(p, n, math->bits, math->bs, aq, a_stride, as, asum, m_count, out);
        else
            row_float(p, n, math->bits, math->bs, x, p->k, m_count, out);
        if (rows == 4) {
            for (int r = 0; r < 4; r++) y[n + r] = out[r] + (p->bias ? load_f32(p->bias, n + r) : 0.0f);
        } else if (rows == 2) {
            float b0 = p->bias ? load_f32(p->bias, n) : 0.0f, b1 = p->bias ? load_f32(p->bias, n + 1) : 0.0f;
            for (int m = 0; m < m_count; m++) {
                y[m * y_stride + n] = out[m] + b0;
                y[m * y_stride + n + 1] = out1[m] + b1;
            }
        } else {
            float b = p->bias ? load_f32(p->bias, n) : 0.0f;
            for (int m = 0; m < m_count; m++) y[m * y_stride + n] = out[m] + b;
        }
        n += rows;
    }
}

static void project(const proj_t *p, const math_t *math, const int8_t *aq, const float *as, const int32_t *asum,
                    const float *x, float *y, int64_t y_stride, int m_count) {
    project_rows(p, math, aq, as, asum, x, y, y_stride, m_count, 0, p->n);
}

/* ------------------------------------------------------------------ the call */

typedef struct {
    int64_t hidden, inter;
    math_t math;
    int activation;
    float limit, alpha;
    int64_t offsets[12];
    int has_bias;
    /* inputs */
    const float *x;
    int64_t tokens;
    const uint8_t **experts;
    const int32_t *starts, *rows, *dest;
    float *y;
    /* x quantized once for the gate and up projections */
    int8_t *xq;
    float *xs;
    int32_t *xsum;
    /* tasks: (expert, first assignment, count) */
    int64_t (*tasks)[3];
    atomic_int failed;
} call_t;

static proj_t projection(const call_t *c, const uint8_t *base, int which) {
    proj_t p;
    p.n = which == 2 ? c->hidden : c->inter;
    p.k = which == 2 ? c->inter : c->hidden;
    p.blocks = (p.k + c->math.bs - 1) / c->math.bs;
    p.block_bytes = c->math.bs * c->math.bits / 8;
    p.zero_row = (p.blocks * c->math.bits + 7) / 8;
    const int64_t *o = c->offsets + 4 * which;
    p.qweight = base + o[T_QWEIGHT];
    p.scales = base + o[T_SCALES];
    p.zeros = base + o[T_ZEROS];
    p.bias = c->has_bias ? base + o[T_BIAS] : NULL;
    return p;
}

static inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

static void run_task(void *ctx, int64_t t) {
    call_t *c = ctx;
    int64_t expert = c->tasks[t][0], first = c->tasks[t][1];
    int m_count = (int)c->tasks[t][2];
    const uint8_t *base = c->experts[expert];
    proj_t up = projection(c, base, 1), down = projection(c, base, 2);
    proj_t gate = c->activation == ACT_RELU2 ? up : projection(c, base, 0); /* relu2: no gate, never read */
    int64_t h = c->hidden, in = c->inter, gb = gate.blocks, db = down.blocks, bs = c->math.bs;
    /* float scratch, then int32, then int8 (alignment) */
    size_t floats = (size_t)m_count * (size_t)(3 * in + 2 * h + db + gb);
    size_t ints = (size_t)m_count * (size_t)(db + gb);
    size_t bytes = (size_t)m_count * (size_t)(db + gb) * (size_t)bs;
    uint8_t *scratch = malloc(4 * (floats + ints) + bytes + 1);
    if (!scratch) { atomic_store(&c->failed, 1); return; }
    float *g = (float *)scratch, *u = g + m_count * in, *act = u + m_count * in, *out = act + m_count * in;
    float *xin = out + m_count * h, *hs = xin + m_count * h, *xs = hs + m_count * db;
    int32_t *hsum = (int32_t *)(xs + m_count * gb), *xsum = hsum + m_count * db;
    int8_t *hq = (int8_t *)(xsum + m_count * gb), *xq = hq + m_count * db * bs;
    /* gather this tile's tokens: quantized rows (int8 math) or float rows */
    for (int m = 0; m < m_count; m++) {
        int64_t row = c->rows[first + m];
        if (c->math.int8) {
            memcpy(xq + m * gb * bs, c->xq + row * gb * bs, (size_t)(gb * bs));
            memcpy(xs + m * gb, c->xs + row * gb, (size_t)gb * sizeof(float));
            memcpy(xsum + m * gb, c->xsum + row * gb, (size_t)gb * sizeof(int32_t));
        } else {
            memcpy(xin + m * h, c->x + row * h, (size_t)h * sizeof(float));
        }
    }
    if (c->activation != ACT_RELU2) project(&gate, &c->math, xq, xs, xsum, xin, g, in, m_count);
    project(&up, &c->math, xq, xs, xsum, xin, u, in, m_count);
    for (int64_t i = 0; i < m_count * in; i++) {
        float uv = u[i];
        if (c->activation == ACT_RELU2) {
            float r = uv > 0.0f ? uv : 0.0f;
            act[i] = r * r;
            continue;
        }
        float gv = g[i];
        if (c->activation == ACT_SWIGLU_CLAMPED) {
            gv = gv < c->limit ? gv : c->limit;
            uv = uv < -c->limit ? -c->limit : (uv > c->limit ? c->limit : uv);
            act[i] = (uv + 1.0f) * gv * sigmoid(c->alpha * gv);
        } else {
            act[i] = gv * sigmoid(gv) * uv;
        }
    }
    if (c->math.int8)
        for (int m = 0; m < m_count; m++)
            quantize_row(act + m * in, in, bs, c->math.bits, hq + m * db * bs, hs + m * db, hsum + m * db);
    project(&down, &c->math, hq, hs, hsum, act, out, h, m_count);
    for (int m = 0; m < m_count; m++)
        memcpy(c->y + (int64_t)c->dest[first + m] * h, out + m * h, (size_t)h * sizeof(float));
    free(scratch);
}

/* ------------------------------------------------------------------ a small persistent pool */

typedef void (*task_fn)(void *ctx, int64_t task);

/* A call publishes a new generation; pool threads watch for it (spinning a while, then asleep), join
 * while it is open and take tasks until none is left. The caller takes tasks too, then closes the
 * generation and waits only for threads that joined: a thread still waking up never holds a call
 * back, and never sees a call that is over. Waits on both sides spin: a thread that joined is
 * running a task of microseconds, and a futex wake-up costs tens of microseconds on a VM, several
 * times per decoder layer. */
typedef struct {
    pthread_mutex_t lock; /* for sleeping only */
    pthread_cond_t wake;
    int workers;
    atomic_ulong generation, open; /* the latest call; the one threads may join (0: none) */
    atomic_int joined, sleepers;
    task_fn fn;
    void *ctx;
    int64_t task_count;
    atomic_llong next;
} pool_t;

static pool_t pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, NULL, NULL, 0, 0};
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;

/* How long a pool thread watches for the next call before it sleeps: a decoder layer's step is
 * several parallel calls a few microseconds apart, then the routed experts. Short enough that a
 * thread left watching after a token costs the cores little. */
#define SPIN_NS 150000

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void cpu_relax(void) {
#ifdef FATE_X86
    _mm_pause();
#elif defined(FATE_NEON)
    __asm__ __volatile__("yield");
#endif
}

static void drain(task_fn fn, void *ctx, int64_t count) {
    for (;;) {
        int64_t t = atomic_fetch_add(&pool.next, 1);
        if (t >= count) return;
        fn(ctx, t);
    }
}

static void *worker(void *arg) {
    (void)arg;
    unsigned long seen = atomic_load(&pool.generation);
    for (;;) {
        int64_t until = now_ns() + SPIN_NS;
        for (int i = 0; atomic_load(&pool.generation) == seen; i++) {
            if ((i & 255) == 255 && now_ns() > until) {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.lock);
                break;
            }
            cpu_relax();
        }
        seen = atomic_load(&pool.generation);
        atomic_fetch_add(&pool.joined, 1);
        if (atomic_load(&pool.open) == seen) /* fn, ctx and count were written before it opened */
            drain(pool.fn, pool.ctx, pool.task_count);
        atomic_fetch_sub(&pool.joined, 1);
    }
    return NULL;
}

static int ensure_workers(int wanted) {
    while (pool.workers < wanted) {
        if (start_detached(worker) != 0) return -1;
        pool.workers++;
    }
    return 0;
}

/* Run tasks 0..count-1 of `fn`, with pool threads (up to `helpers` of them) beside the calling one
 * (call_lock held). */
static void run_all(task_fn fn, void *ctx, int64_t count, int helpers) {
    atomic_store(&pool.next, 0);
    if (helpers <= 0 || count <= 1 || ensure_workers(helpers) != 0 || pool.workers == 0) {
        drain(fn, ctx, count);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.task_count = count;
    unsigned long generation = atomic_load(&pool.generation) + 1;
    atomic_store(&pool.open, generation);
    atomic_store(&pool.generation, generation);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    drain(fn, ctx, count);
    atomic_store(&pool.open, 0);
    while (atomic_load(&pool.joined) > 0) cpu_relax();
}


/* ------------------------------------------------------------------ the entry points */

int fate_layout_check(const fate_layout *l) {
    if (l->hidden <= 0 || l->inter <= 0 || l->hidden > (1 << 20) || l->inter > (1 << 20)) return -1;
    if (l->bits != 2 && l->bits != 4 && l->bits != 8) return -1;
    if (l->block < 16 || l->block > (1 << 16) || (l->block & (l->block - 1))) return -1;
    if (l->activation != ACT_SWIGLU && l->activation != ACT_SWIGLU_CLAMPED && l->activation != ACT_RELU2) return -1;
    return 0;
}

static int64_t tensor_bytes(const fate_layout *l, int which, int part) {
    if (which == 0 && l->activation == ACT_RELU2) return 0; /* no gate projection */
    int64_t n = which == 2 ? l->hidden : l->inter, k = which == 2 ? l->inter : l->hidden;
    int64_t blocks = (k + l->block - 1) / l->block;
    switch (part) {
        case T_QWEIGHT: return n * blocks * l->block * l->bits / 8;
        case T_SCALES: return n * blocks * 4;
        case T_ZEROS: return n * ((blocks * l->bits + 7) / 8);
        default: return l->has_bias ? n * 4 : 0;
    }
}

int64_t fate_layout_bytes(const fate_layout *l) {
    int64_t need = 0;
    for (int which = 0; which < 3; which++)
        for (int part = 0; part < 4; part++) {
            int64_t size = tensor_bytes(l, which, part), off = l->offsets[4 * which + part];
            if (size == 0) continue;
            if (off < 0 || off > INT64_MAX - size) return -1;
            if (off + size > need) need = off + size;
        }
    return need;
}

/* Pool threads worth waking beside the caller's for `tasks` passes over an expert's weights. */
static int helper_count(const fate_layout *l, int64_t tasks, int threads) {
    int64_t worth = tasks * fate_layout_bytes(l) / BYTES_PER_THREAD - 1;
    int helpers = threads > 1 ? threads - 1 : 0;
    return worth < helpers ? (worth > 0 ? (int)worth : 0) : helpers;
}

/* fate_run_experts with call_lock held by the caller (a decode step runs its layer's experts itself) */
static int run_experts_locked(const fate_layout *l, const uint8_t *const *experts, int64_t n_experts, const float *x,
                              int64_t tokens, const int32_t *starts, const int32_t *rows, const int32_t *dest,
                              float *y, int threads) {
    call_t c;
    memset(&c, 0, sizeof c);
    c.hidden = l->hidden; c.inter = l->inter;
    c.math.bits = l->bits; c.math.bs = l->block; c.math.int8 = l->int8;
    c.activation = l->activation; c.has_bias = l->has_bias;
    c.limit = l->limit; c.alpha = l->alpha;
    memcpy(c.offsets, l->offsets, sizeof c.offsets);
    c.x = x; c.tokens = tokens; c.experts = (const uint8_t **)experts;
    c.starts = starts; c.rows = rows; c.dest = dest; c.y = y;
    int64_t task_count = 0;
    for (int64_t e = 0; e < n_experts; e++) task_count += (starts[e + 1] - starts[e] + TILE - 1) / TILE;
    int64_t blocks = (c.hidden + c.math.bs - 1) / c.math.bs;
    int rc = -1;
    c.tasks = malloc((size_t)(task_count + 1) * sizeof *c.tasks);
    if (c.math.int8) {
        c.xq = malloc((size_t)(tokens * blocks * c.math.bs + 1));
        c.xs = malloc((size_t)(tokens * blocks + 1) * sizeof(float));
        c.xsum = malloc((size_t)(tokens * blocks + 1) * sizeof(int32_t));
    }
    if (!c.tasks || (c.math.int8 && (!c.xq || !c.xs || !c.xsum))) goto done;
    int64_t t = 0;
    for (int64_t e = 0; e < n_experts; e++)
        for (int64_t a = starts[e]; a < starts[e + 1]; a += TILE) {
            c.tasks[t][0] = e;
            c.tasks[t][1] = a;
            c.tasks[t][2] = starts[e + 1] - a < TILE ? starts[e + 1] - a : TILE;
            t++;
        }
    if (c.math.int8) {
        /* only the rows these experts read: a prefill's misses run a few experts a call against the chunk's
         * every token (a row quantized costs about 6 us at hidden 2048; 192 rows were 1.1 ms a call) */
        uint8_t *used = calloc((size_t)tokens + 1, 1);
        if (!used) goto done;
        for (int64_t i = starts[0]; i < starts[n_experts]; i++) used[rows[i]] = 1;
        for (int64_t row = 0; row < tokens; row++)
            if (used[row])
                quantize_row(x + row * c.hidden, c.hidden, c.math.bs, c.math.bits, c.xq + row * blocks * c.math.bs,
                             c.xs + row * blocks, c.xsum + row * blocks);
        free(used);
    }
    run_all(run_task, &c, task_count, helper_count(l, task_count, threads));
    rc = atomic_load(&c.failed) ? -1 : 0;
done:
    free(c.tasks);
    free(c.xq);
    free(c.xs);
    free(c.xsum);
    return rc;
}

int fate_run_experts(const fate_layout *l, const uint8_t *const *experts, int64_t n_experts, const float *x,
                     int64_t tokens, const int32_t *starts, const int32_t *rows, const int32_t *dest, float *y,
                     int threads) {
    pthread_mutex_lock(&call_lock);
    int rc = run_experts_locked(l, experts, n_experts, x, tokens, starts, rows, dest, y, threads);
    pthread_mutex_unlock(&call_lock);
    return rc;
}

/* ------------------------------------------------------------------ a decoder layer's decode step */

typedef struct {
    int64_t n, k;
    int required;
} step_matrix;

/* A quantized projection of the step: rows n, inputs k, its three tensors' offsets. */
static proj_t step_projection(const fate_step *s, const uint8_t *base, int weight, int64_t n, int64_t k) {
    proj_t p;
    int bits = (int)s->v[S_BITS];
    int64_t bs = s->v[S_BLOCK];
    p.n = n;
    p.k = k;
    p.blocks = (k + bs - 1) / bs;
    p.block_bytes = bs * bits / 8;
    p.zero_row = (p.blocks * bits + 7) / 8;
    p.qweight = base + s->v[S_OFFSETS + weight];
    p.scales = base + s->v[S_OFFSETS + weight + 1];
    p.zeros = base + s->v[S_OFFSETS + weight + 2];
    p.bias = NULL;
    return p;
}

/* rows and inputs of the step's quantized projections */
static void step_shapes(const fate_step *s, int64_t shape[4][2]) {
    const int64_t *v = s->v;
    int64_t h = v[S_HIDDEN], d = v[S_HEAD_DIM];
    shape[0][0] = (v[S_HEADS] + 2 * v[S_KV_HEADS]) * d; shape[0][1] = h;    /* q|k|v */
    shape[1][0] = h; shape[1][1] = v[S_HEADS] * d;                          /* o */
    shape[2][0] = 2 * v[S_SHARED_INTER]; shape[2][1] = h;                   /* shared gate|up */
    shape[3][0] = h; shape[3][1] = v[S_SHARED_INTER];                       /* shared down */
}

static int64_t grow(int64_t need, int64_t off, int64_t size) {
    if (need < 0 || off < 0 || size < 0 || off > INT64_MAX - size) return -1;
    return off + size > need ? off + size : need;
}

int64_t fate_step_bytes(const fate_step *s) {
    const int64_t *v = s->v, *o = v + S_OFFSETS;
    int64_t h = v[S_HIDDEN], bits = v[S_BITS], bs = v[S_BLOCK];
    for (int i = S_HIDDEN; i <= S_SHARED_INTER; i++)
        if (v[i] < 0 || v[i] > (1 << 20)) return -1;
    if (h <= 0 || v[S_HEADS] <= 0 || v[S_KV_HEADS] <= 0 || v[S_HEAD_DIM] <= 0 || v[S_HEADS] % v[S_KV_HEADS] ||
        2 * v[S_ROT_HALF] > v[S_HEAD_DIM] || v[S_EXPERTS] <= 0 || v[S_TOP_K] <= 0 || v[S_TOP_K] > v[S_EXPERTS] ||
        v[S_WINDOW] < 0 || (v[S_INT8] != 0 && v[S_INT8] != 1) || (v[S_NORMALIZE] != 0 && v[S_NORMALIZE] != 1))
        return -1;
    if ((bits != 2 && bits != 4 && bits != 8) || bs < 16 || bs > (1 << 16) || (bs & (bs - 1))) return -1;
    if (!isfinite(s->eps) || !isfinite(s->scale) || !isfinite(s->shared_scale) || !isfinite(s->routed_scaling))
        return -1;
    int shared = v[S_SHARED_INTER] > 0;
    int64_t shape[4][2];
    step_shapes(s, shape);
    const int weights[4] = {T_QKV_W, T_O_W, T_GU_W, T_DOWN_W};
    int64_t need = 0;
    for (int m = 0; m < 4; m++) {
        int64_t n = shape[m][0], blocks = (shape[m][1] + bs - 1) / bs;
        if (m >= 2 && !shared) {
            if (o[weights[m]] != -1 || o[weights[m] + 1] != -1 || o[weights[m] + 2] != -1) return -1;
            continue;
        }
        need = grow(need, o[weights[m]], n * blocks * (bs * bits / 8));
        need = grow(need, o[weights[m] + 1], n * blocks * 4);
        need = grow(need, o[weights[m] + 2], n * ((blocks * bits + 7) / 8));
    }
    need = grow(need, o[T_ATTN_NORM], h * 4);
    need = grow(need, o[T_MLP_NORM], h * 4);
    need = grow(need, o[T_ROUTER], h * v[S_EXPERTS] * 4);
    /* optional tensors: absent (-1), or inside the buffer */
    if (o[T_QKV_B] != -1) need = grow(need, o[T_QKV_B], shape[0][0] * 4);
    if (o[T_SHARED_GATE] != -1) need = shared ? grow(need, o[T_SHARED_GATE], h * 4) : -1;
    if ((o[T_NEXT_ROUTER] == -1) != (v[S_NEXT_EXPERTS] == 0)) return -1;
    if (o[T_NEXT_ROUTER] != -1) need = grow(need, o[T_NEXT_ROUTER], h * v[S_NEXT_EXPERTS] * 4);
    if (o[T_NEXT_NORM] != -1) need = o[T_NEXT_ROUTER] != -1 ? grow(need, o[T_NEXT_NORM], h * 4) : -1;
    int64_t e = v[S_EXPERTS], groups = v[S_GROUPS], kept = v[S_KEPT], sigmoid_routing = v[S_SCORING] == 1;
    if (v[S_SCORING] < 0 || v[S_SCORING] > 1 || !isfinite(s->topk_eps) || s->topk_eps < 0.0f) return -1;
    if (groups != 0 && (!sigmoid_routing || groups < 0 || groups > 4096 || e % groups || e / groups < 2 || kept < 1 ||
                        kept > groups ||
                        kept * (e / groups) < v[S_TOP_K]))
        return -1;
    if (!sigmoid_routing && (o[T_SCORE_BIAS] != -1 || o[T_NEXT_SCORE_BIAS] != -1)) return -1;
    if (o[T_SCORE_BIAS] != -1) need = grow(need, o[T_SCORE_BIAS], e * 4);
    if (o[T_O_B] != -1) need = grow(need, o[T_O_B], h * 4);
    if (o[T_NEXT_SCORE_BIAS] != -1)
        need = o[T_NEXT_ROUTER] != -1 ? grow(need, o[T_NEXT_SCORE_BIAS], v[S_NEXT_EXPERTS] * 4) : -1;
    if (v[S_QK_NORM] < 0 || v[S_QK_NORM] > 2 || (o[T_Q_NORM] == -1) != (v[S_QK_NORM] == 0) ||
        (o[T_K_NORM] == -1) != (v[S_QK_NORM] == 0) || !(s->clip >= 0.0f) || isinf(s->clip))
        return -1;
    if (v[S_QK_NORM] != 0) { /* a weight per head dim, or per channel of the whole projection */
        int64_t d = v[S_HEAD_DIM], each = v[S_QK_NORM] == 1;
        need = grow(need, o[T_Q_NORM], (each ? d : v[S_HEADS] * d) * 4);
        need = grow(need, o[T_K_NORM], (each ? d : v[S_KV_HEADS] * d) * 4);
    }
    return need;
}

typedef struct {
    proj_t proj;
    math_t math;
    const int8_t *aq;
    const float *as;
    const int32_t *asum;
    const float *x;
    float *y;
    int m_count; /* tokens a projection computes at once (1 in decode, up to TILE in prefill) */
    int64_t rows_per_task;
    /* attention */
    const float *q;
    float *context;
    const float *key, *value;
    int64_t capacity, first, last, head_dim, group;
    float scale;
    float *scores; /* [heads, positions] */
} step_t;

/* A projection's rows are split into this many tasks per thread: long runs of rows (one stream per
 * thread for the hardware prefetcher), and a thread that joins late still finds work. */
#define STEP_TASKS_PER_THREAD 8

static void rows_task(void *ctx, int64_t t) {
    step_t *st = ctx;
    int64_t first = t * st->rows_per_task, end = first + st->rows_per_task;
    if (end > st->proj.n) end = st->proj.n;
    project_rows(&st->proj, &st->math, st->aq, st->as, st->asum, st->x, st->y, st->proj.n, st->m_count, first, end);
}

/* y [m_count, n] = x @ W^T for st->m_count tokens in one pass over the weights, rows shared among the
 * caller and up to threads - 1 pool threads */
static void step_project(step_t *st, const proj_t *p, const int8_t *aq, const float *as, const int32_t *asum,
                         const float *x, float *y, int threads) {
    st->proj = *p;
    st->aq = aq; st->as = as; st->asum = asum; st->x = x; st->y = y;
    int64_t worth = p->n * p->blocks * p->block_bytes / BYTES_PER_THREAD - 1;
    int helpers = threads > 1 ? threads - 1 : 0;
    if (worth < helpers) helpers = worth > 0 ? (int)worth : 0;
    int64_t split = (int64_t)(helpers + 1) * STEP_TASKS_PER_THREAD;
    int64_t rows = ((p->n + split - 1) / split + 3) / 4 * 4; /* whole passes of the four-row decode kernel */
    st->rows_per_task = rows;
    int64_t tasks = (p->n + rows - 1) / rows;
    run_all(rows_task, st, tasks, helpers);
}

/* sum a[j] * b[j] in eight interleaved partial sums (a fixed order the compiler can keep in vectors) */
static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[j + l] * b[j + l];
    for (; j < n; j++) acc[j & 7] += a[j] * b[j];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static void head_task(void *ctx, int64_t h) {
    step_t *st = ctx;
    int64_t d = st->head_dim, g = h / st->group, count = st->last - st->first + 1;
    const float *q = st->q + h * d;
    const float *keys = st->key + g * st->capacity * d, *values = st->value + g * st->capacity * d;
    float *scores = st->scores + h * count, *out = st->context + h * d;
    float peak = -INFINITY;
    for (int64_t t = 0; t < count; t++) {
        scores[t] = dot(q, keys + (st->first + t) * d, d) * st->scale;
        if (scores[t] > peak) peak = scores[t];
    }
    float total = 0.0f;
    for (int64_t t = 0; t < count; t++) {
        scores[t] = expf(scores[t] - peak);
        total += scores[t];
    }
    for (int64_t j = 0; j < d; j++) out[j] = 0.0f;
    for (int64_t t = 0; t < count; t++) {
        const float *val = values + (st->first + t) * d;
        float p = scores[t] / total;
        for (int64_t j = 0; j < d; j++) out[j] += p * val[j];
    }
}

/* x / sqrt(mean(x^2) + eps) * w; returns nothing, writes y */
static void rms_norm(const float *x, const uint8_t *w, int64_t n, float eps, float *y) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(sum / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * inv * load_f32(w, i);
}

/* y[e] = sum_k x[k] * W[k, e], W float32 [K, E] (a MatMul's weight) */
static void matvec(const float *x, const uint8_t *w, int64_t k_count, int64_t e_count, float *y) {
    for (int64_t e = 0; e < e_count; e++) y[e] = 0.0f;
    for (int64_t k = 0; k < k_count; k++) {
        float xk = x[k];
        const uint8_t *row = w + k * e_count * 4;
        for (int64_t e = 0; e < e_count; e++) y[e] += xk * load_f32(row, e);
    }
}

static void rotate(float *head, const float *cos, const float *sin, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float a = head[i], b = head[i + half];
        head[i] = a * cos[i] - b * sin[i];
        head[i + half] = b * cos[i] + a * sin[i];
    }
}

/* The top_k experts by `rank` (ties: the lower index), weighted by `weight_of`, optionally renormalized
 * (eps added to the sum), times the scaling: both routers end here. */
static void pick_top_k(const float *rank, const float *weight_of, int64_t experts, int64_t top_k, int normalize,
                       float eps, float scaling, int64_t *ids, float *weights) {
    float sum = 0.0f;
    for (int64_t j = 0; j < top_k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < experts; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || rank[e] > rank[best])) best = e;
        }
        ids[j] = best;
        weights[j] = weight_of[best];
        sum += weights[j];
    }
    for (int64_t j = 0; j < top_k; j++) {
        if (normalize) weights[j] /= sum + eps;
        weights[j] *= scaling;
    }
}

/* softmax over the router's logits, the top_k largest, optionally renormalized */
static void route_top_k(const float *logits, int64_t experts, int64_t top_k, int normalize, float scaling,
                        float *probs, int64_t *ids, float *weights) {
    float peak = -INFINITY, total = 0.0f;
    for (int64_t e = 0; e < experts; e++) peak = logits[e] > peak ? logits[e] : peak;
    for (int64_t e = 0; e < experts; e++) total += probs[e] = expf(logits[e] - peak);
    for (int64_t e = 0; e < experts; e++) probs[e] /= total;
    pick_top_k(probs, probs, experts, top_k, normalize, 0.0f, scaling, ids, weights);
}

/* The routed experts of a step's token, added to the residual in the router's order: what the runtime's
 * Python does with the experts' outputs, operation for operation (each weighted output rounded, then
 * added), so the sum has the same bits either way. 1, the residual untouched, when a chosen expert has
 * no bytes here (not resident: the caller runs them). */
static int add_routed(const fate_layout *routed, const uint8_t *const *experts, const int64_t *ids, const float *weights,
                      int64_t top_k, const float *x, float *residual, int threads) {
    int64_t h = routed->hidden;
    for (int64_t j = 0; j < top_k; j++)
        if (!experts[ids[j]]) return 1;
    const uint8_t **chosen = calloc((size_t)top_k, sizeof *chosen);
    int32_t *index = malloc((size_t)(3 * top_k + 1) * sizeof *index);
    float *y = malloc((size_t)(top_k * h) * sizeof *y);
    int rc = -1;
    if (chosen && index && y) {
        int32_t *starts = index, *rows = index + top_k + 1, *dest = rows + top_k;
        for (int64_t j = 0; j < top_k; j++) {
            chosen[j] = experts[ids[j]];
            starts[j] = (int32_t)j;
            rows[j] = 0;
            dest[j] = (int32_t)j;
        }
        starts[top_k] = (int32_t)top_k;
        rc = run_experts_locked(routed, chosen, top_k, x, 1, starts, rows, dest, y, threads);
        for (int64_t j = 0; rc == 0 && j < top_k; j++)
            for (int64_t i = 0; i < h; i++) {
                float weighted = y[j * h + i] * weights[j];
                residual[i] += weighted;
            }
    }
    free(chosen);
    free(index);
    free(y);
    return rc;
}

/* DeepSeek-V3's routing, as the graph computes it: score = sigmoid(logit); experts chosen by score +
 * bias (`bias` may be NULL) among the `kept` best of `groups` groups (a group's worth: the sum of its two
 * best; a group ties into the kept ones at the threshold), top_k of them (ties: the lower index);
 * weighted by the plain score, optionally renormalized (+ eps), times the scaling. */
static void route_sigmoid(const float *logits, const uint8_t *bias, int64_t experts, int64_t groups, int64_t kept,
                          int64_t top_k, int normalize, float eps, float scaling, float *scores, float *choice,
                          int64_t *ids, float *weights) {
    for (int64_t e = 0; e < experts; e++) {
        scores[e] = sigmoid(logits[e]);
        choice[e] = bias ? scores[e] + load_f32(bias, e) : scores[e];
    }
    if (groups > 0) {
        int64_t size = experts / groups;
        float worth[groups], sorted[groups];
        for (int64_t g = 0; g < groups; g++) {
            float best = -INFINITY, second = -INFINITY;
            for (int64_t i = 0; i < size; i++) {
                float c = choice[g * size + i];
                if (c > best) { second = best; best = c; }
                else if (c > second) second = c;
            }
            worth[g] = sorted[g] = best + second;
        }
        for (int64_t i = 0; i < kept; i++) /* the kept-th largest worth, by selection */
            for (int64_t j = i + 1; j < groups; j++)
                if (sorted[j] > sorted[i]) { float t = sorted[i]; sorted[i] = sorted[j]; sorted[j] = t; }
        float threshold = sorted[kept - 1];
        for (int64_t g = 0; g < groups; g++)
            if (!(worth[g] >= threshold))
                for (int64_t i = 0; i < size; i++) choice[g * size + i] = -INFINITY;
    }
    pick_top_k(choice, scores, experts, top_k, normalize, eps, scaling, ids, weights);
}

/* the scores a router's prediction is ranked by: its logits (softmax keeps their order), or with sigmoid
 * routing the scores plus the correction bias */
static void choice_scores(float *logits, int64_t count, int sigmoid_routing, const uint8_t *bias) {
    for (int64_t e = 0; sigmoid_routing && e < count; e++)
        logits[e] = bias ? sigmoid(logits[e]) + load_f32(bias, e) : sigmoid(logits[e]);
}

int fate_add_routed(const fate_layout *routed, const uint8_t *const *experts, const int64_t *ids, const float *weights,
                    int64_t top_k, const float *x, float *residual, int threads) {
    pthread_mutex_lock(&call_lock);
    int rc = add_routed(routed, experts, ids, weights, top_k, x, residual, threads);
    pthread_mutex_unlock(&call_lock);
    return rc;
}

/* the state of a step's projections for one token, at the step's precision */
static step_t one_token(const fate_step *s) {
    step_t st;
    memset(&st, 0, sizeof st);
    st.math.bits = (int)s->v[S_BITS];
    st.math.bs = s->v[S_BLOCK];
    st.math.int8 = (int)s->v[S_INT8];
    st.m_count = 1;
    return st;
}

/* The step's front (call_lock held): attention, routing and the next layer's prediction; the stream after
 * attention left in `residual` for step_finish. */
static int step_route(const fate_step *s, const uint8_t *base, const float *x, float *key, float *value,
                      int64_t capacity, int64_t pos, const float *cos, const float *sin, float *residual,
                      float *router_input, int64_t *ids, float *weights, float *next_logits, float *next_logits_norm,
                      int threads) {
    const int64_t *v = s->v, *o = v + S_OFFSETS;
    int64_t h = v[S_HIDDEN], heads = v[S_HEADS], kv = v[S_KV_HEADS], d = v[S_HEAD_DIM], half = v[S_ROT_HALF];
    int64_t experts = v[S_EXPERTS], bs = v[S_BLOCK];
    int64_t shape[4][2];
    step_shapes(s, shape);
    int64_t widest = h > 2 * experts ? h : 2 * experts; /* the router's logits, and sigmoid routing's choice */
    for (int m = 0; m < 2; m++) widest = shape[m][0] > widest ? shape[m][0] : widest;
    int64_t first = v[S_WINDOW] > 0 && pos + 1 > v[S_WINDOW] ? pos + 1 - v[S_WINDOW] : 0;
    int64_t count = pos - first + 1;
    /* float scratch: normed, projection out, context, attention out, renormed, probs, scores; then the
     * int8 activations, their scales and sums (for the widest input) */
    int64_t inputs = heads * d > h ? heads * d : h;
    int64_t blocks = (inputs + bs - 1) / bs;
    size_t floats = (size_t)(h + widest + heads * d + 2 * h + experts + heads * count + blocks);
    size_t bytes = 4 * floats + 4 * (size_t)blocks + (size_t)(blocks * bs) + 64;
    uint8_t *scratch = malloc(bytes);
    if (!scratch) return -1;
    float *normed = (float *)scratch, *y = normed + h, *context = y + widest, *attn = context + heads * d;
    float *renormed = attn + h, *probs = renormed + h, *scores = probs + experts;
    float *as = scores + heads * count;
    int32_t *asum = (int32_t *)(as + blocks);
    int8_t *aq = (int8_t *)(asum + blocks);
    float *hidden = residual;
    step_t st = one_token(s);
    /* attention: q|k|v of the normed token */
    rms_norm(x, base + o[T_ATTN_NORM], h, s->eps, normed);
    proj_t qkv = step_projection(s, base, T_QKV_W, shape[0][0], h);
    if (st.math.int8) quantize_row(normed, h, bs, st.math.bits, aq, as, asum);
    step_project(&st, &qkv, aq, as, asum, normed, y, threads);
    if (o[T_QKV_B] != -1)
        for (int64_t i = 0; i < shape[0][0]; i++) y[i] += load_f32(base + o[T_QKV_B], i);
    float *q = y, *k = y + heads * d, *val = k + kv * d;
    /* the graph's order: a norm over the whole projection, the clamp, a norm over each head; in place (a
     * norm reads before it writes) */
    if (v[S_QK_NORM] == 2) {
        rms_norm(q, base + o[T_Q_NORM], heads * d, s->eps, q);
        rms_norm(k, base + o[T_K_NORM], kv * d, s->eps, k);
    }
    if (s->clip > 0.0f)
        for (int64_t i = 0; i < (heads + 2 * kv) * d; i++) y[i] = y[i] < -s->clip ? -s->clip : (y[i] > s->clip ? s->clip : y[i]);
    if (v[S_QK_NORM] == 1) {
        for (int64_t i = 0; i < heads; i++) rms_norm(q + i * d, base + o[T_Q_NORM], d, s->eps, q + i * d);
        for (int64_t g = 0; g < kv; g++) rms_norm(k + g * d, base + o[T_K_NORM], d, s->eps, k + g * d);
    }
    for (int64_t i = 0; i < heads; i++) rotate(q + i * d, cos, sin, half);
    for (int64_t g = 0; g < kv; g++) {
        rotate(k + g * d, cos, sin, half);
        memcpy(key + (g * capacity + pos) * d, k + g * d, (size_t)d * sizeof(float));
        memcpy(value + (g * capacity + pos) * d, val + g * d, (size_t)d * sizeof(float));
    }
    st.q = q; st.context = context; st.key = key; st.value = value; st.capacity = capacity;
    st.first = first; st.last = pos; st.head_dim = d; st.group = heads / kv; st.scale = s->scale;
    st.scores = scores;
    /* the heads on the pool once the keys and values they read are worth a thread */
    int64_t worth = 2 * kv * count * d * 4 / BYTES_PER_THREAD - 1;
    int helpers = threads > 1 ? threads - 1 : 0;
    run_all(head_task, &st, heads, worth < helpers ? (worth > 0 ? (int)worth : 0) : helpers);
    proj_t out = step_projection(s, base, T_O_W, h, heads * d);
    if (st.math.int8) quantize_row(context, heads * d, bs, st.math.bits, aq, as, asum);
    step_project(&st, &out, aq, as, asum, context, attn, threads);
    if (o[T_O_B] != -1)
        for (int64_t i = 0; i < h; i++) attn[i] += load_f32(base + o[T_O_B], i);
    for (int64_t i = 0; i < h; i++) hidden[i] = x[i] + attn[i];

    /* the MoE block's front half: router input, routing, the shared expert */
    rms_norm(hidden, base + o[T_MLP_NORM], h, s->eps, router_input);
    matvec(router_input, base + o[T_ROUTER], h, experts, y);
    int sigmoid_routing = v[S_SCORING] == 1;
    if (sigmoid_routing)
        route_sigmoid(y, o[T_SCORE_BIAS] != -1 ? base + o[T_SCORE_BIAS] : NULL, experts, v[S_GROUPS], v[S_KEPT],
                      v[S_TOP_K], (int)v[S_NORMALIZE], s->topk_eps, s->routed_scaling, probs, y + experts, ids, weights);
    else
        route_top_k(y, experts, v[S_TOP_K], (int)v[S_NORMALIZE], s->routed_scaling, probs, ids, weights);
    if (o[T_NEXT_ROUTER] != -1) {
        const uint8_t *next_bias = o[T_NEXT_SCORE_BIAS] != -1 ? base + o[T_NEXT_SCORE_BIAS] : NULL;
        if (next_logits) {
            matvec(router_input, base + o[T_NEXT_ROUTER], h, v[S_NEXT_EXPERTS], next_logits);
            choice_scores(next_logits, v[S_NEXT_EXPERTS], sigmoid_routing, next_bias);
        }
        if (next_logits_norm) {
            if (o[T_NEXT_NORM] != -1) rms_norm(hidden, base + o[T_NEXT_NORM], h, s->eps, renormed);
            else memcpy(renormed, hidden, (size_t)h * sizeof(float));
            matvec(renormed, base + o[T_NEXT_ROUTER], h, v[S_NEXT_EXPERTS], next_logits_norm);
            choice_scores(next_logits_norm, v[S_NEXT_EXPERTS], sigmoid_routing, next_bias);
        }
    }
    free(scratch);
    return 0;
}

/* The step's back (call_lock held): the shared expert added to the stream step_route left in `residual`,
 * then, with `routed`, the chosen experts. */
static int step_finish(const fate_step *s, const uint8_t *base, float *residual, const float *router_input,
                       const int64_t *ids, const float *weights, const fate_layout *routed,
                       const uint8_t *const *expert_bases, int threads) {
    const int64_t *v = s->v, *o = v + S_OFFSETS;
    int64_t h = v[S_HIDDEN], inter = v[S_SHARED_INTER], bs = v[S_BLOCK];
    if (inter > 0) {
        /* float scratch: the gate|up output, the down output; then the int8 activations */
        int64_t inputs = inter > h ? inter : h;
        int64_t blocks = (inputs + bs - 1) / bs;
        size_t bytes = 4 * (size_t)(2 * inter + h + blocks) + 4 * (size_t)blocks + (size_t)(blocks * bs) + 64;
        uint8_t *scratch = malloc(bytes);
        if (!scratch) return -1;
        float *y = (float *)scratch, *attn = y + 2 * inter, *as = attn + h;
        int32_t *asum = (int32_t *)(as + blocks);
        int8_t *aq = (int8_t *)(asum + blocks);
        step_t st = one_token(s);
        proj_t gate_up = step_projection(s, base, T_GU_W, 2 * inter, h);
        if (st.math.int8) quantize_row(router_input, h, bs, st.math.bits, aq, as, asum);
        step_project(&st, &gate_up, aq, as, asum, router_input, y, threads);
        for (int64_t i = 0; i < inter; i++) y[i] = y[i] * sigmoid(y[i]) * y[inter + i];
        proj_t down = step_projection(s, base, T_DOWN_W, h, inter);
        if (st.math.int8) quantize_row(y, inter, bs, st.math.bits, aq, as, asum);
        step_project(&st, &down, aq, as, asum, y, attn, threads);
        float gate = s->shared_scale;
        if (o[T_SHARED_GATE] != -1) {
            float logit;
            matvec(router_input, base + o[T_SHARED_GATE], h, 1, &logit);
            gate = sigmoid(logit) * s->shared_scale;
        }
        for (int64_t i = 0; i < h; i++) residual[i] = residual[i] + attn[i] * gate;
        free(scratch);
    }
    return routed ? add_routed(routed, expert_bases, ids, weights, v[S_TOP_K], router_input, residual, threads) : 0;
}

int fate_run_step(const fate_step *s, const uint8_t *base, const float *x, float *key, float *value, int64_t capacity,
                  int64_t pos, const float *cos, const float *sin, float *residual, float *router_input, int64_t *ids,
                  float *weights, float *next_logits, float *next_logits_norm, const fate_layout *routed,
                  const uint8_t *const *expert_bases, int threads) {
    pthread_mutex_lock(&call_lock);
    int rc = step_route(s, base, x, key, value, capacity, pos, cos, sin, residual, router_input, ids, weights,
                        next_logits, next_logits_norm, threads);
    if (rc == 0) rc = step_finish(s, base, residual, router_input, ids, weights, routed, expert_bases, threads);
    pthread_mutex_unlock(&call_lock);
    return rc;
}

int fate_step_route(const fate_step *s, const uint8_t *base, const float *x, float *key, float *value,
                    int64_t capacity, int64_t pos, const float *cos, const float *sin, float *residual,
                    float *router_input, int64_t *ids, float *weights, float *next_logits, float *next_logits_norm,
                    int threads) {
    pthread_mutex_lock(&call_lock);
    int rc = step_route(s, base, x, key, value, capacity, pos, cos, sin, residual, router_input, ids, weights,
                        next_logits, next_logits_norm, threads);
    pthread_mutex_unlock(&call_lock);
    return rc;
}

int fate_step_finish(const fate_step *s, const uint8_t *base, float *residual, const float *router_input,
                     const int64_t *ids, const float *weights, const fate_layout *routed,
                     const uint8_t *const *expert_bases, int threads) {
    pthread_mutex_lock(&call_lock);
    int rc = step_finish(s, base, residual, router_input, ids, weights, routed, expert_bases, threads);
    pthread_mutex_unlock(&call_lock);
    return rc;
}

/* ------------------------------------------------------------------ prefill: the step over many tokens */

/* y [m, n] = x [m, k] @ W^T for m <= TILE tokens in one pass over the weights; each row quantized as
 * the step quantizes its one (the same int8 activations per token) */
static void tile_project(step_t *st, const proj_t *p, const float *x, int m_count, int8_t *aq, float *as,
                         int32_t *asum, float *y, int threads) {
    if (st->math.int8)
        for (int m = 0; m < m_count; m++)
            quantize_row(x + m * p->k, p->k, st->math.bs, st->math.bits, aq + m * p->blocks * st->math.bs,
                         as + m * p->blocks, asum + m * p->blocks);
    st->m_count = m_count;
    step_project(st, p, aq, as, asum, x, y, threads);
}

int fate_run_prefill(const fate_step *s, const uint8_t *base, const float *x, int64_t tokens, float *key, float *value,
                     int64_t capacity, int64_t pos0, const float *cos, const float *sin, float *residual,
                     float *router_input, int64_t *ids, float *weights, float *next_logits, float *next_logits_norm,
                     int threads) {
    const int64_t *v = s->v, *o = v + S_OFFSETS;
    int64_t h = v[S_HIDDEN], heads = v[S_HEADS], kv = v[S_KV_HEADS], d = v[S_HEAD_DIM], half = v[S_ROT_HALF];
    int64_t inter = v[S_SHARED_INTER], experts = v[S_EXPERTS], bs = v[S_BLOCK], top_k = v[S_TOP_K];
    int64_t next = v[S_NEXT_EXPERTS], qkv_n = (heads + 2 * kv) * d, positions = pos0 + tokens;
    int64_t inputs = heads * d > h ? heads * d : h;
    inputs = inter > inputs ? inter : inputs;
    int64_t blocks = (inputs + bs - 1) / bs, wide = qkv_n > 2 * inter ? qkv_n : 2 * inter;
    /* per tile: normed, projection out, context, attention out, hidden, shared activation; then one token's
     * probabilities, logits, renormed input and attention scores; then the int8 activations */
    size_t floats = (size_t)TILE * (size_t)(h + wide + heads * d + 3 * h + inter + blocks) +
                    (size_t)(3 * experts + h + heads * positions);
    size_t bytes = 4 * floats + 4 * (size_t)TILE * (size_t)blocks + (size_t)TILE * (size_t)(blocks * bs) + 64;
    uint8_t *scratch = malloc(bytes);
    if (!scratch) return -1;
    float *normed = (float *)scratch, *y = normed + TILE * h, *context = y + TILE * wide;
    float *attn = context + TILE * heads * d, *hidden = attn + TILE * h, *act = hidden + TILE * h;
    float *as = act + TILE * inter, *probs = as + TILE * blocks, *logits = probs + experts;
    float *renormed = logits + 2 * experts, *scores = renormed + h;
    int32_t *asum = (int32_t *)(scores + heads * positions);
    int8_t *aq = (int8_t *)(asum + TILE * blocks);
    int sigmoid_routing = v[S_SCORING] == 1;
    const uint8_t *next_bias = o[T_NEXT_SCORE_BIAS] != -1 ? base + o[T_NEXT_SCORE_BIAS] : NULL;
    proj_t qkv = step_projection(s, base, T_QKV_W, qkv_n, h), out = step_projection(s, base, T_O_W, h, heads * d);
    proj_t gate_up, down;
    if (inter > 0) {
        gate_up = step_projection(s, base, T_GU_W, 2 * inter, h);
        down = step_projection(s, base, T_DOWN_W, h, inter);
    }
    step_t st;
    memset(&st, 0, sizeof st);
    st.math = (math_t){(int)v[S_BITS], bs, (int)v[S_INT8]};
    pthread_mutex_lock(&call_lock);
    for (int64_t t0 = 0; t0 < tokens; t0 += TILE) {
        int m_count = tokens - t0 < TILE ? (int)(tokens - t0) : TILE;
        const float *xs = x + t0 * h;
        for (int m = 0; m < m_count; m++) rms_norm(xs + m * h, base + o[T_ATTN_NORM], h, s->eps, normed + m * h);
        tile_project(&st, &qkv, normed, m_count, aq, as, asum, y, threads);
        for (int m = 0; m < m_count; m++) { /* as the step does each token: bias, norms, clamp, rotation, caches */
            int64_t pos = pos0 + t0 + m;
            float *row = y + m * qkv_n, *q = row, *k = row + heads * d, *val = k + kv * d;
            if (o[T_QKV_B] != -1)
                for (int64_t i = 0; i < qkv_n; i++) row[i] += load_f32(base + o[T_QKV_B], i);
            if (v[S_QK_NORM] == 2) {
                rms_norm(q, base + o[T_Q_NORM], heads * d, s->eps, q);
                rms_norm(k, base + o[T_K_NORM], kv * d, s->eps, k);
            }
            if (s->clip > 0.0f)
                for (int64_t i = 0; i < qkv_n; i++) row[i] = row[i] < -s->clip ? -s->clip : (row[i] > s->clip ? s->clip : row[i]);
            if (v[S_QK_NORM] == 1) {
                for (int64_t i = 0; i < heads; i++) rms_norm(q + i * d, base + o[T_Q_NORM], d, s->eps, q + i * d);
                for (int64_t g = 0; g < kv; g++) rms_norm(k + g * d, base + o[T_K_NORM], d, s->eps, k + g * d);
            }
            for (int64_t i = 0; i < heads; i++) rotate(q + i * d, cos + pos * half, sin + pos * half, half);
            for (int64_t g = 0; g < kv; g++) {
                rotate(k + g * d, cos + pos * half, sin + pos * half, half);
                memcpy(key + (g * capacity + pos) * d, k + g * d, (size_t)d * sizeof(float));
                memcpy(value + (g * capacity + pos) * d, val + g * d, (size_t)d * sizeof(float));
            }
        }
        for (int m = 0; m < m_count; m++) { /* each token sees the cache up to itself (and its window) */
            int64_t pos = pos0 + t0 + m;
            int64_t first = v[S_WINDOW] > 0 && pos + 1 > v[S_WINDOW] ? pos + 1 - v[S_WINDOW] : 0;
            st.q = y + m * qkv_n; st.context = context + m * heads * d; st.key = key; st.value = value;
            st.capacity = capacity; st.first = first; st.last = pos; st.head_dim = d; st.group = heads / kv;
            st.scale = s->scale; st.scores = scores;
            int64_t worth = 2 * kv * (pos - first + 1) * d * 4 / BYTES_PER_THREAD - 1;
            int helpers = threads > 1 ? threads - 1 : 0;
            run_all(head_task, &st, heads, worth < helpers ? (worth > 0 ? (int)worth : 0) : helpers);
        }
        tile_project(&st, &out, context, m_count, aq, as, asum, attn, threads);
        for (int m = 0; m < m_count; m++) {
            float *a = attn + m * h, *hd = hidden + m * h, *ri = router_input + (t0 + m) * h;
            if (o[T_O_B] != -1)
                for (int64_t i = 0; i < h; i++) a[i] += load_f32(base + o[T_O_B], i);
            for (int64_t i = 0; i < h; i++) hd[i] = xs[m * h + i] + a[i];
            rms_norm(hd, base + o[T_MLP_NORM], h, s->eps, ri);
            matvec(ri, base + o[T_ROUTER], h, experts, logits);
            int64_t *row_ids = ids + (t0 + m) * top_k;
            float *row_weights = weights + (t0 + m) * top_k;
            if (sigmoid_routing)
                route_sigmoid(logits, o[T_SCORE_BIAS] != -1 ? base + o[T_SCORE_BIAS] : NULL, experts, v[S_GROUPS],
                              v[S_KEPT], top_k, (int)v[S_NORMALIZE], s->topk_eps, s->routed_scaling, probs,
                              logits + experts, row_ids, row_weights);
            else
                route_top_k(logits, experts, top_k, (int)v[S_NORMALIZE], s->routed_scaling, probs, row_ids, row_weights);
            if (o[T_NEXT_ROUTER] != -1) {
                if (next_logits) {
                    float *nl = next_logits + (t0 + m) * next;
                    matvec(ri, base + o[T_NEXT_ROUTER], h, next, nl);
                    choice_scores(nl, next, sigmoid_routing, next_bias);
                }
                if (next_logits_norm) {
                    float *nl = next_logits_norm + (t0 + m) * next;
                    if (o[T_NEXT_NORM] != -1) rms_norm(hd, base + o[T_NEXT_NORM], h, s->eps, renormed);
                    else memcpy(renormed, hd, (size_t)h * sizeof(float));
                    matvec(renormed, base + o[T_NEXT_ROUTER], h, next, nl);
                    choice_scores(nl, next, sigmoid_routing, next_bias);
                }
            }
        }
        if (inter > 0) {
            tile_project(&st, &gate_up, router_input + t0 * h, m_count, aq, as, asum, y, threads);
            for (int m = 0; m < m_count; m++)
                for (int64_t i = 0; i < inter; i++) {
                    float g = y[m * 2 * inter + i], u = y[m * 2 * inter + inter + i];
                    act[m * inter + i] = g * sigmoid(g) * u;
                }
            tile_project(&st, &down, act, m_count, aq, as, asum, attn, threads);
            for (int m = 0; m < m_count; m++) {
                float gate = s->shared_scale;
                if (o[T_SHARED_GATE] != -1) {
                    float logit;
                    matvec(router_input + (t0 + m) * h, base + o[T_SHARED_GATE], h, 1, &logit);
                    gate = sigmoid(logit) * s->shared_scale;
                }
                for (int64_t i = 0; i < h; i++) residual[(t0 + m) * h + i] = hidden[m * h + i] + attn[m * h + i] * gate;
            }
        } else {
            memcpy(residual + t0 * h, hidden, (size_t)m_count * (size_t)h * sizeof(float));
        }
    }
    pthread_mutex_unlock(&call_lock);
    free(scratch);
    return 0;
}

int64_t fate_head_bytes(const int64_t *v) {
    int64_t h = v[H_HIDDEN], n = v[H_VOCAB], bits = v[H_BITS], bs = v[H_BLOCK];
    if (h <= 0 || h > (1 << 20) || n <= 0 || n > (1 << 24) || (v[H_INT8] != 0 && v[H_INT8] != 1)) return -1;
    if ((bits != 2 && bits != 4 && bits != 8) || bs < 16 || bs > (1 << 16) || (bs & (bs - 1))) return -1;
    int64_t blocks = (h + bs - 1) / bs, need = 0;
    need = grow(need, v[H_NORM], h * 4);
    need = grow(need, v[H_QWEIGHT], n * blocks * (bs * bits / 8));
    need = grow(need, v[H_SCALES], n * blocks * 4);
    need = grow(need, v[H_ZEROS], n * ((blocks * bits + 7) / 8));
    if (v[H_BIAS] != -1) need = grow(need, v[H_BIAS], n * 4);
    return need;
}

int fate_run_head(const int64_t *v, float eps, float scaling, const uint8_t *base, const float *x, float *logits,
                  int threads) {
    int64_t h = v[H_HIDDEN], n = v[H_VOCAB], bs = v[H_BLOCK], bits = v[H_BITS];
    int64_t blocks = (h + bs - 1) / bs;
    uint8_t *scratch = malloc((size_t)(4 * h + 8 * blocks + blocks * bs + 64));
    if (!scratch) return -1;
    float *normed = (float *)scratch, *as = normed + h;
    int32_t *asum = (int32_t *)(as + blocks);
    int8_t *aq = (int8_t *)(asum + blocks);
    step_t st;
    memset(&st, 0, sizeof st);
    st.math.bits = (int)bits;
    st.math.bs = bs;
    st.math.int8 = (int)v[H_INT8];
    st.m_count = 1;
    proj_t p;
    p.n = n;
    p.k = h;
    p.blocks = blocks;
    p.block_bytes = bs * bits / 8;
    p.zero_row = (blocks * bits + 7) / 8;
    p.qweight = base + v[H_QWEIGHT];
    p.scales = base + v[H_SCALES];
    p.zeros = base + v[H_ZEROS];
    p.bias = NULL;
    pthread_mutex_lock(&call_lock);
    rms_norm(x, base + v[H_NORM], h, eps, normed);
    if (st.math.int8) quantize_row(normed, h, bs, st.math.bits, aq, as, asum);
    step_project(&st, &p, aq, as, asum, normed, logits, threads);
    pthread_mutex_unlock(&call_lock);
    for (int64_t i = 0; i < n; i++) {
        float value = v[H_BIAS] != -1 ? logits[i] + load_f32(base + v[H_BIAS], i) : logits[i];
        logits[i] = scaling != 1.0f ? value / scaling : value;
    }
    free(scratch);
    return 0;
}

/* The kernels this CPU runs (a bit per kernel). */
static int supported_kernels(void) {
    int mask = 1 << K_PORTABLE;
#ifdef FATE_X86
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2) mask |= 1 << K_AVX2;
    if (avx2 && __builtin_cpu_supports("avxvnni")) mask |= 1 << K_VNNI;
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni"))
        mask |= 1 << K_VNNI512;
#endif
#ifdef FATE_NEON
    mask |= 1 << K_NEON; /* Advanced SIMD is part of every aarch64 CPU */
#endif
    return mask;
}

static int best_kernel(void) {
    int mask = supported_kernels();
    for (int k = K_COUNT - 1; k > K_PORTABLE; k--)
        if (mask & (1 << k)) return k;
    return K_PORTABLE;
}

void fate_kernel_init(void) {
#ifdef FATE_X86
    __builtin_cpu_init();
#endif
    kernel = best_kernel();
}

const char *fate_kernel_name(void) { return kernel_names[kernel]; }

int fate_set_kernel(const char *name) {
    if (!strcmp(name, "best")) { kernel = best_kernel(); return 0; }
    for (int k = 0; k < K_COUNT; k++)
        if (!strcmp(name, kernel_names[k]) && (supported_kernels() & (1 << k))) { kernel = k; return 0; }
    return -1;
}

int fate_kernels(const char **names, int max) {
    int mask = supported_kernels(), count = 0;
    for (int k = K_COUNT - 1; k >= K_PORTABLE && count < max; k--)
        if (mask & (1 << k)) names[count++] = kernel_names[k];
    return count;
}
