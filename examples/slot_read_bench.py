"""How fast expert files read with O_DIRECT into three kinds of memory: Python's default anonymous map
(shared memory, 4 KB pages), private 4 KB pages, and the slot pool's private memory in transparent huge
pages (runtime/slots.private_memory).

    python examples/slot_read_bench.py ARTIFACT [--files 20] [--rounds 2]

Each row reads the same number of randomly chosen expert files of the artifact, one at a time, each
with one positioned read as the runtime does, and prints GB/s, microseconds per read and the process's
CPU time as a share of the wall time. Run it twice or more: storage below the page cache (a disk's or a
hypervisor's) can serve a repeat faster.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import time

import numpy as np
from fate.artifacts import Artifact
from fate.runtime.experts.pool import PAGE, aligned_span, private_memory, slot_size


def shared(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)


def read_all(area: mmap.mmap, members) -> tuple[float, float, float]:
    """(bytes per second, seconds per read, CPU share) reading every member into `area`."""
    view = memoryview(area)
    total, wall, cpu = 0, time.perf_counter(), time.process_time()
    for m in members:
        start, _, length = aligned_span(view, m.file, m.offset, m.size)
        fd = os.open(m.file, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            total += os.preadv(fd, [view[:length]], start)
        finally:
            os.close(fd)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del view
    return total / wall, wall / len(members), cpu / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    art = Artifact.open(args.artifact)
    members = [art.member(p) for layer in art.manifest.moe_layers for files in layer.experts.values() for p in files]
    size = slot_size(max(m.size + m.offset % PAGE for m in members))
    rng = random.Random(1)
    kinds = {"shared, 4 KB pages": shared, "private, 4 KB pages": lambda size: private_memory(size, huge=False),
             "private, huge pages": private_memory}
    print(f"{len(members)} expert files, largest {size / 1e6:.1f} MB with its page; {args.files} reads per row")
    for _ in range(args.rounds):
        for name, make in kinds.items():
            area = make(size)
            np.frombuffer(area, np.uint8)[::PAGE] = 0  # faulted in before the clock starts, as the pool is
            rate, per_read, cpu = read_all(area, rng.sample(members, min(args.files, len(members))))
            print(f"  {name:22s} {rate / 1e9:5.2f} GB/s  {per_read * 1e6:8.0f} us per read  CPU {cpu:4.0%} of wall")
            area.close()


if __name__ == "__main__":
    main()
