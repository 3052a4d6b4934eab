"""fate-inspect ARTIFACT [--html report.html]: what calibration measured and what the compiler
decided, per MoE layer; the HTML report is one self-contained file (inline SVG, no scripts)."""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import click
from fate.artifacts import Artifact, FateError, Manifest, layout
from fate.artifacts.errors import USER_ERRORS, exit_with
from fate.artifacts.outputs import check_output, write_report
from fate.artifacts.predictors import Predictor
from fate.artifacts.profile import LayerProfile, Profile, profile_from_bytes

from .clihelp import command
from .memory import PREFILL_CHUNK, plan_memory
from .model import DEFAULT_CONTEXT, memory_needs
from .options import EngineOptions
from .svg import Chart, Series
from .tools import tool_format


def skew(popularity: list[float]) -> float:
    """Share of assignments that go to the most popular quarter of the experts."""
    top = sorted(popularity, reverse=True)[: max(1, len(popularity) // 4)]
    return sum(top)


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def rows(manifest: Manifest, profile: Profile) -> list[dict[str, str]]:
    out = []
    for p in profile.layers:
        decided = manifest.policy.layer(p.index) if manifest.policy else None
        cross = p.predictors.get(Predictor.CROSS_LAYER)
        chosen = p.predictors.get(decided.predictor) if decided and decided.predictor != "none" else None
        eap = p.predictors.get(Predictor.EAP)
        prev = p.predictors.get(Predictor.PREVIOUS_TOKEN)
        out.append({
            "layer": str(p.index),
            "mixer": manifest.layers[p.index].mixer,
            "similarity": fmt(p.similarity_mean),
            "cross@k": fmt(cross.decode[0] if cross else None),
            "eap@k": fmt(eap.decode[0] if eap else None),
            "prev@k": fmt(prev.decode[0] if prev else None),
            "predictor": decided.predictor if decided else "-",
            "width": str(decided.prefetch_width) if decided else "-",
            "recall@width": fmt(chosen.decode_at(decided.prefetch_width) if chosen else None),
            "top25% share": fmt(skew(p.popularity), ".2f"),
            "int4 err": fmt(p.quant_error.get("int4")),
            "bits": decided.precision if decided else "-",
            "cache share": fmt(decided.cache_share if decided else None, ".3f"),
            "int2 prefill": f"{decided.prefill_low_share:.0%}" if decided and decided.prefill_precision else "-",
        })
    return out


def table(data: list[dict[str, str]]) -> str:
    headers = list(data[0])
    widths = [max(len(h), *(len(r[h]) for r in data)) for h in headers]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line([r[h] for h in headers]) for r in data])


# ---------------------------------------------------------------------------------- HTML


# What each column of the table means, shown under it in the HTML report.
GLOSSARY = {
    "layer": "the layer's index (MoE layers only)",
    "mixer": "what mixes tokens in it: attention, or a recurrent or convolution state",
    "similarity": "mean cosine similarity between this layer's router input and the previous layer's",
    "cross@k": "decode recall of the cross-layer predictor at width top-k: the share of this layer's experts the "
               "previous layer's router input, run through this layer's router, named (the first layer's: its router "
               "on the token's embedding, where the embedding graph computes it)",
    "eap@k": "the same for the activation-path (EAP) predictor, fitted on calibration",
    "prev@k": "the same for 'the previous token's experts again'",
    "predictor": "the predictor the policy chose for prefetching into this layer (none: load on demand)",
    "width": "how many experts it prefetches per token",
    "recall@width": "its measured decode recall at that width",
    "top25% share": "the share of routing that goes to the most popular quarter of the experts",
    "int4 err": "relative error of this layer's experts output at INT4, on calibration tokens",
    "bits": "the precision the policy runs the layer at",
    "cache share": "the share of the expert budget the per-layer pool gives this layer",
    "int2 prefill": "the share of prefill transfers moved at INT2 (a lossy, opt-in mode)",
}


