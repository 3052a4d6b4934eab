"""Calibration profiling, run inside the export loop one layer at a time.

Calibration sequences go through the compiled graphs themselves (onnxruntime), so what is
measured is what the runtime will see. Routed experts are computed here in numpy from the
float32 weights, expert by expert as the exporter reads them, together with their INT8, INT4 and
INT2 dequantized versions (the quantizer's own reference), so memory stays one expert plus the
calibration activations. The float32 trajectory feeds the next layer.

Per MoE layer this records (see fate.artifacts.profile): similarity of adjacent router inputs,
recall of each predictor at fetch widths for decode and prefill, popularity, ARC miss curves,
quantization error per precision, the INT2-share error curve and EAP transition counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fate.artifacts import LayerSpec, ModelError, ModelSpec
from fate.artifacts.inputs import read_text_file
from fate.artifacts.layout import GraphIO as IO
from fate.artifacts.precisions import QUANTIZED
from fate.artifacts.predictors import GRAPH_OUTPUT_OF, PREDICTION_OUTPUTS, Predictor
from fate.artifacts.profile import PROFILE_VERSION, LayerProfile, Profile, RecallCurve
from fate.runtime.experts.eviction import DEFAULT_POLICY
from fate.runtime.experts.predictors import eap_scores, top_experts
from fate.runtime.experts.replay import optimal_miss_rate, replay_miss_rate
from fate.runtime.positions import PositionTables
from fate.runtime.sessions import make_session
from fate.runtime.state import experts_input, hands_on_partial, initial_state, layer_feeds

from .quantize import dequantize

BUILTIN = "builtin"
BUILTIN_TEXT = Path(__file__).parent / "data" / "calibration.txt"
LOW_BIT_SHARES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
QUANT_BITS = {p.name: p.bits for p in QUANTIZED}  # what calibration measures each expert at
PREDICTED_BY = {output: predictor for predictor, output in GRAPH_OUTPUT_OF.items()}  # graph output -> predictor


@dataclass(frozen=True)
class CalibrationOptions:
    source: str = BUILTIN  # "builtin" or a text file
    tokens: int = 4096
    sequence_length: int = 128
    prefill_window: int = 32
    quant_tokens: int = 1024  # tokens used for quantization-error figures


def calibration_ids(options: CalibrationOptions, encode) -> np.ndarray:
    """Token ids [sequences, sequence_length] from the calibration text."""
    path = BUILTIN_TEXT if options.source == BUILTIN else Path(options.source)
    text = read_text_file(path, "calibration text")
    ids = encode(text)
    s = options.sequence_length
    n = min(len(ids), options.tokens) // s
    if n < 4:
        raise ModelError(f"calibration text {path} gives {len(ids)} tokens; at least {4 * s} are needed")
    return np.asarray(ids[: n * s], np.int64).reshape(n, s)


def expert_forward(x: np.ndarray, gate: np.ndarray | None, up: np.ndarray, down: np.ndarray,
                   biases: tuple | None = None, limit: float | None = None, alpha: float = 1.702) -> np.ndarray:
    """The expert graph's function in numpy (see graphs.expert_graph; no gate: the squared ReLU)."""
    bg, bu, bd = biases if biases is not None else (0.0, 0.0, 0.0)
    u = x @ up.T + bu
    if gate is None:
        return np.square(np.maximum(u, 0)) @ down.T + bd
    g = x @ gate.T + bg
    if limit is None:
        act = (g / (1.0 + np.exp(-g))) * u
    else:
        g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
        act = (u + 1) * g / (1.0 + np.exp(-alpha * g))
    return act @ down.T + bd


def rel_error(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), 1e-30))


def top_mask(scores: np.ndarray, width: int) -> np.ndarray:
    """Boolean [N, E]: each row's `width` highest scores (the runtime's prediction)."""
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, top_experts(scores, width), True, axis=1)
    return mask


