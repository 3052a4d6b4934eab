"""fate-serve, driven as its users drive it: the real `openai` client (and plain HTTP for the SSE
framing) against a real server process on a free loopback port; the scheduler and stop strings on
their own, where a fake engine makes queueing and cancellation deterministic (no sleeps)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from fate.runtime.conversations import ConversationCache
from fate.runtime.generate import SamplingConfig
from fate.runtime.state import KVCache
from fate.runtime.serving import Job, Metrics, Outcome, QueueFull, Scheduler, StopMatcher

openai = pytest.importorskip("openai")

BIN = Path(sys.executable).parent
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-moe"
PROMPT = "Once upon a time"


class Served:  # also used by tests/test_serve_agents.py
    """A fate-serve process; the URL once it says where it listens (an event, not a sleep)."""

    def __init__(self, artifact: Path, *flags: str):
        self.proc = subprocess.Popen([str(BIN / "fate-serve"), str(artifact), "--port", "0", *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line, before = self.proc.stderr.readline(), []
        while line and " on http://" not in line:  # warnings may come first (a kernel not built, ...)
            before.append(line)
            line = self.proc.stderr.readline()
        assert " on http://" in line, "".join(before) + self.proc.stderr.read()
        self.base = line.split(" on ", 1)[1].strip()
        self.root = self.base.removesuffix("/v1")
        self.model = line.split("fate-serve: ", 1)[1].split(" on ")[0]
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.client = openai.OpenAI(base_url=self.base, api_key="none", max_retries=0, timeout=120)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def wait_for_log(self, text: str, count: int = 1) -> list[str]:
        """The server's log lines holding `text`, once there are `count` (each poll a request to
        /health, so the wait is on the server's own progress, bounded, not a sleep)."""
        for _ in range(2000):
            lines = [line for line in list(self.log) if text in line]
            if len(lines) >= count:
                return lines
            httpx.get(f"{self.root}/health", timeout=60)
        raise AssertionError(f"no {count} log lines with {text!r}: {self.log}")


@pytest.fixture(scope="module")
def server(example):
    served = Served(example, "--max-queue", "4")
    yield served
    served.close()


@pytest.fixture(scope="module")
def chat_server(mixtral):
    served = Served(mixtral.artifact(4))
    yield served
    served.close()


def fate_run_text(artifact: Path, prompt: str, n: int) -> str:
    proc = subprocess.run([str(BIN / "fate-run"), str(artifact), "-p", prompt, "-n", str(n), "--greedy", "--json"],
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout)["text"]


def test_greedy_completion_equals_fate_run(server, example):
    want = fate_run_text(example, PROMPT, 24)
    got = server.client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.choices[0].text == want and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 24 and got.usage.total_tokens == got.usage.prompt_tokens + 24
    streamed = server.client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                                stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24
    assert [m.id for m in server.client.models.list().data] == [server.model]


def test_stop_strings_also_across_token_boundaries(server, example):
    text = fate_run_text(example, PROMPT, 32)
    stop = text[7:13]  # six characters that most likely span tokens
    cut = text[: text.index(stop)]
    for stream in (False, True):
        got = server.client.completions.create(model=server.model, prompt=PROMPT, max_tokens=32, temperature=0,
                                               stop=[stop, "never appears"], stream=stream)
        if stream:
            chunks = list(got)
            assert "".join(c.choices[0].text for c in chunks) == cut
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(server):
    def sample():
        return server.client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=0.9,
                                                top_p=0.9, seed=7, extra_body={"top_k": 40}).choices[0].text
    assert sample() == sample()


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": PROMPT, "n": 2}, 400, "n=1"),
    ({"prompt": PROMPT, "functions": []}, 400, "'functions' is not supported"),
    ({"prompt": PROMPT, "suffix": "The end."}, 400, "suffix"),
    ({"prompt": PROMPT, "best_of": 3}, 400, "best_of"),
    ({"prompt": PROMPT, "logprobs": 9}, 400, "logprobs"),
    ({"prompt": PROMPT, "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": PROMPT, "repetition_penalty": 0}, 400, "repetition"),
    ({"prompt": PROMPT, "min_p": -0.1}, 400, "min_p"),
    ({"prompt": PROMPT, "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"5": 200}}, 400, "logit_bias"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ({"prompt": PROMPT, "temperature": 3}, 400, "temperature"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": PROMPT, "stop": [1]}, 400, "stop"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": PROMPT * 400, "max_tokens": 10}, 400, "maximum context length is 1024"),
    ({"prompt": PROMPT, "max_tokens": 5000}, 400, "maximum context length"),
])
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    reply = httpx.post(f"{server.base}/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"] and set(error) >= {"message", "type", "param", "code"}


