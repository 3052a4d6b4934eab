"""fate-run ARTIFACT --prompt "..." [--max-new-tokens N] [sampling flags | --greedy] [--chat] [--json]"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click
from fate.artifacts import FateError
from fate.artifacts.budget import parse_budget
from fate.artifacts.errors import USER_ERRORS, exit_with

from .api import Engine
from .clihelp import command
from .experts.eviction import DEFAULT_POLICY, POLICIES
from .experts.executors import EXECUTORS
from .experts.offload import OffloadOptions
from .experts.plan import LOW_BIT_PREFILL_MODES, POOLS, PREFETCH_MODES
from .experts.report import OffloadReport, ResidentReport
from .generate import GenerationResult, SamplingConfig, penalty_problem
from .memory import current_rss, peak_rss
from .options import EngineOptions
from .sessions import usable_cores

MAX_PREFETCH_THREADS = 64


def sampling_from_flags(engine: Engine, greedy: bool, temperature: float | None, top_p: float | None,
                        top_k: int | None, seed: int | None, min_p: float | None = None,
                        presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                        repetition_penalty: float = 1.0) -> SamplingConfig:
    """--greedy wins; any sampling flag means sampling; otherwise the model's generation defaults.
    The penalties apply to greedy decoding too."""
    defaults = engine.model.manifest.generation
    asked_to_sample = any(v is not None for v in (temperature, top_p, top_k, min_p))
    if greedy and asked_to_sample:
        raise FateError("--greedy cannot be combined with --temperature, --top-p, --top-k or --min-p")
    problem = penalty_problem(min_p or 0.0, presence_penalty, frequency_penalty, repetition_penalty, sep="-")
    if problem:
        raise FateError(f"--{problem}")
    return SamplingConfig(
        greedy=greedy or not (asked_to_sample or defaults.do_sample),
        temperature=temperature if temperature is not None else defaults.temperature,
        top_p=top_p if top_p is not None else defaults.top_p,
        top_k=top_k if top_k is not None else defaults.top_k,
        seed=seed, min_p=min_p or 0.0, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
    )


def engine_options(command):
    """The flags that load an engine (precision, threads, verification, memory budget and offloading),
    the same for every command that generates (fate-run, fate-serve)."""
    options = [
        click.option("--precision", default=None,
                     help="Expert precision to run when several are stored (e.g. int4)."),
        click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Compute threads for dense graphs and the native expert kernel (0: all cores for work large enough to gain from them; graphs under 4 MB and small expert layers run on one)."),
        click.option("--no-verify", is_flag=True, help="Trust the artifact as it is: skip SHA-256 checks of files as they load, and the probes that hold "
                          "native decode steps to their graphs."),
        click.option("--verify-every-load", is_flag=True,
                     help="With a memory budget: check an expert's SHA-256 at every load, not only its first "
                       "(for files that may change while Fate runs)."),
        click.option("--memory-limit", default=None,
                     help="Memory for the whole process (8GB, 1.5GiB): what loading the model, its KV cache at "
                          "--context tokens and a headroom leave holds experts (fate-run --json itemizes it). "
                          "Default: no limit."),
        click.option("--memory-budget", default=None,
                     help="Memory for routed experts alone: bytes (300MB, 2GiB) or a share of all experts (25%). "
                       "Default: every expert resident."),
        click.option("--context", default=None, type=click.IntRange(min=1),
                     help="Tokens a sequence may hold, which --memory-limit plans the KV cache for (default: "
                          "fate-run: the prompt and --max-new-tokens; fate-serve: the model's, at most 4096)."),
        click.option("--prefetch", type=click.Choice(PREFETCH_MODES), default="policy", show_default=True,
                     help="policy: the predictor the compiler measured best per layer; cross-layer: the next layer's "
                       "router on this layer's router input; eap: activation-path statistics; none: load on demand."),
        click.option("--executor", type=click.Choice(EXECUTORS), default="auto", show_default=True,
                     help="native: the C kernel computes experts from the bytes in their slots; session: an "
                       "onnxruntime session per expert (the reference); auto: native where it is built."),
        click.option("--decode-steps", type=click.Choice(["on", "off"]), default="on", show_default=True,
                     help="on: layers the compiler described run every token in native code from their graph's "
                          "bytes (decode one call per token, prefill eight tokens per pass; their weights held once, "
                          "no onnxruntime session kept); off: the graphs run every token."),
        click.option("--cache", "cache_policy", type=click.Choice(sorted(POLICIES)), default=DEFAULT_POLICY,
                     show_default=True, help="Which resident expert gives up its slot (fate-replay compares them "
                                             "on a trace of your own runs)."),
        click.option("--pool", type=click.Choice(POOLS), default="global", show_default=True,
                     help="global: one pool of slots shared by every layer (a layer that needs more now takes "
                          "slots from one that needs fewer); per-layer: each layer keeps the slots the plan gives it."),
        click.option("--allocation", type=click.Choice(["policy", "uniform"]), default="policy", show_default=True,
                     help="Slots per layer: policy allocates them at this budget from the profile's miss "
                          "curves and prediction recall (the compiled shares where there is no profile); "
                          "uniform: equal."),
        click.option("--int2-prefill", type=click.Choice(LOW_BIT_PREFILL_MODES), default="off", show_default=True,
                     help="Lossy, off unless asked: move the least popular experts at INT2 during prefill where the "
                          "compiler stored INT2 copies (changes the output); auto: where they run natively."),
        click.option("--prefetch-threads", default=2, show_default=True, type=click.IntRange(1, MAX_PREFETCH_THREADS),
                     help=f"Threads that read experts from disk (at most {MAX_PREFETCH_THREADS}: more than a "
                          "disk's queue gains nothing)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_engine(artifact: str, precision: str | None, threads: int, no_verify: bool, verify_every_load: bool,
                memory_limit: str | None, memory_budget: str | None, context: int | None, prefetch: str,
                executor: str, decode_steps: str, cache_policy: str, pool: str, allocation: str, int2_prefill: str,
                prefetch_threads: int, default_context: int | None = None, reserved: int = 0) -> Engine:
    """An Engine as the engine_options flags say; `default_context`: the --context a command's own
    work needs where none is given; `reserved`: what the command holds beside the model, within
    --memory-limit."""
    if no_verify and verify_every_load:
        raise FateError("--no-verify and --verify-every-load contradict each other")
    limit = None
    if memory_limit is not None:
        if memory_budget is not None:
            raise FateError("give --memory-limit (the whole process) or --memory-budget (the experts alone), not both")
        limit = parse_budget(memory_limit).bytes
        if limit is None:
            raise FateError(f"--memory-limit takes bytes (8GB, 512MiB), not a share: {memory_limit!r}")
    cores = usable_cores()
    if threads > cores:  # the sessions and the kernel take at most these (sessions.graph_threads, ExpertRunner)
        click.echo(f"fate: --threads {threads} is more than the {cores} cores this process may use; using {cores}",
                   err=True)
    offload = None if memory_budget is None and limit is None else OffloadOptions(
        budget=parse_budget(memory_budget or "0B"), prefetch=prefetch, cache=cache_policy, pool=pool, allocation=allocation,
        low_bit_prefill=int2_prefill, threads=prefetch_threads)
    return Engine.load(artifact, EngineOptions(
        precision=precision, threads=threads, verify=not no_verify, verify_every_load=verify_every_load,
        executor=executor, decode_steps=decode_steps == "on", memory_limit=limit, context=context or default_context,
        reserved=reserved, offload=offload))


def report(engine: Engine, result: GenerationResult, text: str) -> dict:
    offload = engine.model.experts.report()
    return {
        "prompt_ids": result.prompt_ids,
        "token_ids": result.token_ids,
        "text": text,
        "stats": result.stats.to_dict(),
        "experts": asdict(engine.model.experts.stats),
        "offload": offload.to_json(),
        "peak_rss_bytes": peak_rss(),
        "memory": memory_report(engine, result),
        "lossy": lossy_modes(engine, offload),
    }


def lossy_modes(engine: Engine, offload: ResidentReport | OffloadReport) -> list[dict]:
    """The lossy modes this run had on and how much of it they touched (none by default); `offload`: the
    store's report."""
    options = getattr(engine.model.experts, "options", None)
    if options is None or options.low_bit_prefill == "off" or not isinstance(offload, OffloadReport):
        return []
    prefill = offload.prefill
    policy = engine.model.manifest.policy
    return [{"mode": "int2-prefill", "setting": options.low_bit_prefill, "int2_loads": prefill.int2_loads,
             "prefill_loads": prefill.experts_loaded,
             "measured_perplexity_ratio": policy.int2_prefill_perplexity_ratio if policy else None}]


