/* Every kernel this CPU runs against the portable C one, on random experts in the slot layout,
 * without Python: the way to run the NEON kernel where there is no aarch64 Python (cross-compiled
 * and run under qemu-user; see tests/test_native_kernel.py and `make kernel-check`).
 *
 * Cases: 2, 4 and 8 bits; blocks of 16 to 128; int8 and float32 activations; K a multiple of the
 * block or not; one token (decode) and eleven (two tiles); SwiGLU, the clamped SwiGLU with
 * biases and the non-gated squared ReLU (no gate tensors); one thread and two. The kernels compute the same integers, summed as floats in another
 * order: they must agree to float rounding. Exit status 1 on any disagreement or a non-finite output. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../runtime/native/kernel.h"

static uint64_t state = 0x9E3779B97F4A7C15ull;

static uint32_t next_random(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (uint32_t)(state >> 32);
}

static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next_random() >> 8) / 16777216.0f; }

/* An expert's file bytes: each projection's qweight, scales, zero points and bias, one after another. */
static uint8_t *make_expert(fate_layout *l) {
    int64_t total = 0, sizes[12];
    for (int which = 0; which < 3; which++) {
        int64_t n = which == 2 ? l->hidden : l->inter, k = which == 2 ? l->inter : l->hidden;
        int64_t blocks = (k + l->block - 1) / l->block;
        int64_t *s = sizes + 4 * which;
        s[T_QWEIGHT] = n * blocks * l->block * l->bits / 8;
        s[T_SCALES] = n * blocks * 4;
        s[T_ZEROS] = n * ((blocks * l->bits + 7) / 8);
        s[T_BIAS] = l->has_bias ? n * 4 : 0;
        if (which == 0 && l->activation == ACT_RELU2) s[T_QWEIGHT] = s[T_SCALES] = s[T_ZEROS] = s[T_BIAS] = 0;
        for (int part = 0; part < 4; part++) {
            l->offsets[4 * which + part] = s[part] ? total : -1;
            total += s[part] + 3; /* odd gaps: tensors need not be aligned */
        }
    }
    uint8_t *bytes = malloc((size_t)total);
    for (int64_t i = 0; i < total; i++) bytes[i] = (uint8_t)next_random();
    for (int t = 0; t < 12; t++) {
        if (t % 4 != T_SCALES && t % 4 != T_BIAS) continue;
        if (l->offsets[t] < 0) continue;
        for (int64_t i = 0; i < sizes[t] / 4; i++) {
            float v = t % 4 == T_SCALES ? uniform(0.001f, 0.02f) : uniform(-0.5f, 0.5f);
            memcpy(bytes + l->offsets[t] + 4 * i, &v, 4);
        }
    }
    return bytes;
}

#define EXPERTS 3

static int run(const char *kernel, const fate_layout *l, const uint8_t *const *experts, const float *x,
               int64_t tokens, const int32_t *starts, const int32_t *rows, const int32_t *dest, float *y, int threads) {
    if (fate_set_kernel(kernel) != 0) return -1;
    return fate_run_experts(l, experts, EXPERTS, x, tokens, starts, rows, dest, y, threads);
}

int main(void) {
    fate_kernel_init();
    const char *kernels[8];
    int n_kernels = fate_kernels(kernels, 8);
    static const int bits_list[] = {2, 4, 8};
    static const int64_t blocks[] = {16, 32, 64, 128};
    static const int64_t shapes[][2] = {{256, 128}, {200, 72}};
    static const int64_t token_counts[] = {1, 11};
    int cases = 0, failures = 0;
    double worst = 0.0;
    for (size_t b = 0; b < 3; b++)
        for (size_t bl = 0; bl < 4; bl++)
            for (int int8 = 0; int8 < 2; int8++)
                for (size_t sh = 0; sh < 2; sh++)
                    for (size_t tk = 0; tk < 2; tk++)
                        for (int act = 0; act <= ACT_RELU2; act++) {
                            fate_layout l;
                            memset(&l, 0, sizeof l);
                            l.hidden = shapes[sh][0]; l.inter = shapes[sh][1];
                            l.bits = bits_list[b]; l.block = blocks[bl]; l.int8 = int8;
                            l.activation = act; l.has_bias = act == ACT_SWIGLU_CLAMPED;
                            l.limit = 7.0f; l.alpha = 1.702f;
                            if (fate_layout_check(&l) != 0) { printf("bad layout\n"); return 1; }
                            uint8_t *experts[EXPERTS];
                            for (int e = 0; e < EXPERTS; e++) {
                                fate_layout each = l;
                                experts[e] = make_expert(&each);
                                memcpy(l.offsets, each.offsets, sizeof l.offsets);
                            }
                            int64_t tokens = token_counts[tk], h = l.hidden;
                            float *x = malloc(sizeof(float) * (size_t)(tokens * h));
                            for (int64_t i = 0; i < tokens * h; i++) x[i] = uniform(-1.0f, 1.0f);
                            /* every token to every expert: assignment a = e * tokens + t */
                            int64_t count = EXPERTS * tokens;
                            int32_t starts[EXPERTS + 1], *rows = malloc(4 * (size_t)count), *dest = malloc(4 * (size_t)count);
                            for (int e = 0; e <= EXPERTS; e++) starts[e] = (int32_t)(e * tokens);
                            for (int64_t a = 0; a < count; a++) { rows[a] = (int32_t)(a % tokens); dest[a] = (int32_t)a; }
                            float *ref = malloc(sizeof(float) * (size_t)(count * h));
                            float *got = malloc(sizeof(float) * (size_t)(count * h));
                            const uint8_t *const *bases = (const uint8_t *const *)experts;
                            if (run("portable", &l, bases, x, tokens, starts, rows, dest, ref, 1) != 0) return 1;
                            double scale = 1e-30;
                            for (int64_t i = 0; i < count * h; i++) scale = fmax(scale, fabs(ref[i]));
                            for (int k = 0; k < n_kernels; k++)
                                for (int threads = 1; threads <= 2; threads++) {
                                    cases++;
                                    memset(got, 0, sizeof(float) * (size_t)(count * h));
                                    if (run(kernels[k], &l, bases, x, tokens, starts, rows, dest, got, threads) != 0) {
                                        failures++;
                                        continue;
                                    }
                                    double diff = 0.0;
                                    int finite = 1;
                                    for (int64_t i = 0; i < count * h; i++) {
                                        finite &= isfinite(got[i]) && isfinite(ref[i]);
                                        diff = fmax(diff, fabs(got[i] - ref[i]));
                                    }
                                    diff /= scale;
                                    worst = fmax(worst, diff);
                                    if (!finite || diff > 1e-4) {
                                        failures++;
                                        printf("DISAGREE %s: bits %d block %lld int8 %d hidden %lld inter %lld tokens %lld "
                                               "activation %d threads %d: relative difference %.3g\n",
                                               kernels[k], l.bits, (long long)l.block, int8, (long long)l.hidden,
                                               (long long)l.inter, (long long)tokens, act, threads, diff);
                                    }
                                }
                            for (int e = 0; e < EXPERTS; e++) free(experts[e]);
                            free(x); free(rows); free(dest); free(ref); free(got);
                        }
    printf("kernels:");
    for (int k = 0; k < n_kernels; k++) printf(" %s", kernels[k]);
    printf("; %d cases against portable C, %d disagree; largest relative difference %.3g\n", cases, failures, worst);
    return failures ? 1 : 0;
}
