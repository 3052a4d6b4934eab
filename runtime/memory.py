"""This process's memory, as the budget and the benchmarks measure it (Linux /proc)."""

from __future__ import annotations

import ctypes


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss() -> int:
    """Peak resident memory of this program, in bytes. VmHWM starts afresh at exec, unlike
    getrusage's ru_maxrss, which a child inherits from the process that forked it."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so that resident
    memory measures what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