def memory_report(engine: Engine, result: GenerationResult) -> dict:
    """What the process holds: measured (resident now, at its peak, the expert pool, the KV cache)
    and, under --memory-limit, the plan each was given."""
    model = engine.model
    pool = getattr(model.experts, "pool", None)
    measured = {"rss_bytes": current_rss(), "peak_rss_bytes": peak_rss(),
                "expert_pool_bytes": pool.total_bytes if pool is not None else 0,
                "kv_cache_bytes": result.stats.cache_bytes, "dense_graph_file_bytes": model.dense_bytes,
                "decode_step_bytes": model.step_bytes}
    plan = model.memory_plan
    return {"measured": measured, "plan": None if plan is None else {**asdict(plan), "floor": plan.floor,
                                                                      "pool": plan.pool}}


def summary(engine: Engine, result: GenerationResult) -> str:
    s = result.stats
    line = (f"[{s.prompt_tokens} prompt tokens at {s.prefill_tokens_per_s:.1f} tok/s, "
            f"{s.generated_tokens} generated at {s.decode_tokens_per_s:.1f} tok/s, stop: {s.stop_reason}")
    offload = engine.model.experts.report()
    if isinstance(offload, OffloadReport):
        hit = "-" if offload.decode.hit_rate is None else f"{offload.decode.hit_rate:.1%}"
        line += (f"; budget {offload.budget_bytes / 1e6:.1f} of {offload.total_expert_bytes / 1e6:.1f} MB, "
                 f"decode hit rate {hit}, stalled {offload.stall_s:.2f} s, {offload.bytes_read / 1e6:.1f} MB read")
        if offload.decode.loop_us_per_load is not None:
            line += f", loop {offload.decode.loop_us_per_load:.0f} us a load"
        if offload.decode.wait_us_per_load is not None:
            line += f", {offload.decode.wait_us_per_load:.0f} us a wait"
    for mode in lossy_modes(engine, offload):
        cost = mode["measured_perplexity_ratio"]
        line += (f"; LOSSY {mode['mode']} {mode['setting']}: {mode['int2_loads']} of {mode['prefill_loads']} prefill "
                 "expert loads at INT2" + (f" (perplexity x{cost:.4f} measured at compile)" if cost else ""))
    plan = engine.model.memory_plan
    if plan is not None:
        line += (f"; memory limit {plan.limit / 1e6:.0f} MB: {plan.floor / 1e6:.0f} MB for the process, "
                 f"{plan.pool / 1e6:.0f} MB for experts")
    return line + f"; peak RSS {peak_rss() / 1e6:.0f} MB]"


