"""One expert, side by side: the native kernel over the file's bytes against the expert's
onnxruntime session, and what a load costs each way (a read into a slot against a read plus
session creation). Random weights at the shapes given (default: Qwen1.5-MoE-A2.7B's experts).

    python examples/kernel_bench.py [--hidden 2048 --intermediate 1408 --bits 4 --block 128]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import numpy as np
from fate.artifacts import ExpertLayout
from fate.artifacts.layout import GraphIO
from fate.artifacts.slots import layout_of
from fate.compiler import graphs
from fate.compiler.quantize import quantize
from fate.runtime import native
from fate.runtime.experts.pool import SlotPool
from fate.runtime.sessions import make_expert_session


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--copies", type=int, default=64, help="experts cycled through for the from-memory row")
    args = parser.parse_args()
    h, i = args.hidden, args.intermediate
    rng = np.random.default_rng(0)
    q = [quantize(rng.standard_normal(s).astype(np.float32) * 0.02, args.bits, args.block) for s in ((i, h), (i, h), (h, i))]
    data = graphs.expert_graph(*q, accuracy_level=4).SerializeToString()
    layout = layout_of(data, ExpertLayout(h, i, args.bits, args.block, 4, "swiglu", False, []))
    vector = native.layout_vector(layout)
    session = make_expert_session(data)
    print(f"expert {h}x{i} int{args.bits} block {args.block}: {len(data) / 1e6:.2f} MB, kernel {native.kernel_name()}")
    for tokens in (1, 8, 64):
        x = rng.standard_normal((tokens, h)).astype(np.float32)
        y = np.empty_like(x)
        idx = np.arange(tokens, dtype=np.int32)
        starts = np.array([0, tokens], np.int32)
        for threads in (1, 2):
            t_native = timed(lambda: native.run_experts(layout, vector, [data], x, starts, idx, idx, y, threads),
                             args.repeat)
            print(f"  {tokens:3d} tokens, {threads} thread(s): native {t_native * 1e3:7.3f} ms", end="")
            if threads == 1:
                t_session = timed(lambda: session.run([GraphIO.EXPERT_OUT], {GraphIO.EXPERT_IN: x}), args.repeat)
                print(f"   session (1 thread) {t_session * 1e3:7.3f} ms   native/session speed "
                      f"{t_session / t_native:.2f}x", end="")
            print()
    # From memory, as in a real run: a different expert each call, so its bytes are not in the CPU's
    # caches (the same expert again and again, above, measures cache-resident compute only).
    copies = [bytearray(data) for _ in range(args.copies)]
    sessions = [make_expert_session(data) for _ in range(args.copies)]
    x = rng.standard_normal((1, h)).astype(np.float32)
    y = np.empty_like(x)
    one, starts = np.zeros(1, np.int32), np.array([0, 1], np.int32)
    turn = iter(range(1 << 62))
    t_native = timed(lambda: native.run_experts(layout, vector, [copies[next(turn) % args.copies]], x, starts, one,
                                                one, y, 1), args.repeat)
    t_session = timed(lambda: sessions[next(turn) % args.copies].run([GraphIO.EXPERT_OUT], {GraphIO.EXPERT_IN: x}),
                      args.repeat)
    print(f"    1 token, from memory ({args.copies} copies, 1 thread): native {t_native * 1e3:7.3f} ms   session "
          f"{t_session * 1e3:7.3f} ms   native/session speed {t_session / t_native:.2f}x")
    del sessions, copies
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "expert.onnx")
        with open(path, "wb") as f:
            f.write(data)
        pool = SlotPool({0: 1}, {0: len(data)})
        walls, cpus = [], []
        for _ in range(args.repeat):
            wall, cpu = time.perf_counter(), cpu_seconds()
            pool.read_into(0, 0, path, 0, len(data))
            walls.append(time.perf_counter() - wall)
            cpus.append(cpu_seconds() - cpu)
        created = timed(lambda: make_expert_session(open(path, "rb").read()), min(args.repeat, 10))
        print(f"  load into a slot: {statistics.median(walls) * 1e3:.2f} ms wall, CPU {sum(cpus) / sum(walls):.0%} "
              f"of it ({pool.mode}); a session load (read + creation): {created * 1e3:.2f} ms")
        pool.close()


if __name__ == "__main__":
    main()
