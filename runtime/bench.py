"""fate-bench ART --budgets 25%,50%,100% --prefetch none,eap,cross-layer [--prompt-len N --gen-len N]
[--repeat R] [--json OUT]

Every configuration runs in a fresh process (so peak resident memory is its own), interleaved
with the others in each repeat (in alternating order), after one warm-up round; the table reports medians with their
spread, and ratios against the all-resident run and against load-on-demand at the same budget,
all measured in this one invocation.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from fate.artifacts import Artifact, FateError
from fate.artifacts.budget import parse_budget
from fate.artifacts.errors import USER_ERRORS, exit_with
from fate.artifacts.inputs import read_text_file
from fate.artifacts.outputs import check_output, write_report

from .bench_peers import LlamaCpp, disk_read_bytes
from .cgroup import MemoryCgroup, Readahead, drop_caches
from .cgroup import readahead_kb as current_readahead
from .clihelp import command
from .experts.eviction import DEFAULT_POLICY, POLICIES
from .experts.plan import POOLS
from .experts.trace import TraceHeader, TraceRecord
from .memory import peak_rss
from .sessions import usable_cores
from .svg import Chart, Series
from .text import TextCodec

DEFAULT_TEXT = (
    "The history of computing is a story of making machines smaller, cheaper and closer to the people who "
    "use them. Large language models now follow the same path: what once needed a data centre is expected "
    "to answer questions on a laptop, a phone or a small board in a factory. Mixture-of-experts models make "
    "this both easier and harder, because each token uses only a few experts, yet all of them must be kept "
    "somewhere. "
)
RESIDENT = "all-resident"


@dataclass(frozen=True)
class RunConfig:
    artifact: str
    budget: str  # "all-resident" or a budget string
    prefetch: str
    prompt_ids: list[int]
    gen_len: int
    cache: str = DEFAULT_POLICY
    precision: str | None = None
    executor: str = "auto"
    decode_steps: bool = True
    pool: str = "global"
    memory_limit: str | None = None  # the whole process (budget is then unused)

    @property
    def label(self) -> str:
        if self.memory_limit is not None:
            label = f"limit={self.memory_limit} {self.prefetch}"
        else:
            label = RESIDENT if self.budget == RESIDENT else f"{self.budget} {self.prefetch}"
        label = label if self.executor == "auto" else f"{label} [{self.executor}]"
        label = label if self.pool == "global" or self.budget == RESIDENT else f"{label} [{self.pool}]"
        return label if self.decode_steps else f"{label} [graphs]"


def run_one(config: RunConfig) -> dict:
    """One generation in this process; the numbers of one table cell."""
    from .experts.offload import OffloadOptions
    from .experts.report import OffloadReport
    from .generate import SamplingConfig, generate
    from .model import FateModel
    from .options import EngineOptions

    start = time.perf_counter()
    limit = None if config.memory_limit is None else parse_budget(config.memory_limit).bytes
    offload = None if config.budget == RESIDENT and limit is None else OffloadOptions(
        budget=parse_budget("0B" if limit is not None else config.budget), prefetch=config.prefetch,
        cache=config.cache, pool=config.pool)
    model = FateModel.load(config.artifact, EngineOptions(precision=config.precision, offload=offload, executor=config.executor,
                           decode_steps=config.decode_steps, memory_limit=limit,
                           context=len(config.prompt_ids) + config.gen_len))
    load_s = time.perf_counter() - start
    try:
        if offload is not None:
            model.start_trace()  # in memory: Belady's bytes at this run's capacity, below
        result = generate(model, config.prompt_ids, config.gen_len, SamplingConfig(), eos_ids=set())
        report = model.experts.report()
    finally:
        model.close()
    optimal = optimal_decode_bytes(model.trace.header, model.trace.records) if model.trace is not None else None
    s = result.stats
    row = {"load_s": load_s, "prefill_tok_s": s.prefill_tokens_per_s, "decode_tok_s": s.decode_tokens_per_s,
           "ttft_s": s.time_to_first_token_s, "peak_rss_mb": peak_rss() / 1e6,
           "stall_s": 0.0, "hit_rate": None, "recall": None, "mb_read": 0.0, "loop_us_per_load": None}
    if isinstance(report, OffloadReport):
        d = report.decode
        row.update(stall_s=report.stall_s, hit_rate=d.hit_rate, recall=d.mean_recall(), loop_us_per_load=d.loop_us_per_load,
                   mb_read=report.bytes_read / 1e6, budget_mb=report.budget_bytes / 1e6,
                   total_expert_mb=report.total_expert_bytes / 1e6,
                   decode_mb_per_token=d.bytes_per_token / 1e6 if d.tokens else None,
                   belady_mb_per_token=optimal / 1e6 if optimal is not None else None)
    return row


def optimal_decode_bytes(header: TraceHeader, records: list[TraceRecord]) -> float | None:
    """Bytes per decode token Belady's optimal cache reads over a run's own routing, with the run's
    slots in one pool (runtime.experts.replay): the least any cache of that size could have read."""
    from .experts.replay import accesses_of, belady
    from .replay_cli import Capacity

    tokens = len({r.step for r in records if r.phase == "decode"})
    if not tokens:
        return None
    capacity = Capacity("run", {l.layer: l.slots for l in header.layers}, {l.layer: l.slot_bytes for l in header.layers})
    groups, group_of = capacity.groups("global")
    return belady(accesses_of(records), groups, group_of, capacity.cost).bytes_read["decode"] / tokens


def storage_bandwidth(artifact: str, seconds: float = 2.0, threads: int = 4) -> tuple[float, float]:
    """Bytes per second reading expert files as the runtime does (one positioned read per file into
    a slot, page cache bypassed, `threads` at a time: fate-run's default 2 prefetch and 2 miss-loading
    threads): a first pass over as many files as `seconds`
    allow, then the same files again. Under a budget the runtime re-reads the same experts, and
    storage below the page cache (a disk's or a hypervisor's cache) can serve those faster than a
    first read: (first pass, repeat pass); the I/O bound uses the repeat pass."""
    from concurrent.futures import ThreadPoolExecutor

    from .experts.pool import SlotPool, read_aligned

    art = Artifact.open(artifact)
    paths = [p for layer in art.manifest.moe_layers for files in layer.experts.values() for p in files]
    if not paths:
        raise FateError(f"{artifact} has no expert files to measure storage with")
    members = [art.member(p) for p in paths]
    pool = SlotPool({0: threads}, {0: max(m.size + m.offset % 4096 for m in members)})

    def one_pass(files, deadline: float | None) -> tuple[float, list]:
        queue, read = iter(files), []

        def worker(slot: int) -> int:
            done = 0
            for m in queue:  # a shared iterator: next() is atomic under the GIL
                read_aligned(pool.buffer(0, slot), m.file, m.offset, m.size, pool)
                read.append(m)
                done += m.size
                if deadline is not None and time.perf_counter() > deadline:
                    break
            return done

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            total = sum(ex.map(worker, range(threads)))
        return total / (time.perf_counter() - start), read

    try:
        first, read = one_pass(members, time.perf_counter() + seconds)
        repeat, _ = one_pass(read, None)
        return first, repeat
    finally:
        pool.close()


def run_in_subprocess(config: RunConfig, cap: bool = False) -> dict:
    """One run in a process of its own; with `cap` and a memory limit, inside a memory cgroup of the
    limit, the page cache dropped first (the disk's reads counted)."""
    command = [sys.executable, "-m", "fate.runtime.bench", "--worker", json.dumps(asdict(config))]
    if not (cap and config.memory_limit):
        proc = subprocess.run(command, capture_output=True, text=True)
        code, out, err, extra = proc.returncode, proc.stdout, proc.stderr, {}
    else:
        with MemoryCgroup(parse_budget(config.memory_limit).bytes) as group:
            drop_caches()
            before = disk_read_bytes(config.artifact)
            run = group.run(command)
            read = disk_read_bytes(config.artifact) - before if before is not None else None
        code, out, err = run.returncode, run.stdout, run.stderr
        if run.oom_killed:
            raise FateError(f"run {config.label} was OOM-killed under its memory limit")
        extra = {"cgroup_peak_mb": run.peak_bytes / 1e6 if run.peak_bytes else None,
                 "disk_mb_per_token": read / config.gen_len / 1e6 if read is not None else None}
    if code != 0:
        lines = err.strip().splitlines() or ["(no output)"]
        raise FateError(f"run {config.label} failed: {lines[-1]}")
    return {**json.loads(out.strip().splitlines()[-1]), **extra}


def peer_table(results: dict[str, dict], limits: list[str]) -> str:
    """Each limit: Fate's prefetch modes and llama.cpp, decode and prefill tok/s, the disk's MB per
    generated token, the cgroup's peak; Fate / llama.cpp in decode."""
    lines = [f"{'limit':>8s} {'engine':30s} {'decode tok/s':>19s} {'prefill tok/s':>14s} {'x llama.cpp':>11s} "
             f"{'disk MB/tok':>11s} {'peak MB':>8s}"]
    for limit in limits:
        peer = results.get(f"llama.cpp limit={limit}", {})
        rows = [(label.split(" ", 1)[1], r) for label, r in results.items() if label.startswith(f"limit={limit} ")]
        for name, r in rows + ([("llama.cpp (mmap, --no-repack)", peer)] if peer else []):
            decode = r.get("decode_tok_s")
            spread = f"{fmt(decode)} ({fmt(r.get('decode_tok_s_min'))}-{fmt(r.get('decode_tok_s_max'))})"
            ratio = fmt(decode / peer["decode_tok_s"] if decode and peer.get("decode_tok_s") and r is not peer
                        else None, ".2f")
            lines.append(f"{limit:>8s} {name:30s} {spread:>19s} {fmt(r.get('prefill_tok_s')):>14s} {ratio:>11s} "
                         f"{fmt(r.get('disk_mb_per_token')):>11s} {fmt(r.get('cgroup_peak_mb') or r.get('peak_mb'), '.0f'):>8s}")
    return "\n".join(lines)


def prompt_ids(artifact: str, prompt_len: int, prompts: Path | None) -> list[int]:
    codec = TextCodec(Artifact.open(artifact))
    text = read_text_file(prompts, "prompt text") if prompts else DEFAULT_TEXT
    ids = codec.encode(text)
    if not ids:
        raise FateError(f"the prompt text {prompts} gives no tokens")
    while len(ids) < prompt_len:
        ids = ids + ids
    return ids[:prompt_len]


def summarize(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
            out[key + "_min"], out[key + "_max"] = min(values), max(values)
    return out


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict[str, dict], bandwidth: float | None = None) -> str:
    """Ratios within one executor: against its all-resident run, its on-demand run at the same
    budget, and the I/O bound min(all-resident tok/s, storage bandwidth / bytes read per decode token)."""
    lines = [f"{'config':28s} {'prefill tok/s':>14s} {'decode tok/s':>19s} {'x resident':>10s} {'x on-demand':>11s} "
             f"{'x I/O bound':>11s} {'TTFT s':>7s} {'stall s':>7s} {'us/load':>7s} {'hit':>6s} {'recall':>6s} {'MB/tok':>7s} "
             f"{'x Belady':>8s} "
             f"{'MB read':>8s} {'peak RSS MB':>11s}"]
    for label, r in results.items():
        words = label.split(" ")
        executor = [w for w in words if w.startswith("[")]
        pools = {f"[{p}]" for p in POOLS}
        resident = results.get(" ".join([RESIDENT, *(w for w in executor if w not in pools)]), {}).get("decode_tok_s")
        on_demand = results.get(" ".join([words[0], "none", *executor]), {}).get("decode_tok_s")
        decode = r.get("decode_tok_s")
        per_token = r.get("decode_mb_per_token")
        bound = None
        if resident and bandwidth and per_token is not None and words[0] != RESIDENT:
            bound = resident if per_token == 0 else min(resident, bandwidth / 1e6 / per_token)
        spread = f"{fmt(decode)} ({fmt(r.get('decode_tok_s_min'))}-{fmt(r.get('decode_tok_s_max'))})"
        ratio = lambda base: fmt(decode / base if base and decode is not None else None, ".2f")  # noqa: E731
        lines.append(
            f"{label:28s} {fmt(r.get('prefill_tok_s')):>14s} {spread:>19s} "
            f"{ratio(resident) if words[0] != RESIDENT else '-':>10s} "
            f"{ratio(on_demand) if words[1:2] != ['none'] and words[0] != RESIDENT else '-':>11s} "
            f"{ratio(bound):>11s} "
            f"{fmt(r.get('ttft_s'), '.3f'):>7s} {fmt(r.get('stall_s'), '.2f'):>7s} {fmt(r.get('loop_us_per_load'), '.0f'):>7s} "
            f"{fmt(r.get('hit_rate'), '.3f'):>6s} "
            f"{fmt(r.get('recall'), '.3f'):>6s} {fmt(per_token, '.2f'):>7s} "
            f"{fmt(per_token / r['belady_mb_per_token'] if r.get('belady_mb_per_token') else None, '.2f'):>8s} "
            f"{fmt(r.get('mb_read')):>8s} "
            f"{fmt(r.get('peak_rss_mb'), '.0f'):>11s}")
    return "\n".join(lines)


COLUMNS = ("x resident: decode speed against all experts resident; x on-demand: against --prefetch none at the "
           "same budget; x I/O bound: against min(all-resident, storage bandwidth / MB read per token); us/load: the "
           "expert loop's own time on the generation thread per expert loaded in decode (not its waits for reads, "
           "not its expert runs); hit: decode "
           "expert hit rate; recall: the prefetch's; MB/tok: expert bytes read per decode token; x Belady: those "
           "against the fewest any cache could read at this capacity")


def flags_of(label: str) -> str:
    """A table row's label as the fate-run flags that give it."""
    words = label.split(" ")
    where = f"--memory-limit {words[0][6:]}" if words[0].startswith("limit=") else f"--memory-budget {words[0]}"
    out = [where, f"--prefetch {words[1]}"] if len(words) > 1 else [where]
    for word in words[2:]:
        value = word.strip("[]")
        out.append("--decode-steps off" if value == "graphs" else f"--pool {value}" if value in POOLS
                   else f"--executor {value}")
    return " ".join(out)


def recommendations(results: dict[str, dict]) -> list[str]:
    """The fastest configuration at each budget and limit, as the flags to run it with."""
    groups: dict[str, list[tuple[float, str]]] = {}
    for label, r in results.items():
        if label == RESIDENT or label.startswith((RESIDENT + " ", "llama.cpp")) or r.get("decode_tok_s") is None:
            continue
        groups.setdefault(label.split(" ")[0], []).append((r["decode_tok_s"], label))
    out = []
    for where, runs in groups.items():
        runs.sort(reverse=True)
        best, label = runs[0]
        second = f"; next {flags_of(runs[1][1]).split(' ', 2)[-1]} at {runs[1][0] / best:.2f}x" if len(runs) > 1 else ""
        out.append(f"fastest here at {where.replace('limit=', 'a limit of ')}: {flags_of(label)} "
                   f"({best:.1f} tok/s{second})")
    return out


def machine() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.machine()}, {usable_cores()} cores"