# The engine_options flags in two groups, for every command that takes them.
MEMORY_FLAGS = ["memory_limit", "memory_budget", "context", "prefetch", "cache_policy", "pool"]
ADVANCED_FLAGS = ["precision", "threads", "executor", "decode_steps", "allocation", "int2_prefill", "prefetch_threads",
                  "no_verify", "verify_every_load"]


@command("fate-run", sections=(
    ("Prompt and output", ["prompt", "prompt_file", "max_new_tokens", "chat", "chat_template", "as_json"]),
    ("Sampling (default: the model's generation settings)",
     ["greedy", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
      "repetition_penalty"]),
    ("Memory", MEMORY_FLAGS),
    ("Advanced", ADVANCED_FLAGS + ["ignore_eos", "trace_path"]),
), examples=(
    ("fate-run qwen3-30b.fate --memory-limit 8GB", "chat in the terminal within 8 GB for the whole process"),
    ('fate-run qwen3-30b.fate -p "Once upon a time" -n 200 --memory-budget 25%',
     "continue a prompt, a quarter of the experts in memory"),
    ('cat question.txt | fate-run qwen3-30b.fate -p - --chat --greedy --json', "one chat turn from standard input, "
                                                                                "as JSON"),
))
@click.argument("artifact")
@click.option("-p", "--prompt", default=None, help="Prompt text; - reads it from standard input. Without a prompt: "
                                                  "a chat in the terminal.")
@click.option("--prompt-file", default=None, type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="Read the prompt from FILE (UTF-8).")
@click.option("-n", "--max-new-tokens", default=None, type=click.IntRange(min=0),
              help="Tokens to generate at most  [default: 64; 512 per reply in a chat]")
