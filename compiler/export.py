"""fate-compile's core: checkpoint -> artifact (+ profile and policy), one layer at a time.

Peak memory is one layer's weights, one expert, the calibration activations and the graph being
serialized: the checkpoint is read lazily and each graph is written as soon as it is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from fate.artifacts import (
    ArtifactWriter,
    ExpertLayout,
    GenerationDefaults,
    LayerSpec,
    Manifest,
    ModelError,
    ModelSpec,
    RoutingSpec,
    StateSpec,
    layout,
)
from fate.artifacts.budget import Budget
from fate.artifacts.outputs import check_output
from fate.artifacts.precisions import PRECISIONS
from fate.artifacts.profile import profile_to_bytes
from fate.artifacts.slots import MAX_BLOCK_SIZE, layout_of
from fate.runtime.memory import release_freed_memory
from tokenizers import Tokenizer

from . import graphs
from .graphs.mixers import MIXER_KINDS
from .checkpoint import Checkpoint, decode_mxfp4
from .families import ArchConfig, Family, Role, family_for
from .families.base import EXPERT_ROLES, LAYER, check_sizes
from .families.layouts import FusedExperts
from .onnx_builder import WeightFormat
from .policy import PlanTargets, plan_for_budget
from .profile import BUILTIN, QUANT_BITS, CalibrationOptions, Profiler, calibration_ids
from .quantize import DEFAULT_BLOCK_SIZE, quantize
from .tokenizer import read_tokenizer

PRECISION_OF_BITS = {p.bits: p.name for p in PRECISIONS}
DENSE_BITS = (32, 8, 4)

ATTENTION_ROLES = (Role.ATTN_NORM, Role.Q, Role.K, Role.V, Role.O, Role.MLP_NORM)
DENSE_MLP_ROLES = (Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN)
OPTIONAL_LAYER_ROLES = (Role.ROUTER_SCORE_BIAS, Role.ROUTER_BIAS, Role.SINKS, Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS,
                        Role.O_BIAS, Role.ATTN_NORM_BIAS, Role.MLP_NORM_BIAS, Role.SHARED_GATE, Role.SHARED_UP,
                        Role.SHARED_DOWN, Role.SHARED_EXPERT_GATE, Role.CONV_IN_BIAS, Role.CONV_BIAS, Role.CONV_OUT_BIAS,
                        Role.MAMBA_IN_BIAS, Role.MAMBA_CONV_BIAS, Role.MAMBA_OUT_BIAS, Role.MAMBA_DT_NORM,
                        Role.MAMBA_B_NORM, Role.MAMBA_C_NORM)


@dataclass(frozen=True)
class CompileOptions:
    """The flags of fate-compile."""

    model_dir: Path
    out_dir: Path
    bits: tuple[int, ...] = (4,)
    block_size: int | None = None  # None: DEFAULT_BLOCK_SIZE per bit width
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fast), 0 = float32 (exact)
    # attention, dense and shared MLPs, LM head: 32 (float32), 8 or 4, the embedding INT8 if < 32;
    # None: INT8 when the experts are 4 bits or fewer (an artifact built to be small), else float32
    # (--bits 32/16 is a reference artifact; --bits 8 asks for accuracy)
    dense_bits: int | None = None
    force: bool = False
    calibration: CalibrationOptions | None = None  # None: no profile, no policy
    budget: Budget = Budget(share=0.5)  # the device budget the policy is planned for
    targets: PlanTargets = PlanTargets()
    # a lossy speed mode, stored only when asked: INT2 copies of the experts that the policy may move
    # during prefill where it measured their error within targets.max_low_bit_error (fate-run --int2-prefill)
    int2_copies: bool = False

    @property
    def inputs(self) -> list[Path]:
        """What the compile reads: never written over (fate.artifacts.outputs)."""
        found = [Path(self.model_dir)]
        if self.calibration is not None and self.calibration.source != BUILTIN:
            found.append(Path(self.calibration.source))
        return found

    @property
    def resolved_dense_bits(self) -> int:
        if self.dense_bits is not None:
            return self.dense_bits
        return 8 if min(self.bits, default=4) <= 4 else 32


def expected_shape(role: Role, c: ArchConfig, layouts: tuple = ()) -> tuple[int, ...]:
    """The shape config.json implies for a role's tensor ([out, in] for projections), as the family's
    `layouts` store it where one does."""
    for stored_as in layouts:
        stored = stored_as.shapes(c)
        if role in stored:
            return stored[role]
    h, q, kv, kv_v = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.value_dim
    e = c.expert_width
    i_moe, i_dense, i_shared = c.moe_intermediate_size, c.dense_intermediate_size, c.shared_intermediate_size
    return {
        Role.EMBED: (c.vocab_size, h), Role.LM_HEAD: (c.vocab_size, h), Role.FINAL_NORM: (h,),
        Role.FINAL_NORM_BIAS: (h,), Role.LM_HEAD_BIAS: (c.vocab_size,),
        Role.ATTN_NORM: (h,), Role.MLP_NORM: (h,), Role.POST_ATTN_NORM: (h,), Role.POST_MLP_NORM: (h,), Role.ATTN_NORM_BIAS: (h,), Role.MLP_NORM_BIAS: (h,),
        Role.Q: (q, h), Role.K: (kv, h), Role.V: (kv_v, h), Role.O: (h, c.num_heads * c.value_dim),
        Role.Q_BIAS: (q,), Role.K_BIAS: (kv,), Role.V_BIAS: (kv_v,), Role.O_BIAS: (h,),
        Role.Q_NORM: (c.head_dim,) if c.attention.qk_norm == "head" else (q,),
        Role.K_NORM: (c.head_dim,) if c.attention.qk_norm == "head" else (kv,),
        Role.ROUTER: (c.routing.num_experts, h), Role.ROUTER_SCORE_BIAS: (c.routing.num_experts,),
        Role.EXPERT_GATE: (i_moe, e), Role.EXPERT_UP: (i_moe, e), Role.EXPERT_DOWN: (e, i_moe),
        Role.MOE_LATENT_IN: (e, h), Role.MOE_LATENT_OUT: (h, e),
        Role.SHARED_GATE: (i_shared, h), Role.SHARED_UP: (i_shared, h), Role.SHARED_DOWN: (h, i_shared),
        Role.SHARED_EXPERT_GATE: (1, h),
        Role.DENSE_GATE: (i_dense, h), Role.DENSE_UP: (i_dense, h), Role.DENSE_DOWN: (h, i_dense),
        Role.EXPERTS_GATE_UP_BIAS: (c.routing.num_experts, 2 * i_moe), Role.EXPERTS_DOWN_BIAS: (c.routing.num_experts, h),
        Role.SINKS: (c.num_heads,), Role.ROUTER_BIAS: (c.routing.num_experts,),
        Role.EXPERTS_GATE_UP_BLOCKS: (c.routing.num_experts, 2 * i_moe, h // 32, 16),
        Role.EXPERTS_GATE_UP_SCALES: (c.routing.num_experts, 2 * i_moe, h // 32),
        Role.EXPERTS_DOWN_BLOCKS: (c.routing.num_experts, h, i_moe // 32, 16),
        Role.EXPERTS_DOWN_SCALES: (c.routing.num_experts, h, i_moe // 32),
        **latent_shapes(c),
        **{role: shape for kind in MIXER_KINDS.values() for role, shape in kind.shapes(c).items()},
        Role.Q_GATE: (q, h),
    }[role]


def latent_shapes(c: ArchConfig) -> dict[Role, tuple[int, ...]]:
    m = c.attention.latent
    if m is None:
        return {}
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    shapes = {Role.KV_A: (m.kv_lora_rank + m.qk_rope_head_dim, c.hidden_size), Role.KV_A_NORM: (m.kv_lora_rank,),
              Role.KV_B: (c.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
              Role.Q: (c.num_heads * qk, c.hidden_size), Role.O: (c.hidden_size, c.num_heads * m.v_head_dim)}
    if m.q_lora_rank:
        shapes.update({Role.Q_A: (m.q_lora_rank, c.hidden_size), Role.Q_A_NORM: (m.q_lora_rank,),
                       Role.Q_B: (c.num_heads * qk, m.q_lora_rank)})
    return shapes


# Outputs of the residual branches: scaled by the residual multiplier where a family has one.
RESIDUAL_BRANCH_OUTPUTS = (Role.O, Role.O_BIAS, Role.DENSE_DOWN, Role.SHARED_DOWN, Role.EXPERT_DOWN, Role.CONV_OUT,
                           Role.CONV_OUT_BIAS, Role.LINEAR_OUT, Role.MAMBA_OUT, Role.MAMBA_OUT_BIAS)
# RMSNorm weights that a family may store zero-centred (ArchConfig.norms.weight_offset)
OFFSET_NORMS = (Role.ATTN_NORM, Role.MLP_NORM, Role.FINAL_NORM, Role.Q_NORM, Role.K_NORM)


class WeightReader:
    """Role-based access to the checkpoint, with shape checks against config.json."""

    def __init__(self, ckpt: Checkpoint, family: Family, cfg: ArchConfig):
        self.ckpt, self.family, self.cfg = ckpt, family, cfg
        self._layer_cfgs: dict[int, ArchConfig] = {}  # cfg.at_layer, once a layer (checked for every tensor)

    def check(self, role: Role, layer: int | None = None, expert: int | None = None) -> str:
        """The tensor's checkpoint name, after checking it exists with the shape config.json implies."""
        name = self.family.name(role, layer, expert)
        if name is None or not self.ckpt.has(name):
            where = "" if layer is None else f" of layer {layer}" + ("" if expert is None else f", expert {expert}")
            raise ModelError(f"checkpoint {self.ckpt.dir} lacks {name or role.value} (the {role.value}{where})")
        shape = self.ckpt.shape(name)
        want = expected_shape(role, self.cfg if layer is None else self._layer_cfg(layer), self.family.layouts)
        if role == Role.ROUTER_SCORE_BIAS and shape == (1, *want):  # ERNIE-4.5 stores one row per expert group
            shape = want
        if shape != want:
            raise ModelError(f"{name} has shape {list(shape)} but config.json implies {list(want)}")
        return name

    def get(self, role: Role, layer: int | None = None, expert: int | None = None) -> np.ndarray:
        layout = self.family.layout_of(role)
        if layout is not None:  # stored with other roles' (families/layouts.py)
            tensor = layout.read(self, role, layer, expert)
        else:
            tensor = self.ckpt.get(self.check(role, layer, expert))
            if role == Role.ROUTER_SCORE_BIAS:
                tensor = tensor.reshape(-1)
        if role in RESIDUAL_BRANCH_OUTPUTS and self.cfg.residual_multiplier != 1.0:
            tensor = tensor * np.float32(self.cfg.residual_multiplier)
        if role in OFFSET_NORMS and self.cfg.norms.weight_offset:
            tensor = tensor.astype(np.float32) + np.float32(self.cfg.norms.weight_offset)
        return tensor

    @property
    def fused_experts(self) -> FusedExperts | None:
        """The layout of a family whose experts are stored a layer's worth per tensor, or None."""
        layout = self.family.layout_of(Role.EXPERT_GATE)
        return layout if isinstance(layout, FusedExperts) else None

    def mxfp4(self, layer: int) -> bool:
        return self.present(Role.EXPERTS_GATE_UP_BLOCKS, layer)

    def mxfp4_expert(self, role: Role, layer: int, expert: int) -> np.ndarray:
        """Decoded [out, in]: the codes are stored output-major, gate and up alternating by row."""
        blocks, scales = ((Role.EXPERTS_DOWN_BLOCKS, Role.EXPERTS_DOWN_SCALES) if role == Role.EXPERT_DOWN
                          else (Role.EXPERTS_GATE_UP_BLOCKS, Role.EXPERTS_GATE_UP_SCALES))
        weight = decode_mxfp4(self.ckpt.get(self.check(blocks, layer), index=expert, raw=True),
                              self.ckpt.get(self.check(scales, layer), index=expert, raw=True))
        if role == Role.EXPERT_DOWN:
            return weight
        return np.ascontiguousarray(weight[0::2] if role == Role.EXPERT_GATE else weight[1::2])

    def expert_biases(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(gate, up, down) biases of one expert, for families whose experts have them."""
        if not self.present(Role.EXPERTS_GATE_UP_BIAS, layer):
            return None
        gate_up = self.ckpt.get(self.check(Role.EXPERTS_GATE_UP_BIAS, layer), index=expert)
        down = self.ckpt.get(self.check(Role.EXPERTS_DOWN_BIAS, layer), index=expert)
        return (*(self.fused_experts or FusedExperts()).split_bias(gate_up), down)

    def check_all(self) -> None:
        """Every tensor the export will read, checked from metadata alone before any work; and
        every checkpoint tensor accounted for (read or deliberately skipped)."""
        names = {self.check(Role.EMBED), self.check(Role.FINAL_NORM)}
        names.update(self.check(r) for r in (Role.FINAL_NORM_BIAS, Role.LM_HEAD_BIAS) if self.present(r))
        if not self.tied_lm_head():
            names.add(self.check(Role.LM_HEAD))
        for layer in range(self.cfg.num_layers):
            names.update(self.check(role, layer) for role in self.layer_roles(layer))
            if layer in self.cfg.moe_layers and self.fused_experts:
                names.update(self.check(role, layer) for role in self.fused_experts.stored(self, layer))
                names.update(self.check(role, layer) for role in (Role.EXPERTS_GATE_UP_BIAS, Role.EXPERTS_DOWN_BIAS)
                             if self.present(role, layer))
            elif layer in self.cfg.moe_layers:
                names.update(self.check(role, layer, expert)
                             for expert in range(self.cfg.routing.num_experts) for role in self.expert_roles)
        unused = tuple(LAYER.format(layer=i) + "." for i in range(
            self.cfg.num_layers, self.cfg.num_layers + self.cfg.unused_trailing_layers))
        leftovers = sorted(n for n in self.ckpt.names() - names
                           if not self.family.skipped(n) and not n.startswith(unused))
        if leftovers:
            more = f" (and {len(leftovers) - 5} more)" if len(leftovers) > 5 else ""
            raise ModelError(f"checkpoint tensors not understood by the {self.family.model_type} family: "
                             f"{', '.join(leftovers[:5])}{more}")

    def _layer_cfg(self, layer: int) -> ArchConfig:
        cfg = self._layer_cfgs.get(layer)
        if cfg is None:
            cfg = self._layer_cfgs[layer] = self.cfg.at_layer(layer)
        return cfg

    @property
    def expert_roles(self) -> tuple[Role, ...]:
        """The projections an expert stores: gate, up and down, or up and down (relu2)."""
        return EXPERT_ROLES if self.cfg.gated else tuple(r for r in EXPERT_ROLES if r != Role.EXPERT_GATE)

    def tied_lm_head(self) -> bool:
        return self.cfg.tie_word_embeddings and not self.present(Role.LM_HEAD, 0)

    def optional(self, role: Role, layer: int | None = None) -> np.ndarray | None:
        return self.get(role, layer) if self.present(role, layer) else None

    def present(self, role: Role, layer: int | None = None) -> bool:
        name = self.family.name(role, layer)
        return name is not None and self.ckpt.has(name)

    def layer_roles(self, layer: int) -> list[Role]:
        m = self.cfg.attention.latent
        kind = MIXER_KINDS.get(self.cfg.mixer(layer))
        if self.cfg.mixer(layer) == "none":  # the block is its MLP alone (Nemotron-H)
            roles = [Role.MLP_NORM]
        elif kind is not None:
            roles = list(kind.roles)
        elif m is not None:
            roles = [Role.ATTN_NORM, Role.O, Role.MLP_NORM, Role.KV_A, Role.KV_A_NORM, Role.KV_B]
            roles += [Role.Q_A, Role.Q_A_NORM, Role.Q_B] if m.q_lora_rank else [Role.Q]
        else:
            roles = list(ATTENTION_ROLES) + ([Role.Q_NORM, Role.K_NORM] if self.cfg.attention.qk_norm not in ("none", "unit") else [])
            roles += [Role.Q_GATE] if self.cfg.attention.output_gate else []
        if layer in self.cfg.block.no_mlp:  # the block is its token mixer alone (Nemotron-H)
            roles.remove(Role.MLP_NORM)
        else:
            roles += [Role.ROUTER] if layer in self.cfg.moe_layers else list(DENSE_MLP_ROLES)
            if layer in self.cfg.moe_layers and self.cfg.moe_latent_size:
                roles += [Role.MOE_LATENT_IN, Role.MOE_LATENT_OUT]
        if not self.cfg.gated and Role.DENSE_GATE in roles:
            roles.remove(Role.DENSE_GATE)
        if (self.cfg.block.parallel or not self.cfg.block.pre_norms) and Role.MLP_NORM in roles:
            roles.remove(Role.MLP_NORM)
        if not self.cfg.block.pre_norms and Role.ATTN_NORM in roles:
            roles.remove(Role.ATTN_NORM)
        if self.cfg.block.post_norms:
            roles += [Role.POST_ATTN_NORM, Role.POST_MLP_NORM]
        return roles + [r for r in OPTIONAL_LAYER_ROLES if self.present(r, layer)]

    def layer(self, layer: int) -> dict[Role, np.ndarray]:
        w = {role: self.get(role, layer) for role in self.layer_roles(layer)}
        if Role.SHARED_UP in w and w[Role.SHARED_UP].size == 0:  # a shared expert of size 0 adds exactly 0
            for role in (Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN, Role.SHARED_EXPERT_GATE):
                w.pop(role, None)
        return w


def dense_format(opts: CompileOptions) -> WeightFormat:
    return WeightFormat(bits=opts.resolved_dense_bits, block_size=opts.block_size, accuracy_level=opts.accuracy_level)


LOSSY_EVAL_TOKENS = 1024  # of the calibration text, in windows of LOSSY_EVAL_WINDOW
LOSSY_EVAL_WINDOW = 128


def int2_prefill_cost(draft: Path, budget: Budget, calib_ids: np.ndarray, log: Callable[[str], None]) -> float:
    """Perplexity with the lossy INT2 prefill on, divided by with it off, on the start of the calibration
    text, the finished artifact run by the runtime at the policy's budget (what `fate-run --int2-prefill
    on` costs, end to end)."""
    from fate.runtime.evaluate import perplexity
    from fate.runtime.experts.offload import OffloadOptions
    from fate.runtime.model import FateModel
    from fate.runtime.options import EngineOptions

    ids = [int(t) for t in np.asarray(calib_ids).reshape(-1)[:LOSSY_EVAL_TOKENS]]
    result = {}
    for mode in ("off", "on"):
        model = FateModel.load(draft, EngineOptions(offload=OffloadOptions(budget, low_bit_prefill=mode), verify=False))
        try:
            result[mode] = perplexity(model.logits, ids, LOSSY_EVAL_WINDOW)
        finally:
            model.close()
    ratio = result["on"].value / result["off"].value
    log(f"INT2 prefill (lossy, opt-in): perplexity x{ratio:.4f} on {result['on'].tokens} calibration tokens")
    return ratio


def own_attention(cfg: ArchConfig, layer: int) -> dict:
    """A layer's LayerSpec fields for attention unlike the model's: its key-value heads, its RoPE."""
    own = {}
    if cfg.attention.layer_kv_heads is not None and cfg.attention.layer_kv_heads[layer] != cfg.num_kv_heads:
        own["num_kv_heads"] = cfg.attention.layer_kv_heads[layer]
    if cfg.positions.layer_inv_freq is not None and cfg.positions.layer_inv_freq[layer] is not None \
            and layer not in cfg.positions.nope_layers:
        own["rope_inv_freq"] = list(cfg.positions.layer_inv_freq[layer])
    return own


def model_spec(family: Family, cfg: ArchConfig, dense_bits: int = 32) -> ModelSpec:
    return ModelSpec(
        family=family.model_type, architecture=family.architecture, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, max_positions=cfg.max_positions,
        rope_inv_freq=cfg.positions.inv_freq, rope_attention_scaling=cfg.positions.attention_scaling,
        sliding_window=cfg.attention.sliding_window,
        cache_key_dim=cfg.attention.latent.kv_lora_rank if cfg.attention.latent else None,
        cache_value_dim=cfg.attention.latent.qk_rope_head_dim if cfg.attention.latent else cfg.attention.value_head_dim,
        dense_precision=PRECISION_OF_BITS[dense_bits],
    )


def compile_checkpoint(opts: CompileOptions, log: Callable[[str], None] = print) -> Path:
    for bits in opts.bits:
        if bits not in PRECISION_OF_BITS:
            raise ModelError(f"--bits {bits} is not supported; choose from {sorted(PRECISION_OF_BITS, reverse=True)}")
    if opts.block_size is not None and (opts.block_size < 16 or opts.block_size & (opts.block_size - 1)
                                        or opts.block_size > MAX_BLOCK_SIZE):
        raise ModelError(f"--block-size must be a power of two from 16 to {MAX_BLOCK_SIZE}, got {opts.block_size}")
    if opts.resolved_dense_bits not in DENSE_BITS:
        raise ModelError(f"--dense-bits {opts.dense_bits} is not supported; choose from {list(DENSE_BITS)}")
    check_output(opts.out_dir, opts.inputs, opts.force, "artifact")  # before any work: fail in a moment
    ckpt = Checkpoint(opts.model_dir)
    family = family_for(ckpt.config)
    check_sizes(ckpt.config)
    cfg = family.read_config(ckpt.config)
    cfg.check_rotary()
    tokenizer = read_tokenizer(opts.model_dir, cfg)
    reader = WeightReader(ckpt, family, cfg)
    reader.check_all()
    spec = model_spec(family, cfg, opts.resolved_dense_bits)
    calib_ids = None
    if opts.calibration is not None:
        encode = Tokenizer.from_str(tokenizer.files["tokenizer.json"].decode("utf-8")).encode
        # sequences no longer than the model's context (Mistral-4's is capped where its query scaling begins)
        within = replace(opts.calibration, sequence_length=min(opts.calibration.sequence_length, cfg.max_positions))
        calib_ids = calibration_ids(within, lambda text: encode(text).ids)
    start = time.time()
    with ArtifactWriter(opts.out_dir, inputs=opts.inputs, force=opts.force) as writer:
        log(f"compiling {family.architecture} from {opts.model_dir}: {cfg.num_layers} layers, "
            f"{len(cfg.moe_layers)} MoE layers x {cfg.routing.num_experts} experts "
            f"(top-{cfg.routing.top_k if cfg.routing.layer_top_k is None else '/'.join(map(str, sorted(set(cfg.routing.layer_top_k))))}), "
            f"experts as {', '.join(PRECISION_OF_BITS[b] for b in opts.bits)}, dense weights as {spec.dense_precision}"
            + ("" if calib_ids is None else f"; calibrating on {calib_ids.size} tokens"))
        embed = reader.get(Role.EMBED)
        first = next_router(reader, cfg, 0)
        embed_data = graphs.embed_graph(embed, cfg.embedding_multiplier, quantized=opts.resolved_dense_bits < 32,
                                        first=None if first is None else (cfg, first)).SerializeToString()
        writer.write_bytes(layout.EMBED_GRAPH, embed_data)
        profiler = None if calib_ids is None else Profiler(
            spec, calib_ids, embed_data, opts.calibration, opts.calibration.source,
            activation=(cfg.swiglu_limit, cfg.swiglu_alpha))
        del embed_data
        exporter = LayerExporter(writer, reader, cfg, opts, profiler)
        layers = []
        for layer in range(cfg.num_layers):
            layers.append(exporter.export(layer))
            release_freed_memory()
            log(f"  layer {layer + 1}/{cfg.num_layers} done ({time.time() - start:.1f} s)")
        lm_head = embed if reader.tied_lm_head() else reader.get(Role.LM_HEAD)
        final_norm_bias, lm_head_bias = reader.optional(Role.FINAL_NORM_BIAS), reader.optional(Role.LM_HEAD_BIAS)
        head = graphs.head_graph(cfg, reader.get(Role.FINAL_NORM), final_norm_bias, lm_head, lm_head_bias,
                                 dense_format(opts)).SerializeToString()
        head_step = graphs.head_step(cfg, lm_head.shape[0], final_norm_bias, lm_head_bias, dense_format(opts))
        if head_step is not None:
            head_step = graphs.head_step_views(head_step, head, cfg)
        writer.write_bytes(layout.HEAD_GRAPH, head)
        del head
        for name, data in tokenizer.files.items():
            writer.write_bytes(layout.tokenizer_file(name), data)
        policy = None
        if profiler is not None:
            profile = profiler.result()
            writer.write_bytes(layout.PROFILE, profile_to_bytes(profile))
            sizes = {path: entry.size for path, entry in writer.entries.items()}
            policy = plan_for_budget(profile, layers, sizes, opts.budget, opts.targets)
        manifest = Manifest(
            schema_version="", fate_version="", model=spec,
            embed_graph=layout.EMBED_GRAPH, head_graph=layout.HEAD_GRAPH, layers=layers,
            tokenizer=tokenizer.spec, generation=tokenizer.generation or GenerationDefaults(), files=[],
            profile=None if profiler is None else layout.PROFILE, policy=policy, head_step=head_step,
            embed_predicts_next=first is not None,
        )
        if policy is not None and any(lp.prefill_precision for lp in policy.layers):
            ratio = int2_prefill_cost(writer.draft(manifest), Budget(share=policy.budget), calib_ids, log)
            manifest = replace(manifest, policy=replace(policy, int2_prefill_perplexity_ratio=ratio))
        sizes = {path: entry.size for path, entry in writer.entries.items()}
        out = writer.commit(manifest)
    if exporter.sensitive:
        worst = max(exporter.sensitive.values())
        many = len(exporter.sensitive) > 1
        log(f"note: layer{'s' if many else ''} {', '.join(map(str, sorted(exporter.sensitive)))} lose{'' if many else 's'} "
            f"more than --max-quant-error "
            f"{opts.targets.max_quant_error:g} at INT4 (up to {worst:.3f}); --bits 4 --bits 8 would also store INT8 "
            "copies, which the policy runs where the budget allows")
    log(f"wrote {out} in {time.time() - start:.1f} s: {layout.size_text(sizes)}")
    return out


def next_router(reader: WeightReader, cfg: ArchConfig, layer: int) -> graphs.NextRouter | None:
    """What predicts `layer`'s experts from the stream before it (the layer before, or the embedding for
    layer 0): its router and the norm it reads through (before its MLP, or in parallel blocks its input
    norm); None where `layer` is not an MoE layer."""
    if layer not in cfg.moe_layers:
        return None
    norm, norm_bias = (Role.ATTN_NORM, Role.ATTN_NORM_BIAS) if cfg.block.parallel else (Role.MLP_NORM, Role.MLP_NORM_BIAS)
    return graphs.NextRouter(reader.get(Role.ROUTER, layer), reader.get(norm, layer) if cfg.block.pre_norms else None,
                             reader.optional(norm_bias, layer), reader.optional(Role.ROUTER_SCORE_BIAS, layer),
                             reader.optional(Role.ROUTER_BIAS, layer))


class LayerExporter:
    """Writes one layer's graph and expert files, and feeds the profiler as it goes."""

    def __init__(self, writer: ArtifactWriter, reader: WeightReader, cfg: ArchConfig, opts: CompileOptions,
                 profiler: Profiler | None):
        self.writer, self.reader, self.cfg, self.opts, self.profiler = writer, reader, cfg, opts, profiler
        # INT2 copies for prefill (lossy) only when asked, and only where calibration can plan them
        self.bits = tuple(sorted(set(opts.bits) | ({2} if profiler and opts.int2_copies else set()), reverse=True))
        self.sensitive: dict[int, float] = {}  # layer -> INT4 error, where it passes targets.max_quant_error

    def export(self, layer: int) -> LayerSpec:
        cfg, reader = self.cfg, self.reader
        is_moe = layer in cfg.moe_layers
        next_layer = next_router(reader, cfg, layer + 1)
        weights = reader.layer(layer)
        info = graphs.layer_graph(layer, cfg, weights, next_layer, dense_format(self.opts))
        graph_path = layout.layer_graph(layer)
        combine_path = None
        if is_moe and (cfg.block.post_norms or cfg.moe_latent_size):
            combine_path = layout.combine_graph(layer)
            combine = graphs.combine_graph(cfg, weights.get(Role.POST_MLP_NORM) if cfg.block.post_norms else None,
                                           weights.get(Role.MOE_LATENT_OUT), dense_format(self.opts))
            self.writer.write_bytes(combine_path, combine.SerializeToString())
        del weights
        spec = LayerSpec(index=layer, kind="moe" if is_moe else "dense", graph=graph_path,
                         predicts_next=info.predicts_next,
                         sliding_window=cfg.attention.layer_windows[layer] if cfg.attention.layer_windows else None,
                         **own_attention(cfg, layer),
                         expert_input_size=(cfg.moe_latent_size or None) if is_moe else None,
                         mixer=cfg.mixer(layer), combine_graph=combine_path, positions=info.positions,
                         graph_only=info.graph_only if is_moe else None,
                         state=[StateSpec(name, shape) for name, shape in graphs.state_shapes(cfg, layer).items()])
        # one serialized copy at a time: the dense weights of a large layer are hundreds of MB
        data = info.model.SerializeToString()
        if info.decode_step is not None:
            spec = replace(spec, decode_step=graphs.decode_step_views(info.decode_step, data, cfg.at_layer(layer),
                                                                      cfg.routing.num_experts if next_layer else 0))
        del info
        self.writer.write_bytes(graph_path, data)
        del data
        if self.profiler:  # onnxruntime reads the written file: no second in-memory copy
            self.profiler.run_layer(spec, str(self.writer.tmp / graph_path),
                                    None if combine_path is None else str(self.writer.tmp / combine_path))
        if not is_moe:
            return spec

        experts, layouts = self._write_experts(layer, self.bits, feed_profiler=True)
        if self.profiler:
            measured = self.profiler.finish_layer()
            # such a layer is stored as asked, and said: --bits 8 as well would let the policy run it at INT8
            if measured.quant_error["int4"] > self.opts.targets.max_quant_error and 4 in self.bits \
                    and 8 not in self.bits:
                self.sensitive[layer] = measured.quant_error["int4"]
        routing = RoutingSpec(scoring=cfg.routing.scoring, num_experts=cfg.routing.num_experts, top_k=cfg.top_k_at(layer),
                              normalize_top_k=cfg.routing.normalize_top_k)
        return replace(spec, routing=routing, experts=experts, expert_layouts=layouts)

    def _slot_layout(self, bits: int, biases) -> ExpertLayout:
        """The layout every expert file of a layer at `bits` must have (offsets filled per file)."""
        limit = self.cfg.swiglu_limit
        return ExpertLayout(hidden_size=self.cfg.expert_width, intermediate_size=self.cfg.moe_intermediate_size,
                            bits=bits, block_size=self.opts.block_size or DEFAULT_BLOCK_SIZE[bits],
                            accuracy_level=self.opts.accuracy_level,
                            activation=self.cfg.expert_activation, has_bias=biases is not None,
                            tensors=[], swiglu_limit=limit, swiglu_alpha=None if limit is None else self.cfg.swiglu_alpha)

    def _write_experts(self, layer: int, bits_list: tuple[int, ...],
                       feed_profiler: bool) -> tuple[dict[str, list[str]], dict[str, ExpertLayout]]:
        """Each expert's file per precision, and the slot layout of each quantized precision."""
        experts: dict[str, list[str]] = {PRECISION_OF_BITS[b]: [] for b in bits_list}
        layouts: dict[str, ExpertLayout] = {}
        profiling = feed_profiler and self.profiler is not None
        wanted = set(bits_list) | (set(QUANT_BITS.values()) if profiling else set())
        for expert in range(self.cfg.routing.num_experts):
            weights = tuple(self.reader.get(role, layer, expert) if role in self.reader.expert_roles else None
                            for role in EXPERT_ROLES)
            biases = self.reader.expert_biases(layer, expert)
            # each precision quantized once, for its file and for the profiler's error figures
            variants = {bits: expert_precision(weights, bits, self.opts.block_size) for bits in wanted}
            for bits in bits_list:
                path = layout.expert_graph(layer, expert, PRECISION_OF_BITS[bits])
                model = graphs.expert_graph(*variants[bits], accuracy_level=self.opts.accuracy_level,
                                            biases=biases, cfg=self.cfg)
                data = model.SerializeToString()
                self.writer.write_bytes(path, data)
                experts[PRECISION_OF_BITS[bits]].append(path)
                if bits <= 8:
                    self._check_layout(layouts, PRECISION_OF_BITS[bits], layout_of(data, self._slot_layout(bits, biases)))
            if profiling:
                self.profiler.add_expert(expert, weights, {p: variants[b] for p, b in QUANT_BITS.items()}, biases)
        return experts, layouts

    @staticmethod
    def _check_layout(layouts: dict[str, ExpertLayout], precision: str, found: ExpertLayout) -> None:
        """One layout serves every expert of a layer and precision: the graphs are built alike."""
        first = layouts.setdefault(precision, found)
        if first != found:
            raise ModelError(f"expert files at {precision} differ in layout; cannot describe them with one slot image")


def expert_precision(weights: tuple[np.ndarray | None, ...], bits: int, block_size: int | None) -> tuple:
    """(gate, up, down) at `bits`: float32, float16, or quantized for MatMulNBits (no gate: None)."""
    if bits == 32:
        return weights
    if bits == 16:
        return tuple(None if w is None else w.astype(np.float16) for w in weights)
    return tuple(None if w is None else quantize(w, bits, block_size) for w in weights)