def recall_curve(scores: np.ndarray, actual: np.ndarray, widths: list[int], window: int) -> RecallCurve:
    """scores [N, E] of a predictor, actual [N, E] boolean top-k, over consecutive windows."""
    k = int(actual[0].sum())
    decode, prefill, fetch = [], [], []
    n_win = len(actual) // window
    actual_union = actual[: n_win * window].reshape(n_win, window, -1).any(axis=1)
    for w in widths:
        predicted = top_mask(scores, w)
        decode.append(float((predicted & actual).sum(axis=1).mean() / k))
        union = predicted[: n_win * window].reshape(n_win, window, -1).any(axis=1)
        prefill.append(float(((union & actual_union).sum(axis=1) / actual_union.sum(axis=1)).mean()))
        fetch.append(float(union.sum(axis=1).mean()))
    return RecallCurve(widths=list(widths), decode=decode, prefill=prefill, prefill_fetch=fetch)


def slot_grid(num_experts: int, top_k: int) -> list[int]:
    if num_experts <= 24:
        return list(range(num_experts + 1))
    return sorted({0, top_k, num_experts, *np.linspace(top_k, num_experts, 16).round().astype(int).tolist()})


@dataclass
class _Previous:
    """What the last layer left for the next one's measurements."""

    router_input: np.ndarray | None = None
    predictions: dict[str, np.ndarray] | None = None
    moe_index: int | None = None
    moe_ids: np.ndarray | None = None
    moe_experts: int = 0