def plot_svg(results: dict[str, dict], model: str, bandwidth: float | None) -> str:
    """Decode tokens/s against the memory the experts had (GB; their share along the top), one series
    per configuration with its min-max range, all-resident and the I/O bound as reference lines."""
    series: dict[str, Series] = {}
    total_mb = next((r["total_expert_mb"] for r in results.values() if r.get("total_expert_mb")), None)
    for label, r in results.items():
        if r.get("budget_mb") is None or r.get("decode_tok_s") is None:
            continue
        words = label.split(" ")
        name = " ".join(words[1:]) + (", --memory-limit" if words[0].startswith("limit=") else "")
        s = series.setdefault(name, Series(name, [], []))
        s.points.append((r["budget_mb"] / 1e3, r["decode_tok_s"]))
        s.spread.append((r.get("decode_tok_s_min", r["decode_tok_s"]), r.get("decode_tok_s_max", r["decode_tok_s"])))
    chart = Chart(f"{model}: decode speed against expert memory ({machine()})", "memory for the experts (GB)",
                  "decode tokens/s", list(series.values()))
    xs = sorted({x for s in chart.series for x, _ in s.points})
    resident = results.get(RESIDENT, {}).get("decode_tok_s")
    if resident and xs:
        chart.series.append(Series("all experts resident", [(xs[0], resident), (xs[-1], resident)], reference=True,
                                   color="#333333"))
    if bandwidth and xs:
        bound = []
        for x in xs:
            per_token = [r["decode_mb_per_token"] for r in results.values() if r.get("budget_mb") is not None
                         and abs(r["budget_mb"] / 1e3 - x) < 1e-9 and r.get("decode_mb_per_token")]
            if per_token:
                speed = bandwidth / 1e6 / min(per_token)
                bound.append((x, min(speed, resident) if resident else speed))
        if bound:
            chart.series.append(Series("I/O bound (disk / MB per token)", bound, reference=True,
                                       color="#999999"))
    if total_mb:
        chart.top_axis = ("share of all experts", lambda x: f"{1e3 * x / total_mb:.0%}")
    return chart.svg()