def test_malformed_json(server):
    reply = httpx.post(f"{server.base}/completions", content=b"{not json", timeout=60)
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    assert httpx.get(f"{server.root}/health", timeout=60).json()["status"] == "ok"  # still serving


def test_chat_streamed_and_not(chat_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = chat_server.client.chat.completions.create(model=chat_server.model, messages=messages, max_tokens=12,
                                                       temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens >= 1
    chunks = list(chat_server.client.chat.completions.create(model=chat_server.model, messages=messages,
                                                             max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_follow_up_turn_reuses_the_conversation(chat_server):
    first = [{"role": "user", "content": "Tell me a story"}]
    reply = chat_server.client.chat.completions.create(model=chat_server.model, messages=first, max_tokens=8,
                                                       temperature=0).choices[0].message.content
    follow = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    chat_server.client.chat.completions.create(model=chat_server.model, messages=follow, max_tokens=4, temperature=0)
    metrics = httpx.get(f"{chat_server.root}/metrics", timeout=60).text
    reused = next(line for line in metrics.splitlines() if line.startswith('fate_tokens_total{kind="reused"}'))
    assert float(reused.split()[-1]) > 0, metrics


def test_sse_framing_over_plain_http(server):
    with httpx.stream("POST", f"{server.base}/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        body = "".join(reply.iter_text())
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["usage"]["completion_tokens"] == 6 and payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_concurrent_clients_all_get_complete_answers(server, example):
    prompts = ["Once upon a time", "The little dog", "She looked at the", "In the morning"]
    want = {p: server.client.completions.create(model=server.model, prompt=p, max_tokens=12,
                                                temperature=0).choices[0].text for p in prompts}
    got: dict[str, str] = {}

    def ask(prompt: str) -> None:
        client = openai.OpenAI(base_url=server.base, api_key="none", max_retries=3, timeout=120)
        got[prompt] = client.completions.create(model=server.model, prompt=prompt, max_tokens=12,
                                                temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == want


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(server):
    with httpx.stream("POST", f"{server.base}/completions", timeout=60, json={
            "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}) as reply:
        next(reply.iter_lines())  # the first event is out: the generation runs; leave
    # the server goes on: the next request is answered, and the first ended cancelled, short of its length
    after = server.client.completions.create(model=server.model, prompt=PROMPT, max_tokens=3, temperature=0)
    assert after.usage.completion_tokens == 3
    line = server.wait_for_log("finish=cancelled")[0]
    assert int(line.split("completion=")[1].split()[0]) < 1000


def test_a_request_past_its_timeout_is_a_504(example):
    served = Served(example, "--request-timeout", "0.000001")
    try:
        with pytest.raises(openai.APIStatusError) as raised:
            served.client.completions.create(model=served.model, prompt=PROMPT, max_tokens=50, temperature=0)
        assert raised.value.status_code == 504 and "timed out" in str(raised.value)
        assert httpx.get(f"{served.root}/health", timeout=60).status_code == 200
    finally:
        served.close()


def test_a_full_queue_is_a_429_with_retry_after(example):
    """--max-queue 0: while one request generates, the next is refused. The first holds the engine
    for its whole length (1000 tokens, seconds); an attempt where it still ended first is repeated."""
    served = Served(example, "--max-queue", "0")
    try:
        for _attempt in range(3):
            with httpx.stream("POST", f"{served.base}/completions", timeout=120, json={
                    "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True,
                    "ignore_eos": True}) as first:
                lines = first.iter_lines()  # kept: a dropped iterator closes the response, and the stream
                next(lines)  # generating now
                second = httpx.post(f"{served.base}/completions", json={"prompt": PROMPT, "max_tokens": 2},
                                    timeout=120)
            if second.status_code == 429:
                break
        assert second.status_code == 429, second.text
        assert second.headers["retry-after"] == "1" and second.json()["error"]["type"] == "rate_limit_error"
        served.wait_for_log("finish=cancelled")  # the first stopped when its client left: the engine is free
        assert served.client.completions.create(model=served.model, prompt=PROMPT, max_tokens=2).usage
    finally:
        served.close()


@pytest.mark.parametrize("args, fragment", [
    (["/no/such/artifact"], "neither an artifact"),
    (["{example}", "--conversation-cache", "50%"], "--conversation-cache takes bytes"),
    (["{example}", "--memory-budget", "0.0001%"], "budget"),
])
def test_bad_flags_are_one_line(example, args, fragment):
    proc = subprocess.run([str(BIN / "fate-serve"), *(a.format(example=example) for a in args), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and fragment in lines[0], proc.stderr


# ---------------------------------------------------------------------- without a server


class Gate:
    """A fake engine run: holds the worker until the test opens it or the job is cancelled."""

    def __init__(self):
        self.opened = threading.Event()
        self.started = threading.Event()

    def __call__(self, job: Job) -> Outcome:
        self.started.set()
        while not (self.opened.is_set() or job.cancelled.is_set()):
            self.opened.wait(0.01)
        reason = "cancelled" if job.cancelled.is_set() else "length"
        return Outcome(reason, len(job.prompt_ids), 0, 0, 0.0, 0.0, 0.0)


def job(events: list, deadline: float = float("inf")) -> Job:
    return Job([1, 2, 3], 4, SamplingConfig(), [], deadline, events.append)


def test_a_job_whose_deadline_passed_in_the_queue_is_not_run():
    gate, metrics = Gate(), Metrics()
    gate.opened.set()
    scheduler = Scheduler(gate, max_queue=1, metrics=metrics)
    events: list = []
    ended = threading.Event()
    late = Job([1, 2, 3], 4, SamplingConfig(), [], 0.0, lambda e: (events.append(e), ended.set()))
    scheduler.submit(late)
    assert ended.wait(60)
    scheduler.close()
    assert events == [("error", 504, "the request timed out waiting in the queue")] and not gate.started.is_set()


def test_the_queue_is_bounded_and_a_cancelled_waiter_frees_its_place():
    gate = Gate()
    scheduler = Scheduler(gate, max_queue=1, metrics=Metrics())
    try:
        first_events, second_events, third_events = [], [], []
        first = job(first_events)
        scheduler.submit(first)
        assert gate.started.wait(60)  # running now
        second = job(second_events)
        scheduler.submit(second)  # the one waiting place
        with pytest.raises(QueueFull):
            scheduler.submit(job(third_events))
        scheduler.cancel(second)  # leaves the queue at once
        assert second_events == [("done", None)] and scheduler.queue_length == 0
        third_done = threading.Event()
        third = Job([1], 4, SamplingConfig(), [], float("inf"), lambda e: (third_events.append(e), third_done.set()))
        scheduler.submit(third)
        scheduler.cancel(first)  # the running one stops at its next check; the third runs
        gate.opened.set()
        assert third_done.wait(60)
        assert first_events[-1][1].finish_reason == "cancelled" and third_events[-1][1].finish_reason == "length"
    finally:
        gate.opened.set()
        scheduler.close()


@pytest.mark.parametrize("pieces, stops, text, stopped", [
    (["Hel", "lo wo", "rld"], ["o w"], "Hell", True),
    (["ab", "c", "d"], ["cd"], "ab", True),
    (["ab", "c"], ["cd"], "abc", False),  # the held-back "c" comes out at the end
    (["x" * 5], [], "xxxxx", False),
])
def test_stop_strings_cut_at_the_first_match(pieces, stops, text, stopped):
    assert matched(pieces, stops) == (text, stopped)


def matched(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """(the text a StopMatcher lets out of `pieces`, whether it met a stop), as the worker feeds it."""
    matcher, out, hit = StopMatcher(stops), "", False
    for piece in pieces:
        part, hit = matcher.feed(piece)
        out += part
        if hit:
            break
    if not hit:
        out += matcher.flush()
    return out, hit


def test_the_conversation_cache_returns_the_longest_shared_prefix_within_its_bound():
    def cache(length: int) -> KVCache:
        k = np.zeros((1, 2, length, 4), np.float32)
        return KVCache([{"key": k, "value": k}] * 2, length)

    store = ConversationCache(limit_bytes=4 * 1024)
    store.put([1, 2, 3, 4, 5], cache(5))
    store.put([1, 2, 9], cache(3))
    taken = store.take([1, 2, 3, 4, 7, 8])
    assert taken.length == 4 and taken.layers[0]["key"].shape[2] == 4  # the first entry, cut where the prompts part
    assert store.take([1, 2, 3]).length == 2  # what is left: [1, 2, 9]; one prompt token must stay to run
    assert store.take([5]) is None
    store.put(list(range(100)), cache(100))  # larger than the bound: not kept
    assert store.nbytes == 0


def test_a_cache_with_fixed_state_serves_only_prompts_that_extend_its_whole_sequence():
    def hybrid(length: int) -> KVCache:  # one attention layer, one short-convolution layer
        k = np.zeros((1, 2, length, 4), np.float32)
        return KVCache([{"key": k, "value": k}, {"conv": np.full((1, 2, 8), length, np.float32)}], length)

    store = ConversationCache(limit_bytes=1 << 20)
    store.put([1, 2, 3, 4], hybrid(4))
    assert store.take([1, 2, 3, 7, 8]) is None  # the state has folded in token 4: it cannot be cut to 3
    taken = store.take([1, 2, 3, 4, 5])
    assert taken.length == 4 and taken.layers[1]["conv"][0, 0, 0] == 4
    with pytest.raises(ValueError):
        hybrid(4).prefix(3)


def first_stop_reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the stop string that is complete first (of those complete at once, the longest)."""
    ends = [(text.find(s) + len(s), -len(s)) for s in stops if s and s in text]
    if not ends:
        return text, False
    end, neg = min(ends)
    return text[:end + neg], True


def test_stop_matcher_agrees_with_a_plain_search(fuzz_examples):
    """Any pieces and stops (small alphabets make overlaps, self-overlapping stops and prefixes of
    other stops common): the matcher's output is the plain search's, and nothing is lost."""
    from hypothesis import given, settings, strategies as st

    text = st.text(alphabet="abc", max_size=12)

    @settings(max_examples=max(fuzz_examples, 300), deadline=None)
    @given(st.lists(text, max_size=6), st.lists(text, max_size=4))
    def check(pieces, stops):
        assert matched(pieces, stops) == first_stop_reference("".join(pieces), stops)

    check()


# ---------------------------------------------------------------------- hostile requests (December)


def test_a_huge_stop_string_is_refused_and_a_long_one_costs_linear_time(server):
    """A 1 MB stop stalled the engine for everyone (the matcher was quadratic in the stop's length
    every token): stops are bounded, and the matcher is linear (test_stop_matcher_agrees_...)."""
    reply = httpx.post(f"{server.base}/completions", json={"prompt": PROMPT, "stop": "x" * (1 << 20)}, timeout=60)
    assert reply.status_code == 400 and "stop string" in reply.json()["error"]["message"]
    long_stop = "never produced " * 250  # under the bound: served, and the answer comes
    out = server.client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, stop=[long_stop],
                                           temperature=0)  # greedy: a sampled answer may end at an eos
    assert out.choices[0].finish_reason == "length"


def test_bodies_past_the_limit_are_413_and_prompts_that_cannot_fit_are_refused_untokenized(example):
    served = Served(example, "--max-request-size", "64KB")
    try:
        big = {"prompt": "x" * 100_000}
        reply = httpx.post(f"{served.base}/completions", json=big, timeout=60)  # Content-Length says it
        assert reply.status_code == 413 and "larger than" in reply.json()["error"]["message"]

        def chunks():  # no Content-Length: refused as soon as what arrives passes the limit
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"x" * 4096
            yield b'"}'

        reply = httpx.post(f"{served.base}/completions", content=chunks(), timeout=60)
        assert reply.status_code == 413
        # under the body limit, but more characters than the context can hold whatever the tokens
        reply = httpx.post(f"{served.base}/completions", json={"prompt": "y" * 60_000}, timeout=60)
        assert reply.status_code == 400 and "characters are at least" in reply.json()["error"]["message"]
        assert httpx.get(f"{served.root}/health", timeout=60).json()["status"] == "ok"
    finally:
        served.close()


def test_a_client_that_leaves_mid_body_is_one_log_line_and_ctrl_c_is_one_line_and_130(example):
    import signal
    import socket

    served = Served(example)
    host, port = served.root.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"prompt\": \"")
    served.wait_for_log("left before its request was read")
    assert served.client.completions.create(model=served.model, prompt=PROMPT, max_tokens=2).usage  # still serving
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(timeout=60) == 130
    log = "".join(served.log) + served.proc.stderr.read()
    assert "Traceback" not in log and "Aborted" not in log and "fate-serve: stopped" in log, log


def test_range_errors_name_the_bound_they_break(server):
    reply = httpx.post(f"{server.base}/completions", json={"prompt": PROMPT, "max_tokens": 0}, timeout=60)
    assert reply.json()["error"]["message"] == "'max_tokens' must be at least 1"


def test_a_chat_template_that_raises_gives_its_own_message():
    from fate.artifacts import GenerationError
    from fate.runtime.text import render_template

    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Roles must alternate') }}{% endif %}"
    with pytest.raises(GenerationError, match="Roles must alternate"):
        render_template(template, messages=[{"role": "system", "content": "x"}])
