"""fate-serve's web layer: OpenAI's HTTP API (models, completions, chat completions, streamed as
server-sent events), /health and /metrics, over runtime.serving's one-engine scheduler.

Starlette (the ASGI toolkit FastAPI is built on, small and well kept) with uvicorn: the `serve`
extra. Nothing here runs a model; a request becomes a Job, and the Job's events become JSON or SSE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fate.artifacts import FateError

from .api import Engine
from .conversations import ConversationCache
from .generate import SamplingConfig
from .serving import EngineRunner, Job, Metrics, Outcome, QueueFull, Scheduler

log = logging.getLogger("fate.serve")
MAX_STOPS = 4  # as OpenAI
# A stop string longer than any a client needs costs every token of its request (the matcher is linear
# in it): bounded, as is the body of a request (ServeConfig.max_body_bytes).
MAX_STOP_CHARS = 4096


@dataclass(frozen=True)
class ServeConfig:
    """The flags of fate-serve beyond those that load the engine."""

    model_name: str
    max_queue: int = 8
    request_timeout_s: float = 600.0
    conversation_bytes: int = 256 << 20
    max_body_bytes: int = 8 << 20  # a larger body is a 413 before it is read in full


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class Params:
    """One request's generation settings, checked."""

    max_tokens: int
    sampling: SamplingConfig
    stops: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _number(body: dict, name: str, kind, default, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}", name)
    if kind is float and value != value:
        raise ApiError(400, f"'{name}' must be a number", name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if low is not None and high is not None else \
            f"at least {low}" if low is not None else f"at most {high}"
        raise ApiError(400, f"'{name}' must be {bounds}", name)
    return kind(value)


def parse_params(body: dict, prompt_tokens: int, context: int, default_max: int | None) -> Params:
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported: one engine generates one sequence at a time", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    room = context - prompt_tokens
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: asked}, name, int, default_max if default_max is not None else room, 1, None)
    if prompt_tokens >= context or (asked is not None and prompt_tokens + max_tokens > context):
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the request has "
                            f"{prompt_tokens} in the prompt and asks for {max_tokens} more", "messages")
    max_tokens = min(max_tokens, room)
    temperature = _number(body, "temperature", float, 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", float, 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p")
    top_k = _number(body, "top_k", int, 0, 0, None)
    seed = _number(body, "seed", int, None, 0, 2**64 - 1)
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"a stop string may hold at most {MAX_STOP_CHARS} characters", "stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    try:
        sampling = SamplingConfig(greedy=temperature == 0.0, temperature=temperature or 1.0, top_k=top_k,
                                  top_p=top_p, seed=seed)
    except FateError as e:
        raise ApiError(400, str(e)) from None
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", "ignore_eos")
    return Params(max_tokens, sampling, stops, stream, bool(options.get("include_usage", True)), ignore_eos)


def usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