@command("fate-bench", sections=(
    ("What to compare", ["budgets", "memory_limits", "prefetch", "pools", "cache", "executors", "decode_steps",
                         "precision"]),
    ("Workload", ["prompts", "prompt_len", "gen_len", "repeat"]),
    ("Against llama.cpp, under a memory cgroup", ["cap", "peer", "gguf", "llama_bin", "readahead_kb"]),
    ("Output", ["json_out", "plot"]),
), examples=(
    ("fate-bench model.fate --budgets 25%,50% --prefetch none,policy --plot bench.svg",
     "prefetch modes at two budgets, with a chart"),
    ("fate-bench model.fate --memory-limits 1.2GB,900MB --peer llama.cpp --gguf model.gguf",
     "under memory cgroups, beside llama.cpp"),
))
@click.argument("artifact", required=False)
@click.option("--budgets", default="25%,50%", show_default=True, help="Comma-separated budgets.")
@click.option("--prefetch", default="none,eap,cross-layer,policy", show_default=True, help="Comma-separated modes.")
@click.option("--executors", default="auto", show_default=True,
              help="Comma-separated executors to compare (auto, native, session).")
@click.option("--decode-steps", "decode_steps", default="on", show_default=True,
              help="Comma-separated: on (native decode steps where the artifact has them), off (graphs every token).")
