"""Where an offloaded decode token's time goes, beside the disk's: the generation loop's own timeline (its
layers, the expert store's hand-offs, its waits for reads) against the disk's read requests as the kernel
timed them (perf's block:block_rq_issue and block:block_rq_complete tracepoints). Prints a token's time,
how busy the disk was, how long it sat idle while the loop did what, and the loop's waits for reads by
layer and kind (a miss nothing predicted, a prefetch not yet in). BENCHMARKS.md 6e.

Needs root and `perf` (the tracepoints). It wraps the loop's internals in timers, so it lives here; the
timers cost the loop a few microseconds a call, so its tokens are a little slower than fate-bench's.

    python examples/decode_timeline.py ARTIFACT [--budget 50%] [--precision int4] [--tokens 100] [--device vda]
"""

from __future__ import annotations

import argparse
import bisect
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from fate.artifacts.budget import parse_budget
from fate.runtime.experts import residency
from fate.runtime.experts.offload import OffloadOptions
from fate.runtime.experts.store import EMBEDDING
from fate.runtime.model import FateModel
from fate.runtime.options import EngineOptions

clock = time.monotonic_ns  # CLOCK_MONOTONIC: perf record -k CLOCK_MONOTONIC stamps the disk's requests with it


@dataclass(frozen=True)
class Span:
    label: str
    start: int
    end: int


@dataclass(frozen=True)
class Wait:
    layer: int
    prefetched: bool
    start: int
    end: int


class Timeline:
    """The loop's spans (a layer's computing, a hand-off to the store, the embedding, the head) and its waits
    for loads not yet in, recorded by wrapping the model's and the cache's methods."""

    def __init__(self, model: FateModel):
        self.spans: list[Span] = []
        self.waits: list[Wait] = []
        for index, step in model.steps.items():
            for name in ("route", "finish", "run"):
                self._wrap(step, name, lambda args, i=index: f"layer {i}")
        self._wrap(model, "run_layer", lambda args: f"layer {args[0].index}")
        self._wrap(model.experts, "after_layer", lambda args: "embedding's hand-off" if args[0] == EMBEDDING else f"hand-off {args[0]}")
        self._wrap(model.embed, "run", lambda args: "embedding")
        self._wrap(model, "head_logits", lambda args: "head")
        result, waits = residency._Loading.result, self.waits

        def timed_result(loading):
            if loading.done():
                return result(loading)
            start = clock()
            try:
                return result(loading)
            finally:
                waits.append(Wait(loading._key[0], loading._prefetched, start, clock()))
        residency._Loading.result = timed_result

    def _wrap(self, owner, name: str, label) -> None:
        inner, spans = getattr(owner, name), self.spans

        def timed(*args, **kwargs):
            start = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                spans.append(Span(label(args), start, clock()))
        setattr(owner, name, timed)

    def clear(self) -> None:
        self.spans.clear()
        self.waits.clear()

    def doing(self, at: int) -> str:
        """What the loop was doing at `at`: the innermost span under way (the latest begun), a wait within it."""
        best = None
        for span in self._sorted[max(0, bisect.bisect_right(self._starts, at) - 64):bisect.bisect_right(self._starts, at)]:
            if span.start <= at <= span.end and (best is None or span.start >= best.start):
                best = span
        return best.label if best is not None else "between calls"

    def index(self) -> None:
        self._sorted = sorted(self.spans + [Span(f"waiting ({'prefetch' if w.prefetched else 'miss'}, layer {w.layer})",
                                                 w.start, w.end) for w in self.waits], key=lambda s: s.start)
        self._starts = [s.start for s in self._sorted]


def disk_reads(perf_script: str, device: str) -> list[tuple[int, int, int]]:
    """(issued, completed, bytes) of every read request of `device` ("major,minor") in perf script's output."""
    issued, done = {}, []
    line = re.compile(r"\s*([\d.]+):\s+block:block_rq_(issue|complete): (\d+,\d+) (\S+) (?:\d+ )?\(\) (\d+) \+ (\d+)")
    for text in perf_script.splitlines():
        m = line.match(text)
        if not m or m.group(3) != device or "R" not in m.group(4):
            continue
        at, sector, sectors = int(round(float(m.group(1)) * 1e9)), int(m.group(5)), int(m.group(6))
        if m.group(2) == "issue":
            issued[sector] = (at, sectors)
        elif sector in issued:
            start, sectors = issued.pop(sector)
            done.append((start, at, sectors * 512))
    return sorted(done)


