"""Where each part of an artifact lives. The only module that knows file names."""

from __future__ import annotations

MANIFEST = "manifest.json"
PROFILE = "profile.json"
TOKENIZER_DIR = "tokenizer"
EMBED_GRAPH = "graphs/embed.onnx"
HEAD_GRAPH = "graphs/head.onnx"


def layer_graph(layer: int) -> str:
    return f"graphs/layer_{layer:03d}.onnx"


def combine_graph(layer: int) -> str:
    return f"graphs/combine_{layer:03d}.onnx"


def expert_graph(layer: int, expert: int, precision: str) -> str:
    return f"experts/{precision}/layer_{layer:03d}/expert_{expert:03d}.onnx"


def tokenizer_file(name: str) -> str:
    return f"{TOKENIZER_DIR}/{name}"


class GraphIO:
    """Input and output names of the graphs: the contract between compiler and runtime.

    embed:  input_ids [S] int64                         -> hidden [1, S, H]
    layer:  hidden, and for an attention layer its position inputs (the manifest's `positions`:
            "per_token" cos [S, R], sin [S, R], attn_bias [S, T]; "tables" cos_cache [T, R/2],
            sin_cache [T, R/2], seqlens_k [1] int32 (T - 1), total_sequence_length [] int32 (T),
            attn_bias [S, T]), past_key/past_value [1, KV, P, D] -> present_key/present_value
            [1, KV, T, D]; for any other
            mixer past_<name> -> present_<name> of each fixed-size state the manifest lists;
            -> residual [1, S, H], router_input [S, H]
            (the MLP input: post-attention norm); MoE layers also -> router_logits [S, E], expert_ids [S, k] int64,
            expert_input [S, W] where the experts run in a latent space of width W (LayerSpec.expert_input_size),
            expert_weights [S, k]; when the manifest says predicts_next, next_router_logits and
            next_router_logits_norm [S, E_next] (two cross-layer predictors of the next layer)
    combine (a MoE layer whose MoE output is normalized before the residual add, OLMo-2 style; its
            layer graph says so in its metadata, ROUTED_SUM_META):
            residual [1, S, H], routed [S, W] (the weighted sum of the routed experts, plus the layer
            graph's moe_partial [S, H] where it has one: its shared experts) -> hidden [1, S, H]; also a
            layer whose experts run in a latent space (routed [S, W] projected back to H)
    expert: x [N, W] -> y [N, W]   (W: the hidden size, or the layer's expert_input_size; every expert of
            every precision: any session can stand in)
    head:   hidden [1, S, H] -> logits [1, S, V]
    """

    INPUT_IDS = "input_ids"
    HIDDEN = "hidden"
    COS = "cos"
    SIN = "sin"
    ATTN_BIAS = "attn_bias"
    COS_CACHE = "cos_cache"  # cos/sin of every position up to the step's last, half the rotary dims
    SIN_CACHE = "sin_cache"
    SEQLENS = "seqlens_k"
    TOTAL_LENGTH = "total_sequence_length"
    PAST_KEY = "past_key"
    PAST_VALUE = "past_value"
    PRESENT_KEY = "present_key"
    PRESENT_VALUE = "present_value"
    RESIDUAL = "residual"
    ROUTER_INPUT = "router_input"
    EXPERT_INPUT = "expert_input"  # the routed experts' input where it is not router_input (latent experts) [S, E]
    EXPERT_IDS = "expert_ids"
    EXPERT_WEIGHTS = "expert_weights"
    ROUTER_LOGITS = "router_logits"
    NEXT_ROUTER_LOGITS = "next_router_logits"
    NEXT_ROUTER_LOGITS_NORM = "next_router_logits_norm"
    EXPERT_IN = "x"
    EXPERT_OUT = "y"
    LOGITS = "logits"
    ROUTED = "routed"
    MOE_PARTIAL = "moe_partial"  # a post-norm MoE layer's shared experts' output [S, H], added to `routed`
    # A layer graph's metadata (ModelProto.metadata_props) under this key says how its routed sum joins
    # the residual: "combine_graph" where it must go through the layer's combine graph (post-norm
    # families); absent: a plain add. A manifest that drops such a layer's combine graph is refused.
    ROUTED_SUM_META = "fate.routed_sum"

    @staticmethod
    def past(state: str) -> str:
        """The input carrying a layer's state `state` ("key", "value", "conv", ...) into a step."""
        return f"past_{state}"

    @staticmethod
    def present(state: str) -> str:
        """The output carrying it out, for the next step."""
        return f"present_{state}"


def size_text(sizes: dict[str, int]) -> str:
    """An artifact's size on disk, the experts per precision apart from the rest."""
    experts: dict[str, int] = {}
    for path, size in sizes.items():
        parts = path.split("/")
        if parts[0] == "experts" and len(parts) > 2:
            experts[parts[1]] = experts.get(parts[1], 0) + size
    rest = sum(sizes.values()) - sum(experts.values())
    each = ", ".join(f"{p} {megabytes(b)}" for p, b in sorted(experts.items()))
    return (f"{megabytes(sum(sizes.values()))} on disk (experts: {each or 'none'}; graphs, tokenizer and profile "
            f"{megabytes(rest)})")


def megabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