@click.option("--prompts", type=click.Path(path_type=Path), default=None, help="Text to take the prompt from.")
@click.option("--prompt-len", default=64, show_default=True, type=click.IntRange(min=1), help="Prompt tokens per run.")
@click.option("--gen-len", default=32, show_default=True, type=click.IntRange(min=2), help="Tokens generated per run.")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1),
              help="Rounds; each configuration runs once per round, in alternating order.")
@click.option("--memory-limits", default=None,
              help="Comma-separated whole-process limits (1.2GB,900MB) to run each prefetch mode under, beside --budgets.")
@click.option("--cap/--no-cap", default=True, show_default=True,
              help="Run each --memory-limits configuration inside a memory cgroup of that size (page cache counted; "
                   "needs root), the page cache dropped first.")
@click.option("--peer", type=click.Choice(["llama.cpp"]), default=None,
              help="Also run llama.cpp (memory-mapped, --no-repack) under each --memory-limits cap, same prompt and tokens.")
@click.option("--gguf", default=None, help="The GGUF file llama.cpp runs (--peer).")
@click.option("--llama-bin", default=None, help="The folder holding llama.cpp's llama-completion (--peer).")
@click.option("--readahead-kb", type=click.IntRange(min=0), default=None,
              help="Set the disk's readahead for the runs (laptops: 128) and restore it after; every capped "
                   "table states the setting.")
