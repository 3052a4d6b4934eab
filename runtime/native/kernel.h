/* The expert kernel without Python: what runtime/native/experts.c (the module) calls, and what
 * tests/native/kernel_check.c runs on its own (natively, and for aarch64 under qemu-user). */
#ifndef FATE_KERNEL_H
#define FATE_KERNEL_H

#include <stdint.h>

/* Layout vector (int64), as fate.runtime.native builds it from an ExpertLayout. */
enum {
    L_HIDDEN, L_INTER, L_BITS, L_BLOCK, L_ACCURACY, L_ACTIVATION, L_HAS_BIAS,
    L_TENSORS, /* 3 projections x (qweight, scales, zero_points, bias) offsets */
    L_SIZE = L_TENSORS + 12
};
enum { T_QWEIGHT, T_SCALES, T_ZEROS, T_BIAS };
enum { ACT_SWIGLU = 0, ACT_SWIGLU_CLAMPED = 1 };

/* One call: every routed expert of a layer. */
typedef struct {
    int64_t hidden, inter;
    int bits;
    int64_t block;
    int int8;        /* accuracy level 4: int8 activations */
    int activation;  /* ACT_* */
    int has_bias;
    float limit, alpha;  /* the clamped SwiGLU's */
    int64_t offsets[12];
} fate_layout;

/* 0 when the layout's numbers are ones the kernel computes; -1 otherwise. */
int fate_layout_check(const fate_layout *l);

/* Bytes an expert buffer must hold for every tensor of `l`; -1 for an offset out of range. */
int64_t fate_layout_bytes(const fate_layout *l);

/* y[dest[a]] = expert_e(x[rows[a]]) for a in starts[e]..starts[e+1], expert e's bytes at
 * experts[e]. Every input must have been checked (sizes, offsets, indices): this reads what it is
 * given. Returns 0, or -1 when memory ran out. Thread-safe (calls are serialized). */
int fate_run_experts(const fate_layout *l, const uint8_t *const *experts, int64_t n_experts, const float *x,
                     int64_t tokens, const int32_t *starts, const int32_t *rows, const int32_t *dest, float *y,
                     int threads);

/* Kernel choice: the best this CPU runs is chosen at start; tests compare them. */
void fate_kernel_init(void);
const char *fate_kernel_name(void);
int fate_set_kernel(const char *name);          /* "best" or a name of fate_kernels(); 0 or -1 */
int fate_kernels(const char **names, int max);  /* the kernels this CPU runs, best first */

#endif
