"""Instructions the generation loop's thread executes per decode token, counted by valgrind's
callgrind: a measure of the runtime's own work that a shared, noisy machine does not disturb (wall
time here varies by 20% from run to run; the count by well under 1%). It does not see time spent
waiting, in the kernel, or on other threads: compare it with wall time, not instead of it.

Runs `fate-run` twice under callgrind, with a short and a long generation, and reports the
difference per token (start-up and prefill cancel out):

    python examples/instructions_per_token.py out/tiny-moe [--memory-budget 50%] [--tokens 40 240]

Needs valgrind (apt install valgrind); each run takes about a minute for tiny-moe.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = "import sys; from fate.entry import fate_run; sys.argv = ['fate-run'] + sys.argv[1:]; sys.exit(fate_run())"


def main_thread_instructions(artifact: str, tokens: int, extra: list[str], workdir: Path) -> int:
    out = workdir / f"callgrind.{tokens}"
    command = ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
               sys.executable, "-c", RUN, artifact, "-p", "Once upon a time", "-n", str(tokens), "--greedy",
               "--ignore-eos", *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"fate-run under valgrind failed: {done.stderr.strip().splitlines()[-1:]}")
    text = (workdir / f"callgrind.{tokens}-01").read_text(errors="replace")  # thread 1: the loop
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        sys.exit("no instruction total in callgrind's output")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--memory-budget", help="as fate-run's (default: every expert resident)")
    parser.add_argument("--tokens", type=int, nargs=2, default=(40, 240), metavar=("SHORT", "LONG"))
    args = parser.parse_args()
    short, long = args.tokens
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt install valgrind)")
    if not 0 < short < long:
        sys.exit("--tokens takes a short and a longer generation, e.g. 40 240")
    extra = ["--memory-budget", args.memory_budget] if args.memory_budget else []
    with tempfile.TemporaryDirectory() as work:
        counts = [main_thread_instructions(args.artifact, n, extra, Path(work)) for n in (short, long)]
    per_token = (counts[1] - counts[0]) / (long - short)
    print(f"{args.artifact} ({args.memory_budget or 'all resident'}): {per_token / 1e6:.2f} M instructions "
          f"per decode token on the generation loop's thread")


if __name__ == "__main__":
    main()
