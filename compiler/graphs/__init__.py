"""The ONNX graphs of an artifact, built from one layer's weights at a time.

Input and output names are the contract in `fate.artifacts.layout.GraphIO`. All activations are
float32; dense weights float32 or MatMulNBits; routed experts at the requested precision. Numeric
conventions follow transformers' Llama-style modules (RMSNorm in float32, RoPE with rotate_half over
the first rotary dims, softmax router scores in float32).

One file per concern, each readable in one sitting:
    blocks.py     norms, linear layers, SwiGLU, RoPE
    attention.py  positions, fused and explicit attention (the fused form's constraints checked here), MLA
    mixers.py     short convolutions, gated DeltaNet, Mamba2, Mamba: fixed-size state, ONNX Scan
    routing.py    the routers inside layer graphs, and the next layer's (cross-layer prediction)
    layer.py      one decoder layer's graph and the combine graph of post-norm layers
    model.py      an expert, the embedding, the head
    steps.py      the native decode and head steps: which layers the C step computes, and where its tensors lie
"""

from .attention import fused_attention_refusal
from .layer import LayerGraphInfo, combine_graph, layer_graph, state_shapes
from .model import embed_graph, expert_graph, head_graph
from .routing import NextRouter
from .steps import decode_step, decode_step_views, head_step, head_step_views

__all__ = ["LayerGraphInfo", "NextRouter", "combine_graph", "decode_step", "decode_step_views", "embed_graph",
           "expert_graph", "fused_attention_refusal", "head_graph", "head_step", "head_step_views", "layer_graph",
           "state_shapes"]
