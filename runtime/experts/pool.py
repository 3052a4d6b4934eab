"""The slot pool: the memory that resident experts live in, allocated once at start.

Each MoE layer is given a number of slots (the run plan's), each large enough for the layer's
largest expert file, so the budget is exactly slots x slot size. Layers may share their slots in
one group (the global pool: layers whose slots are the same size, see runtime.experts.offload). A load is one positioned read of
an expert's file into a free slot and nothing else: the native executor computes the expert from
those bytes in place (fate.artifacts.slots says where its tensors lie).

Reads bypass the page cache where the file system allows O_DIRECT (the slot is page-aligned and
the read is widened to whole pages); elsewhere they are ordinary reads followed by
posix_fadvise(DONTNEED), so that reading experts never grows the OS cache beside the budget.
Where the extension is built, reads run on its native I/O threads (runtime/native/reads.c) and are
waited for without the GIL; elsewhere os.preadv, which releases it too.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np
from fate.artifacts import ArtifactError

from ..native import KERNEL

PAGE = 4096


def slot_size(file_bytes: int) -> int:
    """A slot holds the file plus the page its first byte may be offset into (archive members
    start on 512-byte boundaries), in whole pages."""
    return -(-(file_bytes + PAGE) // PAGE) * PAGE


class SlotPool:
    def __init__(self, slots: dict[int, int], file_bytes: dict[int, int], reused: bool = True,
                 groups: dict[int, object] | None = None):
        """slots: layer -> number of slots; file_bytes: layer -> the largest expert file it holds;
        reused: slots are read into again and again (a budget), so huge pages pay for their cost at
        start; a pool filled once (every expert resident) keeps ordinary pages; groups: layer -> the
        slot group it shares (default: its own), one area whose slots are the sum of its layers' and
        are numbered within the group (the expert cache's eviction groups)."""
        self.group_of = {layer: layer for layer in slots} if groups is None else {l: groups[l] for l in slots}
        self.slots: dict[object, int] = {}  # group -> slots
        self.slot_bytes: dict[object, int] = {}  # group -> bytes of one slot
        for layer, n in slots.items():
            group = self.group_of[layer]
            self.slots[group] = self.slots.get(group, 0) + n
            self.slot_bytes[group] = max(self.slot_bytes.get(group, 0), slot_size(file_bytes[layer]))
        self._maps = {group: private_memory(max(1, n) * self.slot_bytes[group], huge=reused, touch=False)
                      for group, n in self.slots.items()}
        self._huge = reused
        self._bases = {group: address(area) for group, area in self._maps.items()}
        self._direct_ok = hasattr(os, "O_DIRECT")

    def populate(self) -> None:
        """Touch every page now (huge pages cost at their first touch: once, here, not in the middle of
        a prefill). Until then the slots cost address space, not memory: the model loads its dense
        graphs first, so that their load's transient never stacks on the pool."""
        if self._huge:
            for area in self._maps.values():
                touch_pages(area)

    @property
    def direct(self) -> bool:
        """Whether reads still try O_DIRECT (until the file system refuses it once)."""
        return self._direct_ok

    @property
    def mode(self) -> str:
        return "O_DIRECT" if self._direct_ok else "buffered + fadvise(DONTNEED)"

    @property
    def total_bytes(self) -> int:
        return sum(n * self.slot_bytes[group] for group, n in self.slots.items())

    def buffer(self, layer: int, slot: int) -> memoryview:
        group = self.group_of[layer]
        size = self.slot_bytes[group]
        return memoryview(self._maps[group])[slot * size:(slot + 1) * size]

    def layer_buffer(self, layer: int) -> memoryview:
        """Every slot `layer` may use (its group's), one buffer: what a native decode step reads experts from."""
        return memoryview(self._maps[self.group_of[layer]])

    def offset_of(self, layer: int, data: memoryview) -> int:
        """Where `data` (bytes read into a slot of `layer`: writable) begins in `layer_buffer(layer)`."""
        group = self.group_of[layer]
        at = address(data) - self._bases[group]
        if not 0 <= at <= len(self._maps[group]) - len(data):
            raise ValueError(f"these bytes are not in a slot of layer {layer}")
        return at

    def read_into(self, layer: int, slot: int, path: str | os.PathLike, offset: int, size: int) -> memoryview:
        """Read `size` bytes of `path` at `offset` into a slot; the view of exactly those bytes."""
        if not 0 <= slot < self.slots[self.group_of[layer]]:
            raise IndexError(f"layer {layer} has no slot {slot}")
        buffer = self.buffer(layer, slot)
        return read_aligned(buffer, path, offset, size, self)

    def direct_failed(self) -> None:
        """The file system refused O_DIRECT: every later read is buffered and dropped after."""
        self._direct_ok = False

    def release(self, layer: int, slot: int) -> None:
        """Give a slot's pages back to the system (the session executor keeps its own copy)."""
        group = self.group_of[layer]
        size = self.slot_bytes[group]
        if hasattr(mmap, "MADV_DONTNEED"):
            self._maps[group].madvise(mmap.MADV_DONTNEED, slot * size, size)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still held somewhere; the map goes with it
                pass


def address(buffer) -> int:
    """The address of a writable buffer's first byte (the ctypes view is let go at once)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def private_memory(size: int, huge: bool = True, touch: bool = True) -> mmap.mmap:
    """Anonymous private memory; with `huge`, in transparent huge pages where the system gives them
    on request, every page touched now. An O_DIRECT read into huge pages goes to the device as
    fewer, larger requests: 9 MB expert files read at 1.4-2.2 GB/s into them against 0.8-1.0 GB/s
    into 4 KB pages on this project's virtual disk (examples/slot_read_bench.py). Python's default
    anonymous map is shared memory, which gets no huge pages. Huge pages cost at their first touch
    (on that disk's VM, 3.2 s for 2.2 GB against 1.1 s for 4 KB pages): touched here, once, not in
    the middle of a prefill; worth it where slots are read into again and again."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    area = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # not offered here: ordinary pages
            pass
        if touch:
            touch_pages(area)
    return area


def touch_pages(area: mmap.mmap) -> None:
    np.frombuffer(area, np.uint8)[::PAGE] = 0


def scratch_buffer(file_bytes: int) -> memoryview:
    """A page-aligned buffer outside the pool, for a copy used once (an INT2 prefill transfer)."""
    return memoryview(private_memory(slot_size(file_bytes)))


# A read asked to be made inline (the last decode miss of a layer's batch) and of at most this many bytes is
# made by the thread that waits for it, when it waits, not handed to an I/O thread: a 32 KB expert read with
# O_DIRECT takes 58-60 us inline against 67-80 us handed over and waited for (the hand-off wakes two threads)
# (`python examples/slot_read_bench.py ART --handoff`); tiny-moe decodes 1.04-1.08x faster at 15-25%. A large
# read, and prefill's (many misses a layer, each batch computed as it arrives), are handed over, so that they
# overlap the experts that run meanwhile: inline, tiny-moe's prefill ran at 0.76-0.78x.
INLINE_READ_BYTES = 256 << 10


class SlotRead:
    """A read into a slot that may still be under way: `done()` never blocks; `wait()` gives the
    view of exactly the file's bytes. Native reads (runtime/native/reads.c) run on I/O threads and
    are waited for without Python's lock; a small one asked inline is made by `wait()` itself (INLINE_READ_BYTES);
    without the extension the read is done when it is started."""

    def __init__(self, buffer: memoryview, path, offset: int, size: int, pool: SlotPool | None,
                 urgent: bool = False, inline: bool = False):
        """`pool`: the slots' pool, whose O_DIRECT state the read follows (None: a buffered read);
        `urgent`: a read the generation loop is stalled on, queued before the others; `inline`: made by
        `wait()` itself where it is small (INLINE_READ_BYTES)."""
        self._args = (buffer, path, size, pool)
        self._view: memoryview | None = None
        self._native = None
        # (offset,) of a read `wait()` makes itself; False once given up
        self._inline: tuple[int] | bool | None = (offset,) if inline and size <= INLINE_READ_BYTES else None
        start, self._shift, length = aligned_span(buffer, path, offset, size)
        if self._inline is not None:
            return
        if native_reads():
            direct = pool is not None and pool.direct
            self._native = KERNEL.Read(os.fspath(path), start, length, buffer, direct, urgent)
        else:
            self._view = read_aligned(buffer, path, offset, size, pool)

    def done(self) -> bool:
        return self._view is not None or self._inline is False or (self._native is not None and self._native.done())

    def cancel(self) -> bool:
        """Take the read back if no I/O thread has begun it (the buffer is then free again)."""
        if self._view is None and isinstance(self._inline, tuple):
            self._inline = False  # given up: never made
            return True
        return self._view is None and self._native is not None and self._native.cancel()

    def wait(self) -> memoryview:
        if self._inline is False:
            raise OSError(errno.ECANCELED, "the read was given up", os.fspath(self._args[1]))
        if self._view is None and isinstance(self._inline, tuple):
            buffer, path, size, pool = self._args
            self._view = read_aligned(buffer, path, self._inline[0], size, pool)
        if self._view is None:
            buffer, path, size, pool = self._args
            try:
                got, direct_failed = self._native.wait()
            except OSError as e:  # as a read here would say it: naming the file
                raise OSError(e.errno, e.strerror, os.fspath(path)) from None
            if direct_failed and pool is not None:
                pool.direct_failed()
            if got < self._shift + size:
                raise shorter_than_listed(path)
            self._view = buffer[self._shift:self._shift + size]
        return self._view


def native_reads() -> bool:
    """Whether reads run on the extension's I/O threads (built with it)."""
    return KERNEL is not None and hasattr(KERNEL, "Read")


def aligned_span(buffer: memoryview, path, offset: int, size: int) -> tuple[int, int, int]:
    """(start, shift, length) of a read of [offset, offset + size) into a page-aligned buffer: from
    the page `start` holding its first byte, which lands at `shift`, for `length` bytes in whole
    pages (what O_DIRECT needs; never past the buffer). Refused where the bytes do not fit."""
    start = offset - offset % PAGE
    shift = offset - start
    if shift + size > len(buffer):
        raise ArtifactError(f"{path}: {size} bytes do not fit a slot of {len(buffer)}")
    return start, shift, min(len(buffer), -(-(shift + size) // PAGE) * PAGE)


def shorter_than_listed(path) -> ArtifactError:
    return ArtifactError(f"{path} is shorter than the manifest says (changed while running?)")


def read_aligned(buffer: memoryview, path, offset: int, size: int, pool: SlotPool | None) -> memoryview:
    """One positioned read of [offset, offset + size) into a page-aligned buffer, bypassing the page
    cache (O_DIRECT when `pool` still allows it, else a read dropped from the cache)."""
    start, shift, length = aligned_span(buffer, path, offset, size)
    if pool is not None and pool.direct:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            refused_direct(e, pool)
        else:
            try:
                done = _read_fully(fd, buffer[:length], start)
            except OSError as e:
                refused_direct(e, pool)
            else:
                if done < shift + size:
                    raise shorter_than_listed(path)
                return buffer[shift:shift + size]
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = _read_fully(fd, buffer[shift:shift + size], offset)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if done < size:
        raise shorter_than_listed(path)
    return buffer[shift:shift + size]


def refused_direct(error: OSError, pool: SlotPool) -> None:
    """EINVAL from an O_DIRECT open or read: this file system or device wants another alignment, so
    this read and every later one are buffered (as reads.c does). Any other error is the file's."""
    if error.errno != errno.EINVAL:
        raise error
    pool.direct_failed()


def _read_fully(fd: int, view: memoryview, offset: int) -> int:
    """preadv until `view` is full or the file ends; the bytes read."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done