class Server:
    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.metrics = Metrics()
        self.conversations = ConversationCache(config.conversation_bytes)
        self.scheduler = Scheduler(EngineRunner(engine, self.conversations, self.metrics), config.max_queue,
                                   self.metrics, log_request)
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ])

    def close(self) -> None:
        self.scheduler.close()

    # ------------------------------------------------------------------ endpoints

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "fate"}]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.model_name})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, self._prompt_ids, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, self._chat_ids, chat=True)

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self._metrics_text(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ one request

    async def _read(self, request: Request) -> bytes:
        """The request's body, refused with 413 past max_body_bytes: by its Content-Length before
        anything is read, else as soon as what arrives passes the limit."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is larger than this server takes ({limit} bytes)")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(self, request: Request) -> dict:
        try:
            body = json.loads(await self._read(request))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.config.model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this server has '{self.config.model_name}'",
                           "model", "not_found_error")
        return body

    async def _serve(self, request: Request, ids_of, chat: bool) -> Response:
        try:
            body = await self._body(request)
            try:  # templates and tokenizers take time on long texts: not on the event loop
                ids = await run_in_threadpool(ids_of, body)
            except FateError as e:  # a chat template that runs away, a tokenizer that fails
                raise ApiError(400, str(e)) from None
            return await self._respond(request, body, ids, chat)
        except ApiError as e:
            self.metrics.failed(e.status)
            log.info("- %d %s", e.status, e.message)
            return e.response()
        except ClientDisconnect:  # it left before its request was whole: nobody to answer
            log.info("- a client left before its request was read")
            return Response(status_code=499)

    def _check_length(self, chars: int, field: str) -> None:
        """Refuse text that cannot fit the context before tokenizing it: no token covers more than
        the tokenizer's longest token, so `chars` characters are at least chars / that many tokens."""
        context = self.engine.model.context
        least = chars // self.engine.codec.max_token_chars
        if least >= context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens; the request's "
                                f"{chars} characters are at least {least} tokens", field)

    def _prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
        self._check_length(len(prompt), "prompt")
        return self.engine.codec.encode(prompt)

    def _chat_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} with string content",
                           "messages")
        if not self.engine.codec.chat_template:
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        self._check_length(sum(len(m["content"]) for m in messages), "messages")
        return self.engine.codec.chat_ids([{"role": m["role"], "content": m["content"]} for m in messages])

    async def _respond(self, request: Request, body: dict, ids: list[int], chat: bool) -> Response:
        context = self.engine.model.context
        params = parse_params(body, len(ids), context, None if chat else 16)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(ids, params.max_tokens, params.sampling, params.stops,
                  time.monotonic() + self.config.request_timeout_s,
                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event), params.ignore_eos)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        shape = ChatShape(job.id, self.config.model_name) if chat else TextShape(job.id, self.config.model_name)
        if params.stream:
            return StreamingResponse(self._sse(job, events, shape, params), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, job, events, shape)

    async def _events(self, job: Job, events: asyncio.Queue):
        """The job's events until it ends; a deadline passed while waiting cancels it."""
        while True:
            try:
                event = await asyncio.wait_for(events.get(), max(0.0, job.deadline - time.monotonic()) + 1.0)
            except asyncio.TimeoutError:
                self.scheduler.cancel(job)
                yield ("error", 504, "the request timed out")
                return
            yield event
            if event[0] != "text":
                return

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue, shape) -> Response:
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            pieces = []
            async for event in _until(self._events(job, events), gone):
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    raise ApiError(event[1], event[2], kind="server_error" if event[1] >= 500 else
                                   "invalid_request_error")
                elif event[1] is not None and event[1].finish_reason == "timeout":
                    raise ApiError(504, f"the request timed out after {self.config.request_timeout_s:g} s "
                                        f"({event[1].completion_tokens} tokens generated)", kind="timeout_error")
                elif event[1] is not None:
                    return JSONResponse(shape.whole("".join(pieces), event[1]))
            return Response(status_code=499)  # the client left; `finally` cancels its generation
        finally:
            gone.cancel()
            self.scheduler.cancel(job)

    async def _sse(self, job: Job, events: asyncio.Queue, shape, params: Params):
        try:
            async for event in self._events(job, events):
                if event[0] == "text":
                    yield _data(shape.chunk(event[1]))
                elif event[0] == "error":
                    yield _data({"error": {"message": event[2], "type": "server_error", "param": None,
                                           "code": event[1]}})
                elif event[1] is not None and event[1].finish_reason == "timeout":
                    message = f"the request timed out after {self.config.request_timeout_s:g} s"
                    yield _data({"error": {"message": message, "type": "timeout_error", "param": None, "code": 504}})
                elif event[1] is not None:
                    yield _data(shape.last(event[1], params.include_usage))
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: the generation stops at its next token
            self.scheduler.cancel(job)

    def _metrics_text(self) -> str:
        m = self.metrics
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:.6g}" for labels, value in samples)

        with m.lock:
            metric("fate_requests_total", "counter", "Requests by finish reason or error status.",
                   [(f'{{outcome="{k}"}}', v) for k, v in sorted(m.requests.items())])
            metric("fate_tokens_total", "counter", "Tokens by kind.",
                   [('{kind="prompt"}', m.prompt_tokens), ('{kind="completion"}', m.completion_tokens),
                    ('{kind="reused"}', m.reused_tokens)])
            if m.last is not None:
                metric("fate_tokens_per_second", "gauge", "Speed of the last request, per phase.",
                       [('{phase="prefill"}', m.last.prefill_tokens_per_s),
                        ('{phase="decode"}', m.last.decode_tokens_per_s)])
            metric("fate_time_to_first_token_seconds", "summary", "Time to first token.",
                   [("_sum", m.ttft_sum), ("_count", m.ttft_count)])
            metric("fate_queue_length", "gauge", "Requests waiting.", [("", self.scheduler.queue_length)])
            metric("fate_conversation_cache_bytes", "gauge", "Keys and values kept for follow-up turns.",
                   [("", self.conversations.nbytes)])
            experts = m.experts
            if experts is not None:
                d = experts.decode
                metric("fate_expert_hit_rate", "gauge", "Decode expert cache hit rate so far.",
                       [("", d.hit_rate if d.hit_rate is not None else 0.0)])
                metric("fate_expert_stall_seconds_total", "counter", "Time spent waiting for expert loads.",
                       [("", experts.stall_s)])
                metric("fate_expert_resident_bytes", "gauge", "Expert bytes resident now.",
                       [("", experts.resident_bytes)])
                metric("fate_expert_budget_bytes", "gauge", "The expert memory budget.", [("", experts.budget_bytes)])
        return "\n".join(lines) + "\n"


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _until(events, gone: asyncio.Future):
    """The events of an async iterator until `gone` completes (the client left)."""
    iterator = events.__aiter__()
    while True:
        step = asyncio.ensure_future(iterator.__anext__())
        done, _ = await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
        if step not in done:
            step.cancel()
            return
        try:
            yield step.result()
        except StopAsyncIteration:
            return


