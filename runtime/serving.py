"""What fate-serve runs behind HTTP: one engine, one generation at a time, requests waiting in a
bounded FIFO queue; stop strings, cancellation at the next token, deadlines, the conversation
cache, and the numbers /metrics shows. No HTTP here (runtime/server.py is the web layer), so all
of it is tested without a socket.

A Job is one request. The worker thread takes jobs in order and reports what happens through
`job.emit(event)`: ("prompt", logprobs) first where the prompt's log-probabilities were asked for,
("text", piece, logprobs) as text is ready (the log-probabilities of the tokens that made it, where
asked for), then exactly one of ("done", Outcome) or ("error", status, message).
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from fate.artifacts import FateError

from .api import Engine
from .conversations import ConversationCache
from .experts.report import OffloadReport
from .generate import Constraint, GenerationResult, SamplingConfig, stream_tokens
from .text import StreamDecoder


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stops: list[str]
    deadline: float  # time.monotonic() after which the job stops
    emit: Callable[[tuple], None]
    ignore_eos: bool = False  # generate all max_tokens (an extension, as vLLM's, for measurements)
    constraint: Constraint | None = None  # a grammar the output follows (runtime.grammar)
    logprobs: int | None = None  # each token's log-probability and this many alternatives
    prompt_logprobs: bool = False  # the prompt's too (completions' echo): its whole prompt is run
    special: bool = False  # special tokens written out in the text (a tool-call marker that is one)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Outcome:
    finish_reason: str  # stop, length, cancelled or timeout
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int  # prompt tokens whose keys and values came from the conversation cache
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    bytes_read: int = 0  # expert bytes this request read from disk
    hit_rate: float | None = None  # the decode expert hit rate since the server started


class StopMatcher:
    """Cuts generated text at the first stop string, also one that spans pieces: text that could
    still be the start of a stop string is held back until the next piece decides.

    Linear time: each stop string is a Knuth-Morris-Pratt automaton whose state is the longest
    prefix of the stop that ends the text so far, so a character costs amortized O(1) per stop
    whatever the stops' lengths (searching the held text for every prefix was quadratic in the
    stop's length, every token). The text is cut at the first place where a stop string is
    complete, before that stop."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text that is final, whether a stop string was found)."""
        start = len(self.pending)
        self.pending += piece
        for at in range(start, len(self.pending)):
            char, done = self.pending[at], 0
            for i, stop in enumerate(self.stops):
                k, fail = self.state[i], self.fail[i]
                while k and stop[k] != char:
                    k = fail[k - 1]
                k = k + 1 if stop[k] == char else 0
                if k == len(stop):  # complete here; of several, the longest starts first
                    done, k = max(done, k), fail[k - 1]
                self.state[i] = k
            if done:
                out, self.pending = self.pending[: at + 1 - done], ""
                return out, True
        hold = max(self.state, default=0)  # the longest stop prefix the text ends with
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _failure(s: str) -> list[int]:
    """KMP's table: fail[i] is the length of the longest proper prefix of s[:i + 1] that is also
    its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class Metrics:
    """Counters for /metrics, written by the worker, read by the web layer."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # by finish reason or error status
        self.prompt_tokens = self.completion_tokens = self.reused_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.last: Outcome | None = None
        self.experts: OffloadReport | None = None

    def finished(self, outcome: Outcome, experts) -> None:
        with self.lock:
            self.requests[outcome.finish_reason] += 1
            self.prompt_tokens += outcome.prompt_tokens
            self.completion_tokens += outcome.completion_tokens
            self.reused_tokens += outcome.reused_tokens
            if outcome.completion_tokens:
                self.ttft_sum += outcome.time_to_first_token_s
                self.ttft_count += 1
            self.last = outcome
            self.experts = experts if isinstance(experts, OffloadReport) else None

    def failed(self, status: int) -> None:
        with self.lock:
            self.requests[f"error_{status}"] += 1