class Profiler:
    def __init__(self, spec: ModelSpec, ids: np.ndarray, embed: bytes, options: CalibrationOptions,
                 source_name: str, activation: tuple[float | None, float] = (None, 1.702)):
        self.spec, self.options, self.source_name = spec, options, source_name
        self.activation = activation  # (swiglu_limit, swiglu_alpha): the experts' activation
        self.n_seq, self.seq_len = ids.shape
        session = make_session(embed, lean=True)
        # where the embedding graph predicts layer 0's experts (Manifest.embed_predicts_next), layer 0's
        # predictors are measured as every later layer's are
        names = [IO.HIDDEN] + [name for name in PREDICTED_BY if name in {o.name for o in session.get_outputs()}]
        runs = [session.run(names, {IO.INPUT_IDS: row}) for row in ids]
        self.hidden = np.stack([run[0][0] for run in runs])
        predictions = {PREDICTED_BY[name]: np.concatenate([run[i] for run in runs])
                       for i, name in enumerate(names[1:], 1)} or None
        del runs
        self.positions = PositionTables(spec).step(0, self.seq_len)  # every sequence from an empty state
        # EAP is fitted on the first three quarters of the sequences; every recall is measured
        # on the last quarter, so predictors are compared on the same unseen tokens.
        self.eval_from = (self.n_seq - max(1, self.n_seq // 4)) * self.seq_len
        self.quant_rows = np.arange(min(options.quant_tokens, self.n_seq * self.seq_len))
        self.previous = _Previous(predictions=predictions)
        self.layers: list[LayerProfile] = []
        self._moe: dict | None = None
        self._combine: bytes | str | None = None

    # -------------------------------------------------------------- per layer, from the exporter

    def run_layer(self, layer: LayerSpec, model: bytes | str, combine: bytes | str | None = None) -> None:
        """Run the calibration activations through a layer graph (serialized, or a file path); each
        sequence from an empty state. `combine`: a post-norm MoE layer's combine graph, which makes
        the layer's output from its residual and routed sum."""
        self._combine = combine
        index, is_moe, predicts_next = layer.index, layer.kind == "moe", layer.predicts_next
        names = [IO.RESIDUAL, IO.ROUTER_INPUT]
        if is_moe:
            names += [IO.ROUTER_LOGITS, IO.EXPERT_IDS, IO.EXPERT_WEIGHTS]
            names += [IO.EXPERT_INPUT] if layer.expert_input_size else []
        if predicts_next:
            names += list(PREDICTION_OUTPUTS)
        session = make_session(model, lean=True)
        if hands_on_partial(layer, session):
            names.append(IO.MOE_PARTIAL)
        empty = initial_state(self.spec, layer)
        positional = self.positions.for_layer(layer)
        out: dict[str, np.ndarray] = {}
        s = self.seq_len
        for i, seq in enumerate(self.hidden):
            for name, value in zip(names, session.run(names, layer_feeds(layer, seq[None], empty, positional))):
                value = value.reshape(s, -1)
                if name not in out:  # filled in place: no list of per-sequence copies
                    out[name] = np.empty((self.n_seq * s, value.shape[1]), value.dtype)
                out[name][i * s:(i + 1) * s] = value
        del session
        residual = out[IO.RESIDUAL]
        if is_moe:
            self._start_moe(index, out, experts_input(out, layer))
        else:
            self.hidden = residual.reshape(self.hidden.shape)
            self._moe = None
        self._carry = (out[IO.ROUTER_INPUT], {PREDICTED_BY[name]: out[name] for name in PREDICTED_BY}
                       if predicts_next else None)
        if not is_moe:
            self._advance()

    def _start_moe(self, index: int, out: dict[str, np.ndarray], x: np.ndarray) -> None:
        """Open a MoE layer's measurements; x: what its experts read (router_input, or the latent input)."""
        ids = out[IO.EXPERT_IDS]
        counts = np.bincount(ids.reshape(-1), minlength=out[IO.ROUTER_LOGITS].shape[1])
        order = np.argsort(counts, kind="stable")  # least popular first
        share = np.cumsum(counts[order]) / counts.sum()
        # expert -> the smallest grid share whose least-popular tail includes it
        tails = {s: set(order[: int(np.searchsorted(share, s, side="right"))].tolist()) for s in LOW_BIT_SHARES}
        rows = self.quant_rows
        self._moe = dict(
            index=index, out=out, counts=counts, tails=tails, x=x,
            # the residual becomes the layer output in place (with a combine graph: the routed sum)
            total=out[IO.RESIDUAL] if self._combine is None else np.zeros_like(x),
            routed=np.zeros((len(rows), x.shape[1]), np.float32),
            quant={p: np.zeros_like(x[rows]) for p in QUANT_BITS},
            low={s: np.zeros_like(x[rows]) for s in LOW_BIT_SHARES},
        )

    def add_expert(self, expert: int, weights: tuple[np.ndarray, ...], quantized: dict[str, tuple],
                   biases: tuple | None = None) -> None:
        """One expert's float32 (gate, up, down), its quantized versions by precision name, and
        its biases where the family has them."""
        m = self._moe
        ids, scores, x = m["out"][IO.EXPERT_IDS], m["out"][IO.EXPERT_WEIGHTS], m["x"]
        tokens, slots = np.nonzero(ids == expert)
        if tokens.size == 0:
            return
        w = scores[tokens, slots][:, None]
        act = dict(biases=biases, limit=self.activation[0], alpha=self.activation[1])
        y = expert_forward(x[tokens], *weights, **act)
        m["total"][tokens] += w * y
        in_q = tokens < len(self.quant_rows)
        q_tokens, q_w = tokens[in_q], w[in_q]
        if q_tokens.size == 0:
            return
        m["routed"][q_tokens] += q_w * y[in_q]
        approx = {p: q_w * expert_forward(x[q_tokens], *(None if q is None else dequantize(q) for q in quantized[p]),
                                          **act)
                  for p in QUANT_BITS}
        for p in QUANT_BITS:
            m["quant"][p][q_tokens] += approx[p]
        for s, tail in m["tails"].items():
            m["low"][s][q_tokens] += approx["int2"] if expert in tail else approx["int4"]

    def finish_layer(self) -> LayerProfile:
        """Close an MoE layer: record its profile and move the float32 trajectory on."""
        m = self._moe
        out = m["out"]
        routed = m["routed"]
        num_experts = out[IO.ROUTER_LOGITS].shape[1]
        top_k = out[IO.EXPERT_IDS].shape[1]
        actual = np.zeros((len(out[IO.EXPERT_IDS]), num_experts), bool)
        np.put_along_axis(actual, out[IO.EXPERT_IDS], True, axis=1)
        profile = LayerProfile(
            index=m["index"], num_experts=num_experts, top_k=top_k,
            **self._similarity(out[IO.ROUTER_INPUT]),
            predictors=self._predictors(out, actual, top_k),
            popularity=(m["counts"] / m["counts"].sum()).tolist(),
            miss_curve_slots=(slots := slot_grid(num_experts, top_k)),
            miss_curve=[replay_miss_rate(DEFAULT_POLICY, out[IO.EXPERT_IDS].tolist(), c) for c in slots],
            optimal_miss_curve=[optimal_miss_rate(out[IO.EXPERT_IDS].tolist(), c) for c in slots],
            quant_error={p: rel_error(m["quant"][p], routed) for p in QUANT_BITS},
            low_bit_shares=list(LOW_BIT_SHARES),
            # the error INT2 adds on top of INT4, relative to the exact routed output
            low_bit_error=[float(np.linalg.norm(m["low"][s] - m["quant"]["int4"]) / max(np.linalg.norm(routed), 1e-30))
                           for s in LOW_BIT_SHARES],
            transitions_from=self.previous.moe_index,
            transitions=self._transitions(out[IO.EXPERT_IDS], num_experts).tolist(),
        )
        self.layers.append(profile)
        total = m["total"]
        if self._combine is not None:  # hidden = residual + norm(routed sum), sequence by sequence
            session, s = make_session(self._combine, lean=True), self.seq_len
            residual = out[IO.RESIDUAL]
            if IO.MOE_PARTIAL in out:
                total = total + out[IO.MOE_PARTIAL]
            total = np.concatenate([session.run([IO.HIDDEN], {IO.RESIDUAL: residual[i * s:(i + 1) * s][None],
                                                              IO.ROUTED: total[i * s:(i + 1) * s]})[0][0]
                                    for i in range(self.n_seq)])
        self.hidden = total.reshape(self.hidden.shape)
        self._moe = None
        self._advance(m["index"], out[IO.EXPERT_IDS], num_experts)
        return profile

    def _advance(self, moe_index: int | None = None, moe_ids: np.ndarray | None = None, experts: int = 0) -> None:
        router_input, predictions = self._carry
        prev = self.previous
        if moe_index is None:  # a dense layer: the last MoE layer stays the EAP source
            moe_index, moe_ids, experts = prev.moe_index, prev.moe_ids, prev.moe_experts
        self.previous = _Previous(router_input, predictions, moe_index, moe_ids, experts)

    # -------------------------------------------------------------- measurements

    def _similarity(self, router_input: np.ndarray) -> dict:
        prev = self.previous.router_input
        if prev is None:
            return dict(similarity_mean=None, similarity_std=None)
        cos = (prev * router_input).sum(1) / (np.linalg.norm(prev, axis=1) * np.linalg.norm(router_input, axis=1) + 1e-30)
        return dict(similarity_mean=float(cos.mean()), similarity_std=float(cos.std()))

    def _transitions(self, ids: np.ndarray, num_experts: int, rows: slice = slice(None)) -> np.ndarray:
        prev = self.previous.moe_ids
        if prev is None:
            return np.zeros((0, 0), np.int64)
        counts = np.zeros((self.previous.moe_experts, num_experts), np.int64)
        for a in range(prev.shape[1]):
            for b in range(ids.shape[1]):
                np.add.at(counts, (prev[rows, a], ids[rows, b]), 1)
        return counts

    def _predictors(self, out: dict, actual: np.ndarray, top_k: int) -> dict[str, RecallCurve]:
        num_experts = actual.shape[1]
        widths = list(range(top_k, min(num_experts, 3 * top_k) + 1))
        ev = slice(self.eval_from, None)
        window = self.options.prefill_window
        scores: dict[str, np.ndarray] = {}
        if self.previous.predictions is not None:
            scores.update(self.previous.predictions)
        if self.previous.moe_ids is not None:
            fit = slice(0, self.eval_from)
            counts = self._transitions(out[IO.EXPERT_IDS], num_experts, fit).astype(np.float64)
            scores[Predictor.EAP] = eap_scores(counts, actual[fit].mean(0), self.previous.moe_ids)
        # previous token within the same sequence: shift router logits by one position (the
        # first token of each sequence has no previous one and counts against this predictor)
        logits = out[IO.ROUTER_LOGITS].reshape(self.n_seq, self.seq_len, -1)
        shifted = np.concatenate([np.zeros_like(logits[:, :1]), logits[:, :-1]], axis=1)
        scores[Predictor.PREVIOUS_TOKEN] = shifted.reshape(-1, num_experts)
        return {name: recall_curve(s[ev], actual[ev], widths, window) for name, s in scores.items()}

    def result(self) -> Profile:
        return Profile(profile_version=PROFILE_VERSION, calibration=self.source_name,
                       calibration_tokens=self.n_seq * self.seq_len, sequence_length=self.seq_len,
                       prefill_window=self.options.prefill_window,
                       eval_tokens=self.n_seq * self.seq_len - self.eval_from, layers=self.layers)
