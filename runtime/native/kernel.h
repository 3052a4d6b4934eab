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
enum { ACT_SWIGLU = 0, ACT_SWIGLU_CLAMPED = 1, ACT_RELU2 = 2 }; /* relu2: relu(up(x))^2, no gate projection */

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

/* One decoder layer's decode step (one token), from the bytes of its graph file: RMSNorm, the q|k|v
 * projection (+ bias, + RMSNorm over each head of q and k), RoPE on the first rot_half * 2 dims of each q and k head (two halves), the new
 * key and value written at `pos` of the caches [KV, capacity, D], grouped-query attention over
 * positions (pos - window, pos], the output projection, the residual; RMSNorm, the router (float32
 * [H, E]), softmax top-k; the shared expert (SwiGLU, optional sigmoid gate, scale); the next layer's
 * router on this layer's router input and on its own norm of the stream (cross-layer prediction).
 * Step vector (int64), as fate.runtime.native builds it from a validated DecodeStep: */
enum {
    S_HIDDEN, S_HEADS, S_KV_HEADS, S_HEAD_DIM, S_ROT_HALF, S_EXPERTS, S_TOP_K, S_NEXT_EXPERTS, S_SHARED_INTER,
    S_BITS, S_BLOCK, S_INT8, S_NORMALIZE, S_WINDOW, S_QK_NORM, /* 0 none, 1 each head, 2 the whole projection */
    S_SCORING, S_GROUPS, S_KEPT, /* 0 softmax, 1 sigmoid (with groups: the best kept of them; 0: none) */
    S_OFFSETS, /* then one offset per tensor (STEP_TENSORS order; -1: absent) */
};
enum {
    T_ATTN_NORM, T_QKV_W, T_QKV_S, T_QKV_Z, T_QKV_B, T_O_W, T_O_S, T_O_Z, T_MLP_NORM, T_ROUTER,
    T_GU_W, T_GU_S, T_GU_Z, T_DOWN_W, T_DOWN_S, T_DOWN_Z, T_SHARED_GATE, T_NEXT_ROUTER, T_NEXT_NORM,
    T_Q_NORM, T_K_NORM, T_SCORE_BIAS, T_NEXT_SCORE_BIAS, T_O_B, STEP_TENSORS
};
#define S_SIZE (S_OFFSETS + STEP_TENSORS)

typedef struct {
    int64_t v[S_SIZE];
    float eps, scale, shared_scale, routed_scaling, clip; /* clip: q, k, v clamped to [-clip, clip]; 0: not */
    float topk_eps;                                     /* sigmoid routing: added to the top-k sum */
} fate_step;

/* Bytes the graph buffer must hold for every tensor of `s`; -1 when its numbers or offsets are not
 * ones the step computes (a required tensor missing, a size out of range, an offset out of range). */
int64_t fate_step_bytes(const fate_step *s);

/* The step itself; every buffer checked by the caller (sizes from fate_step_bytes and the numbers).
 * next_logits and next_logits_norm may be NULL (no prediction). With `routed` (the layer's expert
 * layout, hidden size the step's) and `experts` (each routed expert's bytes by id, NULL where they are
 * not at hand), the chosen experts run too and their weighted outputs join the residual in the router's
 * order. Returns 0; 1 when a chosen expert was NULL (the residual then holds no routed output); -1 when
 * memory ran out. */
int fate_run_step(const fate_step *s, const uint8_t *base, const float *x, float *key, float *value, int64_t capacity,
                  int64_t pos, const float *cos, const float *sin, float *residual, float *router_input, int64_t *ids,
                  float *weights, float *next_logits, float *next_logits_norm, const fate_layout *routed,
                  const uint8_t *const *experts, int threads);

/* fate_run_step in two calls, so that a caller may begin the reads of experts not at hand between them (the
 * same bits as the one call): fate_step_route computes the step up to the routing and the next layer's
 * prediction, leaving the stream after attention in `residual`; fate_step_finish adds the shared expert to
 * it and, with `routed`, the chosen experts (its return as fate_run_step's). Same buffers as fate_run_step. */
int fate_step_route(const fate_step *s, const uint8_t *base, const float *x, float *key, float *value,
                    int64_t capacity, int64_t pos, const float *cos, const float *sin, float *residual,
                    float *router_input, int64_t *ids, float *weights, float *next_logits, float *next_logits_norm,
                    int threads);
int fate_step_finish(const fate_step *s, const uint8_t *base, float *residual, const float *router_input,
                     const int64_t *ids, const float *weights, const fate_layout *routed,
                     const uint8_t *const *experts, int threads);

/* The routed experts of one token added to `residual` [hidden] in the router's order, as fate_run_step adds
 * them (the same bits): experts[ids[j]] for j < top_k on the router input x, each weighted output rounded,
 * then added. Every buffer checked by the caller. Returns 0; 1 when a chosen expert is NULL (the residual
 * untouched); -1 when memory ran out. Thread-safe (calls are serialized). */
int fate_add_routed(const fate_layout *routed, const uint8_t *const *experts, const int64_t *ids, const float *weights,
                    int64_t top_k, const float *x, float *residual, int threads);

/* The step over `tokens` consecutive tokens at positions pos0.. (a prefill): x, residual and router_input
 * [tokens, hidden], ids and weights [tokens, top_k], next_logits(_norm) [tokens, next experts] or NULL; cos
 * and sin the position tables [>= pos0 + tokens, rotary half]. The same numbers the step computes for each
 * token alone (the same int8 activations per token), its projections a tile of tokens per pass over the
 * weights. Routed experts are the caller's. Returns 0, or -1 when memory ran out. */
int fate_run_prefill(const fate_step *s, const uint8_t *base, const float *x, int64_t tokens, float *key, float *value,
                     int64_t capacity, int64_t pos0, const float *cos, const float *sin, float *residual,
                     float *router_input, int64_t *ids, float *weights, float *next_logits, float *next_logits_norm,
                     int threads);

/* The LM head's decode step: logits = RMSNorm(x) @ lm_head^T (+ bias) / scaling, from the bytes of the
 * head graph. Head vector (int64), as fate.runtime.decode_step builds it from a validated HeadStep: */
enum { H_HIDDEN, H_VOCAB, H_BITS, H_BLOCK, H_INT8, H_NORM, H_QWEIGHT, H_SCALES, H_ZEROS, H_BIAS, H_SIZE };

/* Bytes the head graph buffer must hold (-1: numbers or offsets the step does not take). */
int64_t fate_head_bytes(const int64_t *v);

/* logits [vocab] for one token x [hidden]; every buffer checked by the caller. 0, or -1 out of memory. */
int fate_run_head(const int64_t *v, float eps, float scaling, const uint8_t *base, const float *x, float *logits,
                  int threads);

/* Kernel choice: the best this CPU runs is chosen at start; tests compare them. */
void fate_kernel_init(void);
const char *fate_kernel_name(void);
int fate_set_kernel(const char *name);          /* "best" or a name of fate_kernels(); 0 or -1 */
int fate_kernels(const char **names, int max);  /* the kernels this CPU runs, best first */

#endif