class EngineRunner:
    """Runs one job on the engine: generation with stop strings, cancellation and the deadline
    checked at every token, the conversation cache consulted and refilled."""

    def __init__(self, engine: Engine, conversations: ConversationCache, metrics: Metrics):
        self.engine = engine
        self.conversations = conversations
        self.metrics = metrics

    def __call__(self, job: Job) -> Outcome:
        model, codec = self.engine.model, self.engine.codec
        cache = (None if job.prompt_logprobs else self.conversations.take(job.prompt_ids)) or model.new_cache()
        result = GenerationResult(list(job.prompt_ids))
        decoder, stops = StreamDecoder(codec, job.special), StopMatcher(job.stops)
        finish, hit, scored = "length", False, 0
        eos = set() if job.ignore_eos else codec.eos_ids
        read_before = _bytes_read(model)

        def emit(text: str) -> None:  # the text, with the log-probabilities of the tokens not yet given out
            nonlocal scored
            if text or (job.logprobs is not None and scored < len(result.logprobs)):
                job.emit(("text", text, result.logprobs[scored:]))
                scored = len(result.logprobs)

        tokens = stream_tokens(model, job.prompt_ids, job.max_tokens, job.sampling, eos, result, cache,
                               constraint=job.constraint, logprobs=job.logprobs, prompt_logprobs=job.prompt_logprobs)
        for token in tokens:
            if job.prompt_logprobs and len(result.token_ids) == 1:
                job.emit(("prompt", result.prompt_logprobs))
            if token in eos:
                finish = "stop"
                break
            text, hit = stops.feed(decoder.push(token))
            if text:
                emit(text)
            if hit:
                finish = "stop"
                break
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            if time.monotonic() > job.deadline:
                finish = "timeout"
                break
        if not hit:  # what the decoder and the stop matcher still hold is final now
            text, hit = stops.feed(decoder.flush())
            text += "" if hit else stops.flush()
            finish = "stop" if hit or result.stats.stop_reason == "grammar" else finish
            emit(text)
        self.conversations.put(job.prompt_ids + result.token_ids, cache)
        s = result.stats
        report = model.experts.report()
        offloaded = isinstance(report, OffloadReport)
        outcome = Outcome(finish, len(job.prompt_ids), len(result.token_ids), s.reused_tokens,
                          s.time_to_first_token_s, s.prefill_tokens_per_s, s.decode_tokens_per_s,
                          (report.bytes_read if offloaded else 0) - read_before,
                          report.decode.hit_rate if offloaded else None)
        self.metrics.finished(outcome, report)
        return outcome


def _bytes_read(model) -> int:
    report = model.experts.report()
    return report.bytes_read if isinstance(report, OffloadReport) else 0


class Scheduler:
    """A bounded FIFO of jobs and the one worker thread that runs them in order. A cancelled job
    waiting in the queue leaves it at once, freeing its place."""

    def __init__(self, run: Callable[[Job], Outcome], max_queue: int, metrics: Metrics,
                 on_end: Callable[[Job, int, Outcome | str], None] = lambda job, status, how: None):
        """on_end(job, status, outcome or error message): once per job that ran, in the worker."""
        self.run = run
        self.max_queue = max_queue
        self.metrics = metrics
        self.on_end = on_end
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._work, name="fate-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue + (self.running is None):
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.emit(("done", None))

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self._waiting)

    def close(self) -> None:
        """Stop taking jobs; those still waiting get an error; the running one stops at its next token."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self.running is not None:
                self.running.cancelled.set()
            self._cond.notify_all()
        for job in waiting:
            self._fail(job, 503, "the server is shutting down")
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self.running = self._waiting.popleft()
            outcome, failure = None, None
            try:
                if time.monotonic() > job.deadline:
                    failure = (504, "the request timed out waiting in the queue")
                else:
                    outcome = self.run(job)
            except FateError as e:  # the request's own numbers (a prompt the model refuses, NaN logits)
                failure = (400, str(e))
            except Exception as e:  # noqa: BLE001 - one failed request never takes the server down
                failure = (500, f"{type(e).__name__}: {e}")
            with self._cond:  # free before anyone hears of the end: the next request finds the engine idle
                self.running = None
            if failure is not None:
                self._fail(job, *failure)
            else:
                job.emit(("done", outcome))
                self.on_end(job, 200, outcome)

    def _fail(self, job: Job, status: int, message: str) -> None:
        job.emit(("error", status, message))
        self.metrics.failed(status)
        self.on_end(job, status, message)