@click.option("--greedy", is_flag=True, help="Always take the most likely token.")
@click.option("--temperature", type=float, default=None, help="Divides the scores before sampling (higher: more varied).")
@click.option("--top-p", type=float, default=None, help="Sample from the likeliest tokens whose probabilities sum to this.")
@click.option("--top-k", type=int, default=None, help="Sample from this many likeliest tokens (0: all).")
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output).")
@click.option("--min-p", type=float, default=None, help="Drop tokens less likely than this share of the likeliest one.")
@click.option("--presence-penalty", type=float, default=0.0, show_default=True,
              help="Subtracted from every token already generated (-2 to 2, as OpenAI's).")
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True,
              help="Subtracted per time a token was generated (-2 to 2, as OpenAI's).")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
              help="Divides the scores of tokens in the prompt or output (transformers'; 1 is none).")
@click.option("--chat", is_flag=True, help="Apply the model's chat template to the prompt.")
@click.option("--chat-template", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="A Jinja chat template to use in place of the artifact's (implies --chat).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (ids, text, timings, stats).")
@engine_options
@click.option("--ignore-eos", is_flag=True, help="Generate all --max-new-tokens (for measurements).")
@click.option("--trace", "trace_path", default=None, type=click.Path(dir_okay=False),
              help="Write the routing of this run to FILE, one JSON line per (phase, token, layer), for fate-replay.")
def main(artifact: str, prompt: str | None, prompt_file: str | None, max_new_tokens: int | None, greedy: bool,
         temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None, min_p: float | None,
         presence_penalty: float, frequency_penalty: float, repetition_penalty: float, chat: bool,
         chat_template: str | None, as_json: bool, ignore_eos: bool, trace_path: str | None, **engine_flags) -> None:
    """Generate text from a Fate ARTIFACT, streaming tokens as they come; with no prompt, chat with it
    in the terminal."""
    try:
        prompt = read_prompt(prompt, prompt_file)
        interactive = prompt is None
        if interactive and as_json:
            raise FateError("--json needs a prompt (--prompt, --prompt-file or --prompt -)")
        if max_new_tokens is None:
            max_new_tokens = CHAT_REPLY_TOKENS if interactive else 64
        # a prompt of N bytes is at most N tokens; 256 more for a chat template's own
        engine = load_engine(artifact, **engine_flags, default_context=None if interactive else
                             len(prompt.encode("utf-8")) + max_new_tokens + 256)
        sampling = sampling_from_flags(engine, greedy, temperature, top_p, top_k, seed, min_p, presence_penalty,
                                       frequency_penalty, repetition_penalty)
        if chat_template is not None:
            engine.codec.use_template(chat_template)
            chat = True
        if trace_path is not None:
            engine.model.start_trace(trace_path)
        if ignore_eos:
            engine.codec.eos_ids = set()
        if interactive:
            from .chat import run_chat

            run_chat(engine, sampling, max_new_tokens, summary, engine.model.artifact.root.name)
            engine.close()
            return
        result = GenerationResult([])
        pieces: list[str] = []
        if not (as_json or chat):
            click.echo(prompt, nl=False)
        try:
            for piece in engine.stream(prompt, max_new_tokens, sampling, chat=chat, result=result):
                pieces.append(piece)
                if not as_json:
                    click.echo(piece, nl=False)
        except KeyboardInterrupt:
            result.stats.stop_reason = "interrupted"
        text = "".join(pieces)
        if as_json:
            click.echo(json.dumps(report(engine, result, text)))
        else:
            click.echo("")
            click.echo(summary(engine, result), err=True)
        engine.close()
        if result.stats.stop_reason == "interrupted":
            sys.exit(130)
    except USER_ERRORS as e:
        exit_with("fate-run", e)
    except KeyboardInterrupt:
        click.echo("fate-run: interrupted", err=True)
        sys.exit(130)


CHAT_REPLY_TOKENS = 512


def read_prompt(prompt: str | None, prompt_file: str | None) -> str | None:
    """The prompt from --prompt, --prompt - (standard input) or --prompt-file; None for a chat."""
    if prompt is not None and prompt_file is not None:
        raise FateError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise FateError(f"--prompt-file {prompt_file}: cannot read it as UTF-8 text "
                            f"({getattr(e, 'strerror', None) or e})") from None
    elif prompt == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as e:
            raise FateError(f"standard input is not UTF-8 text (byte {e.start})") from None
    else:
        return prompt
    if not text.strip():
        raise FateError(f"the prompt from {prompt_file or 'standard input'} is empty")
    return text


if __name__ == "__main__":
    main()