class TextShape:
    """/v1/completions bodies."""

    def __init__(self, job_id: str, model: str):
        self.id, self.model, self.created = f"cmpl-{job_id}", model, int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, outcome: Outcome) -> dict:
        return {**self._base("text_completion"), "usage": usage(outcome), "choices": [
            {"index": 0, "text": text, "finish_reason": finish(outcome), "logprobs": None}]}

    def chunk(self, text: str) -> dict:
        return {**self._base("text_completion"), "choices": [
            {"index": 0, "text": text, "finish_reason": None, "logprobs": None}]}

    def last(self, outcome: Outcome, with_usage: bool) -> dict:
        body = {**self._base("text_completion"), "choices": [
            {"index": 0, "text": "", "finish_reason": finish(outcome), "logprobs": None}]}
        return {**body, "usage": usage(outcome)} if with_usage else body


class ChatShape(TextShape):
    """/v1/chat/completions bodies."""

    def __init__(self, job_id: str, model: str):
        super().__init__(job_id, model)
        self.id = f"chatcmpl-{job_id}"
        self.first = True

    def whole(self, text: str, outcome: Outcome) -> dict:
        return {**self._base("chat.completion"), "usage": usage(outcome), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish(outcome),
             "logprobs": None}]}

    def chunk(self, text: str) -> dict:
        delta = {"role": "assistant", "content": text} if self.first else {"content": text}
        self.first = False
        return {**self._base("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]}

    def last(self, outcome: Outcome, with_usage: bool) -> dict:
        body = {**self._base("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": {}, "finish_reason": finish(outcome), "logprobs": None}]}
        return {**body, "usage": usage(outcome)} if with_usage else body


def finish(outcome: Outcome) -> str:
    """OpenAI's finish reasons (a timed-out request is an error, never a finish)."""
    return "stop" if outcome.finish_reason == "stop" else "length"


def log_request(job: Job, status: int, how: Outcome | str) -> None:
    """One line per request that reached the engine, whatever became of its client."""
    if isinstance(how, str):
        log.info("%s %d %s", job.id, status, how)
        return
    log.info("%s %d prompt=%d (reused %d) completion=%d ttft=%.3fs decode=%.1f tok/s finish=%s", job.id, status,
             how.prompt_tokens, how.reused_tokens, how.completion_tokens, how.time_to_first_token_s,
             how.decode_tokens_per_s, how.finish_reason)


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fate-serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
