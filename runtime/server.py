"""fate-serve's web layer: OpenAI's HTTP API (models, completions, chat completions, streamed as
server-sent events), /health, /metrics and the chat page at /, over runtime.serving's one-engine
scheduler; request and answer bodies are runtime.openai_api's.

Starlette (the ASGI toolkit FastAPI is built on, small and well kept) with uvicorn: the `serve`
extra. Nothing here runs a model; a request becomes a Job, and the Job's events become JSON or SSE.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fate.artifacts import FateError

from .api import Engine
from .conversations import ConversationCache
from .grammar import GrammarConstraint, Vocabulary
from .openai_api import (ApiError, ChatShape, Logprobs, Params, TextShape, Tools, chat_messages, chat_tools,
                         check_fields, parse_params, response_grammar)
from .serving import EngineRunner, Job, Metrics, Outcome, QueueFull, Scheduler
from .tools import ToolFormat

log = logging.getLogger("fate.serve")
PAGE = Path(__file__).with_name("static") / "chat.html"


@dataclass(frozen=True)
class ServeConfig:
    """The flags of fate-serve beyond those that load the engine."""

    model_name: str
    max_queue: int = 8
    request_timeout_s: float = 600.0
    conversation_bytes: int = 256 << 20
    max_body_bytes: int = 8 << 20  # a larger body is a 413 before it is read in full
    strict_model_name: bool = False  # a request naming another model is a 404 (else it is served, and logged)
    api_key: str | None = None  # a bearer key every /v1 and /metrics request must carry
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API


class Server:
    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.metrics = Metrics()
        self.conversations = ConversationCache(config.conversation_bytes)
        self.scheduler = Scheduler(EngineRunner(engine, self.conversations, self.metrics), config.max_queue,
                                   self.metrics, log_request)
        self.created = int(time.time())
        self.size_bytes = _artifact_bytes(engine.model.artifact.root)  # once: /v1/models answers from it
        self.names_seen: set[str] = set()
        self._vocabulary: Vocabulary | None = None
        self._vocabulary_lock = threading.Lock()
        routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        middleware = []
        if config.cors_origins:  # outside the key check: a browser's preflight carries no key
            middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                         allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                                         max_age=600))
        if config.api_key:
            middleware.append(Middleware(KeyCheck, key=config.api_key))
        self.app = Starlette(routes=routes, middleware=middleware,
                             exception_handlers={HTTPException: _http_error})

    def close(self) -> None:
        self.scheduler.close()

    # ------------------------------------------------------------------ endpoints

    def _model_entry(self) -> dict:
        model = self.engine.model
        store = model.experts  # the precisions it runs: all resident, or the run plan's per layer
        running = getattr(store, "precisions", None) or {i: p.precision for i, p in getattr(store, "plans", {}).items()}
        experts = sorted(set(running.values())) or list(model.manifest.precisions)
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "fate",
                "context_length": model.context,
                "quantization": f"experts {'/'.join(experts) or '-'}, dense {model.manifest.model.dense_precision}",
                "size_bytes": self.size_bytes}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_entry()]})

    async def model(self, request: Request) -> Response:
        wanted = request.path_params["model_id"]
        if wanted != self.config.model_name and self.config.strict_model_name:
            return _error(ApiError(404, f"The model '{wanted}' does not exist; this server has "
                                        f"'{self.config.model_name}'", "model", "not_found_error"))
        return JSONResponse({**self._model_entry(), "id": wanted})

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.model_name})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "text")

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, "chat")

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

    async def _body(self, request: Request, endpoint: str) -> dict:
        try:
            body = json.loads(await self._read(request))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        check_fields(body, endpoint)
        model = body.get("model")
        if model is not None and model != self.config.model_name:
            if self.config.strict_model_name or not isinstance(model, str):
                raise ApiError(404, f"The model '{model}' does not exist; this server has "
                                    f"'{self.config.model_name}'", "model", "not_found_error")
            if model not in self.names_seen and len(self.names_seen) < 64:
                self.names_seen.add(model)
                log.info("- a request names model %r: one model is served, %r (--strict-model-name refuses others)",
                         model, self.config.model_name)
        return body

    async def _serve(self, request: Request, endpoint: str) -> Response:
        try:
            body = await self._body(request, endpoint)
            try:  # templates, tokenizers and grammars take time on long inputs: not on the event loop
                work = await run_in_threadpool(self._prepare, body, endpoint)
            except FateError as e:  # a chat template that runs away, a tokenizer that fails, a bad schema
                raise ApiError(400, str(e)) from None
            return await self._respond(request, work)
        except ApiError as e:
            self.metrics.failed(e.status)
            log.info("- %d %s", e.status, e.message)
            return _error(e)
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

    def _prepare(self, body: dict, endpoint: str) -> "Work":
        """The request as the engine takes it: token ids, settings, and a grammar's constraint."""
        codec, tools, echo = self.engine.codec, Tools(), ""
        if endpoint == "chat":
            messages = chat_messages(body)
            if not codec.chat_template:
                raise ApiError(400, "this model has no chat template: use /v1/completions, or start fate-serve "
                                    "with --chat-template FILE", "messages")
            tools = chat_tools(body, codec.chat_template)
            self._check_length(sum(len(m["content"] or "") for m in messages) + len(json.dumps(tools.listed or [])),
                               "messages")
            ids = codec.chat_ids(messages, tools.listed)
            grammar = response_grammar(body)
            if grammar is not None and tools.grammar is not None:
                raise ApiError(400, "'response_format' and a forced 'tool_choice' cannot both shape one answer",
                               "response_format")
            grammar = tools.grammar or grammar
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
            self._check_length(len(prompt), "prompt")
            ids, grammar = codec.encode(prompt), None
            echo = prompt
        params = parse_params(body, len(ids), self.engine.model.context, self.engine.model.spec.vocab_size, endpoint)
        constraint = self.vocabulary().matcher(grammar) if grammar is not None else None
        special = tools.fmt is not None and codec.tokenizer.token_to_id(tools.fmt.start) is not None
        return Work(endpoint, ids, params, constraint, tools.fmt, echo if params.echo else "", special)

    def vocabulary(self) -> Vocabulary:
        """llguidance's view of the tokenizer, built at the first request with a grammar."""
        with self._vocabulary_lock:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(self.engine.codec, self.engine.model.spec.vocab_size)
            return self._vocabulary

    async def _respond(self, request: Request, work: "Work") -> Response:
        params = work.params
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(work.ids, params.max_tokens, params.sampling, params.stops,
                  time.monotonic() + self.config.request_timeout_s,
                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event), params.ignore_eos,
                  constraint=work.constraint, logprobs=params.logprobs,
                  prompt_logprobs=bool(work.echo) and params.logprobs is not None, special=work.special)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        scores = Logprobs(self.engine.codec.token_bytes, work.endpoint == "chat") if params.logprobs is not None \
            else None
        shape = ChatShape(job.id, self.config.model_name, scores, work.tools) if work.endpoint == "chat" else \
            TextShape(job.id, self.config.model_name, scores)
        if params.stream:
            return StreamingResponse(self._sse(job, events, shape, work), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, job, events, shape, work)

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
            if event[0] in ("done", "error"):
                return

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue, shape, work: "Work") -> Response:
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            pieces = [work.echo] if work.echo and not job.prompt_logprobs else []  # else it comes with its scores
            async for event in _until(self._events(job, events), gone):
                if event[0] == "prompt":
                    pieces.append(work.echo)
                    shape.prompt(work.echo, event[1])
                elif event[0] == "text":
                    pieces.append(event[1])
                    shape.chunks(event[1], event[2])
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

    async def _sse(self, job: Job, events: asyncio.Queue, shape, work: "Work"):
        try:
            if work.echo and not job.prompt_logprobs:
                for chunk in shape.prompt(work.echo, None):
                    yield _data(chunk)
            async for event in self._events(job, events):
                if event[0] == "prompt":
                    for chunk in shape.prompt(work.echo, event[1]):
                        yield _data(chunk)
                elif event[0] == "text":
                    for chunk in shape.chunks(event[1], event[2]):
                        yield _data(chunk)
                elif event[0] == "error":
                    yield _data({"error": {"message": event[2], "type": "server_error", "param": None,
                                           "code": event[1]}})
                elif event[1] is not None and event[1].finish_reason == "timeout":
                    message = f"the request timed out after {self.config.request_timeout_s:g} s"
                    yield _data({"error": {"message": message, "type": "timeout_error", "param": None, "code": 504}})
                elif event[1] is not None:
                    for chunk in shape.last(event[1], work.params.include_usage):
                        yield _data(chunk)
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


@dataclass(frozen=True)
class Work:
    """A checked request, ready for the engine."""

    endpoint: str  # chat or text
    ids: list[int]
    params: Params
    constraint: GrammarConstraint | None
    tools: ToolFormat | None  # the format calls are read back in; None: no tools
    echo: str  # completions' echo: the prompt, given back first
    special: bool


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, a method a route does not take) in OpenAI's shape."""
    what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return _error(ApiError(exc.status_code, what.get(exc.status_code, str(exc.detail)),
                           kind="not_found_error" if exc.status_code == 404 else "invalid_request_error",
                           headers=getattr(exc, "headers", None)))


class KeyCheck:
    """--api-key: /v1 and /metrics need `Authorization: Bearer KEY` (compared in constant time);
    the chat page and /health do not."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and \
                (scope["path"].startswith("/v1") or scope["path"] == "/metrics"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                log.info("- 401 a request without the API key")
                response = _error(ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                           kind="invalid_request_error", code="invalid_api_key",
                                           headers={"WWW-Authenticate": "Bearer"}))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _artifact_bytes(root: Path) -> int:
    """An artifact's size on disk: its folder's files, or its .fate archive."""
    root = Path(root)
    return root.stat().st_size if root.is_file() else sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


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