def layer_charts(p: LayerProfile) -> str:
    recall = [Series(name, list(zip(c.widths, c.decode))) for name, c in p.predictors.items()]
    miss = [Series("misses (calibration replayed)", list(zip(p.miss_curve_slots, p.miss_curve)))]
    if p.optimal_miss_curve is not None:
        miss.append(Series("optimal (Belady)", list(zip(p.miss_curve_slots, p.optimal_miss_curve)), reference=True))
    pop = sorted(p.popularity, reverse=True)
    size = {"width": 460, "height": 280}
    return (Chart(f"layer {p.index}: decode recall", "prefetch width (experts)", "recall", recall, y_max=1.0,
                  **size).svg() +
            Chart(f"layer {p.index}: miss rate", "slots", "miss rate", miss, y_max=1.0, **size).svg() +
            Chart(f"layer {p.index}: expert popularity", "expert (by rank)", "share of routing",
                  [Series("popularity", list(enumerate(pop)))], bars=True, **size).svg())


def report_html(artifact: Artifact, profile: Profile) -> str:
    m = artifact.manifest
    data = rows(m, profile)
    head = "".join(f"<th title='{html.escape(GLOSSARY.get(h, ''))}'>{html.escape(h)}</th>" for h in data[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values()) + "</tr>" for r in data)
    glossary = "".join(f"<dt>{html.escape(h)}</dt><dd>{html.escape(GLOSSARY[h])}</dd>" for h in data[0] if h in GLOSSARY)
    reasons = ""
    if m.policy:
        items = "".join(f"<li>layer {lp.index}: " + "; ".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}"
                                                              for k, v in lp.reasons.items()) + "</li>"
                        for lp in m.policy.layers)
        reasons = f"<h2>Why (policy planned for {m.policy.budget:.0%} of experts)</h2><ul>{items}</ul>"
    charts = "".join(f"<div class='layer'>{layer_charts(p)}</div>" for p in profile.layers)
    facts = "".join(f"<li>{html.escape(line)}</li>" for line in (
        f"identity: sha256:{artifact.digest}", size_line(artifact), needs_line(artifact)))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Fate report: {html.escape(m.model.architecture)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1500px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right;font-size:12px}} .layer{{display:flex;gap:8px;margin:6px 0}}