@click.option("--pools", default="global", show_default=True, help="Comma-separated: global, per-layer.")
@click.option("--cache", type=click.Choice(sorted(POLICIES)), default=DEFAULT_POLICY, show_default=True,
              help="The eviction policy of every offloaded run.")
@click.option("--precision", default=None, help="Expert precision to run (default: the policy's).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write every run's numbers to this file.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Write decode tokens/s against budget, one line per prefetch mode (.svg).")
@click.option("--worker", default=None, hidden=True)
def main(artifact, budgets, prefetch, executors, decode_steps, prompts, prompt_len, gen_len, repeat, memory_limits,
         cap, peer, gguf, llama_bin, readahead_kb, pools, cache, precision, json_out, plot, worker) -> None:
    """Measure a Fate ARTIFACT at several budgets and prefetch modes, side by side."""
    if worker is not None:  # one run, in its own process
        click.echo(json.dumps(run_one(RunConfig(**json.loads(worker)))))
        return
    try:
        if artifact is None:
            raise FateError("missing ARTIFACT")
        if plot is not None and plot.suffix != ".svg":
            raise FateError("--plot writes SVG: give a file name ending in .svg")
        for out in (plot, json_out):  # a bad output path fails before the runs
            if out is not None:
                check_output(out, [Path(artifact)], True, "report")
        ids = prompt_ids(artifact, prompt_len, prompts)
        steps = [{"on": True, "off": False}.get(v.strip()) for v in decode_steps.split(",")]
        if None in steps:
            raise FateError(f"--decode-steps takes on, off or both (on,off), got {decode_steps!r}")
        kinds = [(e.strip(), on) for e in executors.split(",") for on in steps]
        configs = [RunConfig(artifact, RESIDENT, "none", ids, gen_len, cache, precision, e, on) for e, on in kinds]
        chosen_pools = [p.strip() for p in pools.split(",")]
        if any(p not in POOLS for p in chosen_pools):
            raise FateError(f"--pools takes {', '.join(POOLS)}, got {pools!r}")
        for b in budgets.split(","):
            parse_budget(b)  # fail before any run
            configs += [RunConfig(artifact, b.strip(), p.strip(), ids, gen_len, cache, precision, e, on, pool)
                        for e, on in kinds for p in prefetch.split(",") for pool in chosen_pools]
        for limit in (memory_limits or "").split(","):
            if not limit.strip():
                continue
            if parse_budget(limit).bytes is None:
                raise FateError(f"--memory-limits takes bytes (1.2GB), not a share: {limit!r}")
            configs += [RunConfig(artifact, "0B", p.strip(), ids, gen_len, cache, precision, e, on, pool, limit.strip())
                        for e, on in kinds for p in prefetch.split(",") for pool in chosen_pools]
        limits = [l.strip() for l in (memory_limits or "").split(",") if l.strip()]
        if peer and not (gguf and limits):
            raise FateError("--peer llama.cpp needs --gguf FILE and --memory-limits to run it under")
        llama = LlamaCpp.find(llama_bin, gguf, usable_cores()) if peer else None
        text = TextCodec(Artifact.open(artifact)).decode(ids)
        if cap and limits:  # refused before any run where this process cannot make a cgroup
            MemoryCgroup(parse_budget(limits[0]).bytes).close()
        first_read, bandwidth = storage_bandwidth(artifact)
        jobs = [(c.label, lambda c=c: run_in_subprocess(c, cap)) for c in configs]
        for limit in limits if llama else []:
            def peer_run(limit=limit):
                with MemoryCgroup(parse_budget(limit).bytes) as group:
                    drop_caches()
                    row = llama.run(text, gen_len, group)
                if "failed" in row:
                    raise FateError(f"llama.cpp under {limit} failed: {row['failed']}")
                return row
            jobs.append((f"llama.cpp limit={limit}", peer_run))
        rows: dict[str, list[dict]] = {label: [] for label, _ in jobs}
        total = len(jobs) * (repeat + 1)
        done = 0
        with Readahead(artifact, readahead_kb):
            setting = current_readahead(artifact)
            for round_ in range(repeat + 1):  # round 0 warms up and is not counted
                # Alternate the order: a run right after the all-resident one starts with the page cache and
                # free memory it left (measured: the same plan ran 14% slower in that position).
                for label, job in (jobs if round_ % 2 else jobs[::-1]):
                    done += 1
                    click.echo(f"\r[{done}/{total}] {'warm-up' if round_ == 0 else f'repeat {round_}'}: "
                               f"{label:28s}", nl=False, err=True)
                    row = job()
                    if round_:
                        rows[label].append(row)
        click.echo("", err=True)
        results = {label: summarize(r) for label, r in rows.items()}
        click.echo(f"storage: {bandwidth / 1e9:.2f} GB/s re-reading expert files as the runtime does (4 threads, "
                   f"page cache bypassed; first reads {first_read / 1e9:.2f} GB/s), measured before the runs")
        click.echo(table({k: v for k, v in results.items() if not k.startswith("llama.cpp")}, bandwidth))
        click.echo(f"columns: {COLUMNS}")
        if limits:
            capped = "inside memory cgroups of each limit, page cache dropped before each run" if cap else "uncapped"
            click.echo(f"\nunder --memory-limits ({capped}; the disk reads ahead {setting} KB per fault):")
            click.echo(peer_table(results, limits))
        for line in recommendations(results):
            click.echo(line)
        if plot is not None:
            write_report(plot, plot_svg(results, Path(artifact).name, bandwidth), inputs=[Path(artifact)])
        if json_out:
            write_report(json_out, json.dumps({"prompt_len": prompt_len, "gen_len": gen_len, "repeat": repeat,
                                               "storage_bytes_per_s": bandwidth,
                                               "storage_first_read_bytes_per_s": first_read, "results": results,
                                               "runs": rows}, indent=1), inputs=[Path(artifact)])
    except USER_ERRORS as e:
        exit_with("fate-bench", e)


if __name__ == "__main__":
    main()
