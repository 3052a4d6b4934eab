"""A real memory cap for a benchmark run: a memory cgroup (v1 or v2) of a given size, page cache
counted, that a child process joins before it starts; its peak usage read back; removed afterwards.
And the two machine settings every capped comparison states: dropping the page cache, and the disk's
readahead (which decides how much an mmap fault reads: llama.cpp's path, not Fate's O_DIRECT reads).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fate.artifacts import FateError

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


@dataclass
class CappedRun:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int | None  # the cgroup's peak usage (page cache included)
    oom_killed: bool


class MemoryCgroup:
    """`with MemoryCgroup(limit) as group: group.run([...])`: each run in the cgroup, one at a time."""

    def __init__(self, limit: int, name: str = "fate-bench"):
        self.limit = limit
        self.path, self.version = self._make(f"{name}-{os.getpid()}")

    @staticmethod
    def _make(name: str) -> tuple[Path, int]:
        """A new cgroup under the first hierarchy that has a memory controller this process may use."""
        v2_controllers = V2 / "cgroup.subtree_control"
        hierarchies = [(V1, 1, (V1 / "cgroup.procs").exists()),
                       (V2, 2, v2_controllers.exists() and "memory" in v2_controllers.read_text().split())]
        reasons = []
        for root, version, mounted in hierarchies:
            if not mounted:
                continue
            try:
                (root / name).mkdir()
                return root / name, version
            except OSError as e:
                reasons.append(f"cgroup v{version} {root}: {e.strerror}")
        reason = "; ".join(reasons) or "no memory cgroup controller is mounted where this process may use it"
        raise FateError(f"cannot cap memory: {reason} (run as root, or give no limits)")

    def __enter__(self) -> "MemoryCgroup":
        try:
            if self.version == 1:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
                try:
                    (self.path / "memory.swappiness").write_text("0")
                except OSError:
                    pass
            else:
                (self.path / "memory.max").write_text(str(self.limit))
                (self.path / "memory.swap.max").write_text("0")
        except OSError as e:
            self.close()
            raise FateError(f"cannot set the memory cgroup's limit: {e.strerror}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass

    def run(self, command: list[str], timeout: float | None = None) -> CappedRun:
        """`command` started inside the cgroup (it joins before it execs), to its end."""
        self._reset_peak()
        joined = f"echo $$ > {shlex.quote(str(self.path / 'cgroup.procs'))} && exec " + shlex.join(command)
        proc = subprocess.run(["sh", "-c", joined], capture_output=True, text=True, errors="replace", timeout=timeout)
        return CappedRun(proc.returncode, proc.stdout, proc.stderr, self._peak(), self._oom_killed())

    def _reset_peak(self) -> None:
        try:
            if self.version == 1:
                (self.path / "memory.max_usage_in_bytes").write_text("0")
        except OSError:
            pass

    def _peak(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def _oom_killed(self) -> bool:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False


def drop_caches() -> bool:
    """Write back and drop the page cache (root only); whether it was dropped."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def block_device(path: str | os.PathLike) -> Path | None:
    """The /sys/block queue folder of the disk holding `path` (its whole-disk device), if found."""
    try:
        dev = os.stat(path).st_dev
        sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    except OSError:
        return None
    for candidate in (sys_dev, sys_dev.parent):
        if (candidate / "queue" / "read_ahead_kb").exists():
            return candidate / "queue"
    return None


def readahead_kb(path: str | os.PathLike) -> int | None:
    queue = block_device(path)
    try:
        return int((queue / "read_ahead_kb").read_text()) if queue else None
    except (OSError, ValueError):
        return None


class Readahead:
    """`with Readahead(path, 128):` the disk under `path` reads ahead 128 KB per fault, restored after."""

    def __init__(self, path: str | os.PathLike, kb: int | None):
        self.queue, self.kb, self.before = block_device(path), kb, None

    def __enter__(self) -> "Readahead":
        if self.kb is None:
            return self
        if self.queue is None:
            raise FateError("cannot set the readahead: the disk under the artifact was not found in /sys/block")
        try:
            self.before = int((self.queue / "read_ahead_kb").read_text())
            (self.queue / "read_ahead_kb").write_text(str(self.kb))
        except (OSError, ValueError) as e:
            raise FateError(f"cannot set the readahead: {getattr(e, 'strerror', e)} (run as root)") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.before is not None:
            (self.queue / "read_ahead_kb").write_text(str(self.before))
