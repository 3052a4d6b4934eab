"""The same model and prompt through the tools a user would otherwise pick, side by side with Fate,
in one run: each configuration in its own process (so its peak memory is its own), interleaved,
after a warm-up round, medians over repeats.

    pip install -e ".[bench]"        # accelerate (transformers and torch come with [compile])
    python examples/peers.py MODEL_DIR ARTIFACT --budgets 25%,50% [--llama-python PY --gguf FILE ...]

- transformers: eager generation, all weights in RAM (the reference a user starts from);
- accelerate: the same with disk offload at the budget (device_map="auto", max_memory, offload_folder);
- llama.cpp (llama-cpp-python) on GGUF conversions (examples/convert_to_gguf.py), when --llama-python
  names an interpreter that has llama_cpp and --gguf the converted files; llama.cpp has no memory budget
  (it maps the file and the OS pages experts in and out), so it runs once, unbounded;
- Fate: all resident, and at each budget with cross-layer prefetch and on demand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def hf_run(model_dir: str, ids: list[int], gen_len: int, budget_bytes: int | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fate.runtime.memory import peak_rss

    kwargs = {"dtype": torch.float32}
    offload_dir = None
    if budget_bytes is not None:
        offload_dir = tempfile.mkdtemp(prefix="fate-peers-offload-")
        kwargs.update(device_map="auto", max_memory={"cpu": budget_bytes}, offload_folder=offload_dir)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    load_s = time.perf_counter() - start
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        t1 = time.perf_counter()
        for _ in range(gen_len - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        decode_s = time.perf_counter() - t1
    return {"load_s": load_s, "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": (gen_len - 1) / decode_s,
            "peak_rss_mb": peak_rss() / 1e6}


LLAMA_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
args = json.loads(sys.argv[1])
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
llm = Llama(model_path=args['gguf'], n_ctx=512, n_threads=2, verbose=False, use_mmap=args['mmap'])
ids = args['ids']
t0 = time.perf_counter(); llm.eval(ids); prefill = time.perf_counter() - t0
token = int(llm.scores[llm.n_tokens - 1].argmax())
t1 = time.perf_counter()
for _ in range(args['gen_len'] - 1):
    llm.eval([token]); token = int(llm.scores[llm.n_tokens - 1].argmax())
decode = time.perf_counter() - t1
print(json.dumps({'prefill_tok_s': len(ids) / prefill, 'decode_tok_s': (args['gen_len'] - 1) / decode,
                  'peak_rss_mb': hwm() / 1e6}))
"""


def run_config(config: dict) -> dict:
    kind = config["kind"]
    if kind == "llama.cpp":
        cmd = [config["llama_python"], "-c", LLAMA_WORKER, json.dumps(config)]
    elif kind == "fate":
        from fate.runtime.bench import RunConfig

        rc = RunConfig(config["artifact"], config["budget"], config["prefetch"], config["ids"], config["gen_len"])
        cmd = [sys.executable, "-m", "fate.runtime.bench", "--worker", json.dumps(rc.__dict__)]
    else:
        cmd = [sys.executable, __file__, "--worker", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--budgets", default="25%,50%")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-warmup", action="store_true", help="skip the uncounted first round (large models)")
    ap.add_argument("--llama-python", default=None)
    ap.add_argument("--gguf", action="append", default=[], help="GGUF file(s) for llama.cpp; repeat for several")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:  # a transformers / accelerate run in this process
        c = json.loads(args.worker)
        print(json.dumps(hf_run(c["model_dir"], c["ids"], c["gen_len"], c.get("budget_bytes"))))
        return

    from fate.artifacts import Artifact
    from fate.artifacts.budget import parse_budget
    from fate.runtime.bench import prompt_ids

    ids = prompt_ids(args.artifact, args.prompt_len, None)
    weights = sum(p.stat().st_size for p in Path(args.model_dir).glob("*.safetensors"))
    experts = sum(f.size for f in Artifact.open(args.artifact).manifest.files if f.path.startswith("experts/"))
    base = {"ids": ids, "gen_len": args.gen_len, "model_dir": args.model_dir, "artifact": args.artifact}
    configs = [{**base, "kind": "transformers", "label": "transformers (all in RAM)"}]
    for b in args.budgets.split(","):
        share = parse_budget(b).share_of(experts)
        # accelerate's budget covers all weights; give it the dense part plus the same share of experts
        configs.append({**base, "kind": "accelerate", "label": f"accelerate disk offload {b}",
                        "budget_bytes": int(weights * share)})
    for gguf in args.gguf if args.llama_python else []:
        configs.append({**base, "kind": "llama.cpp", "label": f"llama.cpp {Path(gguf).stem}",
                        "llama_python": args.llama_python, "gguf": gguf, "mmap": True})
    configs.append({**base, "kind": "fate", "label": "fate all-resident", "budget": "all-resident", "prefetch": "none"})
    for b in args.budgets.split(","):
        for p in ("none", "cross-layer"):
            configs.append({**base, "kind": "fate", "label": f"fate {b} {p}", "budget": b, "prefetch": p})
    rows: dict[str, list[dict]] = {c["label"]: [] for c in configs}
    for round_ in range(1 if args.no_warmup else 0, args.repeat + 1):
        for c in configs:
            print(f"[round {round_}] {c['label']}", file=sys.stderr, flush=True)
            result = run_config(c)
            if round_:
                rows[c["label"]].append(result)
    print(f"{'engine':32s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak RSS MB':>12s}")
    summary = {}
    for label, results in rows.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            print(f"{label:32s} failed: {results[0]['error'] if results else '-'}")
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")}
        summary[label] = med
        print(f"{label:32s} {med['prefill_tok_s']:14.1f} {med['decode_tok_s']:13.1f} {med['peak_rss_mb']:12.0f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
