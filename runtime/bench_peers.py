"""fate-bench's peer: llama.cpp (its `llama-completion`, built from source: see BENCHMARKS.md) on a GGUF
file, run the way a memory-capped user would run it (memory-mapped weights, `--no-repack` so that the
weights stay in the mapped file instead of being copied into anonymous memory), the same prompt and
token count as Fate; and the disk's read counters, which measure both engines' reads the same way.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fate.artifacts import FateError

from .cgroup import MemoryCgroup, block_device

PERF = re.compile(r"(prompt eval|eval) time\s*=\s*([\d.]+) ms /\s*(\d+) (?:tokens|runs)")


@dataclass(frozen=True)
class LlamaCpp:
    binary: Path  # llama-completion
    gguf: Path
    threads: int

    @classmethod
    def find(cls, where: str | None, gguf: str, threads: int) -> "LlamaCpp":
        candidates = [Path(where) / name for name in ("llama-completion", "bin/llama-completion")] if where else []
        found = shutil.which("llama-completion")
        candidates += [Path(found)] if found else []
        binary = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
        if binary is None:
            raise FateError("--peer llama.cpp needs llama.cpp's llama-completion: give its folder with --llama-bin "
                            "(BENCHMARKS.md says how it was built)")
        if not Path(gguf).is_file():
            raise FateError(f"--gguf {gguf}: no such file")
        return cls(binary, Path(gguf), threads)

    def command(self, prompt: str, tokens: int) -> list[str]:
        return [str(self.binary), "-m", str(self.gguf), "-p", prompt, "-n", str(tokens), "-t", str(self.threads),
                "--temp", "0", "--ignore-eos", "--no-repack", "-no-cnv", "--no-warmup", "-c", "4096"]

    def run(self, prompt: str, tokens: int, group: MemoryCgroup | None) -> dict:
        """One generation: prefill and decode tok/s from llama.cpp's own timings, the cgroup's peak, and
        the bytes the disk read meanwhile."""
        import subprocess

        before = disk_read_bytes(self.gguf)
        if group is None:
            proc = subprocess.run(self.command(prompt, tokens), capture_output=True, text=True, errors="replace")
            code, err, peak, oom = proc.returncode, proc.stderr, None, False
        else:
            run = group.run(self.command(prompt, tokens))
            code, err, peak, oom = run.returncode, run.stderr, run.peak_bytes, run.oom_killed
        read = disk_read_bytes(self.gguf) - before if before is not None else None
        if code != 0:
            why = "OOM-killed under the cap" if oom else (err.strip().splitlines() or ["(no output)"])[-1]
            return {"failed": why}
        times = {kind: (float(ms), int(n)) for kind, ms, n in PERF.findall(err)}
        if "eval" not in times or "prompt eval" not in times:
            raise FateError(f"llama.cpp printed no timings: {(err.strip().splitlines() or ['(no output)'])[-1]}")
        (prefill_ms, prompt_n), (decode_ms, runs) = times["prompt eval"], times["eval"]
        return {"prefill_tok_s": prompt_n / prefill_ms * 1e3, "decode_tok_s": runs / decode_ms * 1e3,
                "peak_mb": peak / 1e6 if peak else None,
                "disk_mb_per_token": read / tokens / 1e6 if read is not None else None}


def disk_read_bytes(path: str | os.PathLike) -> int | None:
    """Bytes the disk holding `path` has read since boot (its /sys/block stat: sectors of 512 bytes)."""
    queue = block_device(path)
    try:
        return int((queue.parent / "stat").read_text().split()[2]) * 512 if queue else None
    except (OSError, ValueError, IndexError):
        return None