li,dd,dt{{font-size:13px}} dt{{font-weight:bold;float:left;clear:left;width:9em}} dd{{margin-left:10em}}</style>
</head><body><h1>{html.escape(m.model.architecture)} ({html.escape(m.model.family)})</h1>
<ul>{facts}</ul>
<p>{m.model.num_layers} layers, {len(m.moe_layers)} MoE layers, experts stored as {html.escape(', '.join(m.precisions))},
dense weights {html.escape(m.model.dense_precision)}. Calibration: {html.escape(profile.calibration)},
{profile.calibration_tokens} tokens; recall measured on {profile.eval_tokens} held-out tokens
(EAP fitted on the rest); prefill windows of {profile.prefill_window} tokens.</p>
<table><tr>{head}</tr>{body}</table><h2>Columns</h2><dl>{glossary}</dl>{reasons}<h2>Per layer</h2>{charts}</body></html>"""


@command("fate-inspect", examples=(
    ("fate-inspect qwen3-30b.fate", "sizes, memory, and each layer's measured precision and prefetch"),
    ("fate-inspect qwen3-30b.fate --html report.html", "the same with charts, as a page"),
))
@click.argument("artifact")
@click.option("--html", "html_out", type=click.Path(path_type=Path), default=None,
              help="Write a self-contained HTML report here.")
def main(artifact: str, html_out: Path | None) -> None:
    """Print the per-layer profile and policy of a Fate ARTIFACT."""
    try:
        if html_out is not None:  # a bad output path fails before the work
            check_output(html_out, [Path(artifact)], True, "report")
        art = Artifact.open(artifact)
        m = art.manifest
        click.echo(f"{m.model.architecture} ({m.model.family}): {m.model.num_layers} layers, "
                   f"{len(m.moe_layers)} MoE, experts stored as {', '.join(m.precisions)}, "
                   f"dense weights {m.model.dense_precision}; Fate {m.fate_version}")
        click.echo(f"identity: sha256:{art.digest}")
        steps = [layer.index for layer in m.layers if layer.decode_step is not None]
        click.echo(f"native decode steps: {len(steps)} of {m.model.num_layers} layers"
                   + (f" ({', '.join(map(str, steps))})" if 0 < len(steps) < m.model.num_layers else ""))
        why: dict[str, list[int]] = {}
        for layer in m.layers:
            if layer.graph_only:
                why.setdefault(layer.graph_only, []).append(layer.index)
        for reason, layers in why.items():  # the MoE layers that run their graph every token
            click.echo(f"  graph every token, layer{'s' if len(layers) > 1 else ''} {span_list(layers)}: {reason}")
        click.echo(size_line(art))
        click.echo(needs_line(art))
        if m.policy is not None and m.policy.int2_prefill_perplexity_ratio is not None:
            click.echo(f"lossy mode stored: INT2 prefill (fate-run --int2-prefill on), perplexity "
                       f"x{m.policy.int2_prefill_perplexity_ratio:.4f} on calibration text at "
                       f"{m.policy.budget:.0%} of the experts")
        click.echo(memory_line(art))
        mixers = Counter(layer.mixer for layer in m.layers)
        if set(mixers) != {"attention"}:  # a hybrid: what a sequence holds beside its keys and values
            named = (f"{n} {'without a mixer' if name == 'none' else name}" for name, n in sorted(mixers.items()))
            click.echo(f"mixers: {', '.join(named)}; a sequence carries "
                       f"{m.state_bytes / 1e6:.2f} MB of fixed-size layer state beside its keys and values")
        if not m.profile:
            if html_out is not None:
                raise FateError("--html: this artifact has no calibration profile to report (compiled with --calib none)")
            click.echo("no calibration profile (compiled with --calib none)")
            return
        profile = profile_from_bytes(art.read_bytes(m.profile)).check(m.experts_per_layer)
        click.echo(table(rows(m, profile)))
        if html_out is not None:
            write_report(html_out, report_html(art, profile), inputs=[Path(artifact)])
            click.echo(f"report: {html_out}")
    except USER_ERRORS as e:
        exit_with("fate-inspect", e)


def size_line(art: Artifact) -> str:
    """The artifact on disk, its context and whether it chats."""
    m = art.manifest
    template = m.tokenizer.chat_template
    chat = "none (fate-run and fate-serve take --chat-template FILE)" if not template else \
        "yes, with tools" if tool_format(template) else "yes"
    return (f"size: {layout.size_text({e.path: e.size for e in m.files})}; context {m.model.max_positions} tokens; "
            f"chat template: {chat}")


def needs_line(art: Artifact) -> str:
    """What a run needs, as --memory-limit plans it (runtime.model.memory_needs)."""
    context = min(DEFAULT_CONTEXT, art.manifest.model.max_positions)
    needs = memory_needs(art, 0, EngineOptions(context=context))
    return (f"to run ({context}-token context): every expert resident about {needs.all_resident / 1e6:.0f} MB for the "
            f"process; the least --memory-limit {needs.least_limit / 1e6:.0f} MB; the least --memory-budget "
            f"{needs.fewest / 1e6:.1f} MB (one token's experts in every layer)")


def memory_line(art: Artifact) -> str:
    """What a run holds besides its experts, as --memory-limit plans it (runtime.memory.plan_memory), and
    the experts' bytes per precision."""
    m = art.manifest
    graphs = [m.embed_graph, m.head_graph, *(l.graph for l in m.layers), *(l.combine_graph for l in m.layers
                                                                            if l.combine_graph)]
    plan = plan_memory(m, {g: art.member(g).size for g in graphs}, 0, PREFILL_CHUNK, steps=True, baseline=0)
    experts = {p: sum(art.entry(path).size for l in m.moe_layers for path in l.experts.get(p, [])) for p in m.precisions}
    return (f"memory: non-expert graphs held {(plan.dense + plan.steps) / 1e6:.1f} MB ({plan.steps / 1e6:.1f} MB of them "
            f"run by native steps, held once), KV cache {plan.kv_cache / PREFILL_CHUNK / 1e3:.1f} KB per token, "
            f"prefill scratch {plan.scratch / 1e6:.1f} MB; experts {', '.join(f'{p} {b / 1e6:.1f} MB' for p, b in experts.items())}")


def span_list(indices: list[int]) -> str:
    """0, 1, 2, 5 -> "0-2, 5"."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
