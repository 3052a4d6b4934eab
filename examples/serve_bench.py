"""fate-serve against fate-run on one artifact, side by side: time to first token and decode speed
through the HTTP server (streamed, the first chunk's arrival) and in-process (fate-run --json), and
a follow-up turn's time to first token with and without the conversation cache.

    python examples/serve_bench.py ARTIFACT [--repeat 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


BIN = Path(sys.executable).parent
PROMPT = ("The history of computing is a story of making machines smaller, cheaper and closer to the people "
          "who use them. Large language models now follow the same path:")


def start(artifact: str, *flags: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(BIN / "fate-serve"), artifact, "--port", "0", *flags], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    while line and " on http://" not in line:  # warnings may come first
        line = proc.stderr.readline()
    if " on http://" not in line:
        raise SystemExit(proc.stderr.read() or "fate-serve ended before listening")
    return proc, line.split(" on ", 1)[1].strip()


def streamed(base: str, prompt: str, tokens: int) -> tuple[float, float, str]:
    """(time to first token, decode tokens/s after it, text) of one streamed greedy completion.
    The standard library's client: httpx (under the openai SDK) added about 35 ms to every request on
    this machine, /health included, where curl and a raw socket take 0.5-2 ms."""
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True})
    start = time.perf_counter()
    connection.request("POST", f"{url.path}/completions", body, {"Content-Type": "application/json"})
    reply = connection.getresponse()
    first, text, count = None, [], 0
    for raw in reply:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"][0]["text"] and first is None:
            first = time.perf_counter()
        text.append(chunk["choices"][0]["text"])
        count = chunk.get("usage", {}).get("completion_tokens", count)
    end = time.perf_counter()
    connection.close()
    return first - start, (count - 1) / (end - first), "".join(text)


def fate_run(artifact: str, tokens: int) -> tuple[float, float]:
    out = subprocess.run([str(BIN / "fate-run"), artifact, "-p", PROMPT, "-n", str(tokens), "--greedy", "--json",
                          "--ignore-eos"], capture_output=True, text=True, check=True, timeout=300)
    stats = json.loads(out.stdout)["stats"]
    return stats["time_to_first_token_s"], stats["decode_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {"fate-run": [], "fate-serve": []}
    turn2: dict[str, list[float]] = {"conversation cache on": [], "conversation cache off": []}
    servers = {"conversation cache on": start(args.artifact),
               "conversation cache off": start(args.artifact, "--conversation-cache", "0")}
    try:
        for name, (_, base) in servers.items():  # warm-up
            streamed(base, PROMPT, 4)
        for _ in range(args.repeat):
            rows["fate-run"].append(fate_run(args.artifact, args.tokens))
            ttft, speed, reply = streamed(servers["conversation cache on"][1], PROMPT, args.tokens)
            rows["fate-serve"].append((ttft, speed))
            follow_up = PROMPT + reply + " Then, in the next decade,"
            for name, (_, base) in servers.items():
                if name == "conversation cache off":
                    streamed(base, PROMPT, args.tokens)  # the same first turn, for a like-for-like second
                turn2[name].append(streamed(base, follow_up, 8)[0])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{args.artifact}: {args.tokens} greedy tokens after a {len(PROMPT)}-character prompt, median of "
          f"{args.repeat}")
    for name, values in rows.items():
        print(f"  {name:10s} time to first token {statistics.median(v[0] for v in values) * 1e3:7.1f} ms   "
              f"decode {statistics.median(v[1] for v in values):7.1f} tok/s")
    for name, values in turn2.items():
        print(f"  turn 2, {name:22s} time to first token {statistics.median(values) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
