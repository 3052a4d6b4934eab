"""How fast expert files read with O_DIRECT into three kinds of memory: Python's default anonymous map
(shared memory, 4 KB pages), private 4 KB pages, and the slot pool's private memory in transparent huge
pages (runtime/slots.private_memory).

    python examples/slot_read_bench.py ARTIFACT [--files 20] [--rounds 2] [--handoff]

Each row reads the same number of randomly chosen expert files of the artifact, one at a time, each
with one positioned read as the runtime does, and prints GB/s, microseconds per read and the process's
CPU time as a share of the wall time. Run it twice or more: storage below the page cache (a disk's or a
hypervisor's) can serve a repeat faster.

--handoff compares, into the slot pool's memory, a read made by the thread that waits for it with one handed
to the native I/O threads and waited for, one at a time and two at a time (what decides
runtime.experts.pool.INLINE_READ_BYTES).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import time

import numpy as np
from fate.artifacts import Artifact
from fate.runtime.experts.pool import KERNEL, PAGE, SlotPool, aligned_span, native_reads, private_memory, read_aligned, slot_size


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


def handoff(members, files: int, rng: random.Random) -> None:
    """Microseconds per read: inline (read_aligned in this thread) against handed to the I/O threads."""
    if not native_reads():
        print("  the native I/O threads are not built here")
        return
    pool = SlotPool({0: 2}, {0: max(m.size + m.offset % PAGE for m in members)})
    pool.populate()
    buffers = [pool.buffer(0, 0), pool.buffer(0, 1)]

    def handed(m, buffer):
        start, _, length = aligned_span(buffer, m.file, m.offset, m.size)
        return KERNEL.Read(os.fspath(m.file), start, length, buffer, pool.direct, True)

    def one_inline(pair):
        read_aligned(buffers[0], pair[0].file, pair[0].offset, pair[0].size, pool)

    def one_handed(pair):
        handed(pair[0], buffers[0]).wait()

    def two_inline(pair):
        for m, buffer in zip(pair, buffers):
            read_aligned(buffer, m.file, m.offset, m.size, pool)

    def two_handed(pair):
        reads = [handed(m, buffer) for m, buffer in zip(pair, buffers)]
        for r in reads:
            r.wait()

    pairs = [rng.sample(members, 2) for _ in range(files)]
    for name, run in (("one read, inline", one_inline), ("one read, handed over", one_handed),
                      ("two reads, inline one after the other", two_inline), ("two reads, handed over together", two_handed)):
        wall = time.perf_counter()
        for pair in pairs:
            run(pair)
        print(f"  {name:38s} {(time.perf_counter() - wall) / len(pairs) * 1e6:8.0f} us")
    pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--handoff", action="store_true", help="inline reads against reads handed to I/O threads")
    args = parser.parse_args()
    art = Artifact.open(args.artifact)
    members = [art.member(p) for layer in art.manifest.moe_layers for files in layer.experts.values() for p in files]
    size = slot_size(max(m.size + m.offset % PAGE for m in members))
    rng = random.Random(1)
    kinds = {"shared, 4 KB pages": shared, "private, 4 KB pages": lambda size: private_memory(size, huge=False),
             "private, huge pages": private_memory}
    print(f"{len(members)} expert files, largest {size / 1e6:.1f} MB with its page; {args.files} reads per row")
    if args.handoff:
        for _ in range(args.rounds):
            handoff(members, args.files, rng)
        return
    for _ in range(args.rounds):
        for name, make in kinds.items():
            area = make(size)
            np.frombuffer(area, np.uint8)[::PAGE] = 0  # faulted in before the clock starts, as the pool is
            rate, per_read, cpu = read_all(area, rng.sample(members, min(args.files, len(members))))
            print(f"  {name:22s} {rate / 1e9:5.2f} GB/s  {per_read * 1e6:8.0f} us per read  CPU {cpu:4.0%} of wall")
            area.close()


if __name__ == "__main__":
    main()