def busy_intervals(reads: list[tuple[int, int, int]], start: int, end: int) -> list[list[int]]:
    busy: list[list[int]] = []
    for s, e, _ in reads:
        s, e = max(s, start), min(e, end)
        if s >= e:
            continue
        if busy and s <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], e)
        else:
            busy.append([s, e])
    return busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--device", default="vda", help="the block device the artifact is on (/sys/block/NAME)")
    args = parser.parse_args()
    try:
        device = open(f"/sys/block/{args.device}/dev").read().strip().replace(":", ",")
    except OSError:
        parser.error(f"no block device {args.device!r} (/sys/block)")

    model = FateModel.load(args.artifact, EngineOptions(precision=args.precision,
                                                        offload=OffloadOptions(parse_budget(args.budget))))
    timeline = Timeline(model)
    cache = model.new_cache()
    token = int(model.head_logits(model.forward(np.random.default_rng(0).integers(0, model.spec.vocab_size, 32), cache))[-1].argmax())
    for _ in range(48):  # warm: the cache filled, the gate's costs measured
        token = int(model.head_logits(model.forward(np.asarray([token]), cache))[-1].argmax())

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        perf = subprocess.Popen(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-a", "-o", data, "-e",
                                 "block:block_rq_issue", "-e", "block:block_rq_complete"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not os.path.exists(data) and perf.poll() is None:  # recording once its file is there
            time.sleep(0.01)
        if perf.poll() is not None:
            sys.exit(f"decode_timeline: perf record failed: {perf.stderr.read().strip()}")
        time.sleep(0.5)  # its per-CPU buffers set up after the file
        timeline.clear()
        first = clock()
        for _ in range(args.tokens):
            token = int(model.head_logits(model.forward(np.asarray([token]), cache))[-1].argmax())
        last = clock()
        perf.send_signal(signal.SIGINT)
        perf.wait()
        script = subprocess.run(["perf", "script", "-i", data, "-F", "time,event,trace"], capture_output=True, text=True).stdout
    model.close()

    n, total = args.tokens, last - first
    reads = disk_reads(script, device)
    busy = busy_intervals(reads, first, last)
    busy_ns = sum(e - s for s, e in busy)
    read_bytes = sum(b for s, _, b in reads if first <= s <= last)
    print(f"decode at {args.budget}: {n} tokens, {total / n / 1e6:.2f} ms a token; the disk busy {busy_ns / total:.2f} of it, "
          f"{read_bytes / n / 1e6:.1f} MB a token, {read_bytes / max(busy_ns, 1):.2f} GB/s while busy")

    timeline.index()
    idle, at = defaultdict(int), first
    for s, e in busy + [[last, last]]:
        for t in range(at, s, 50_000):  # what the loop was doing, every 50 us of the disk's idle time
            idle[timeline.doing(t)] += min(50_000, s - t)
        at = max(at, e)
    print("the disk idle a token, by what the loop was doing (us):")
    for label, ns in sorted(idle.items(), key=lambda kv: -kv[1]):
        if ns / n >= 20_000:
            print(f"  {label:34s} {ns / n / 1e3:7.0f}")
    by = defaultdict(lambda: [0, 0])
    for w in timeline.waits:
        if w.start >= first:
            by[w.layer, w.prefetched][0] += 1
            by[w.layer, w.prefetched][1] += w.end - w.start
    misses, late = (sum(v[1] for (_, p), v in by.items() if p == kind) / n / 1e6 for kind in (False, True))
    print(f"the loop's waits for loads a token: {misses:.2f} ms for misses nothing predicted, {late:.2f} ms for prefetches not yet in")
    for (layer, prefetched), (count, ns) in sorted(by.items()):
        print(f"  layer {layer:3d} {'prefetch' if prefetched else 'miss':8s} {count / n:5.2f} waits a token, {ns / n / 1e3:6.0f} us")


if __name__ == "__main__":
    main()
