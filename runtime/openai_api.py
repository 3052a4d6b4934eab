"""OpenAI's request and response bodies for fate-serve: every field a request may carry, checked
(one that would change the output and is not implemented is a 400 naming it, never ignored), the
conversation as a chat template takes it, and the JSON of answers, whole and streamed. No HTTP
here (runtime/server.py) and no engine (runtime/serving.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from fate.artifacts import FateError

from .generate import SamplingConfig, TokenLogprob, penalty_problem
from .grammar import Grammar, json_grammar
from .serving import Outcome
from .tools import ToolCall, ToolFormat, ToolStream, checked_tools, split_calls, tool_format

MAX_STOPS = 4  # as OpenAI
# A stop string longer than any a client needs costs every token of its request (the matcher is linear
# in it): bounded, as is the body of a request (ServeConfig.max_body_bytes).
MAX_STOP_CHARS = 4096
MAX_TOP_LOGPROBS = {"chat": 20, "text": 5}  # as OpenAI
MAX_LOGIT_BIAS = 300  # entries, as OpenAI

# Fields that describe a request and change nothing in its output: accepted as they are.
METADATA = frozenset({"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"})
SAMPLING = frozenset({"max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stop", "seed",
                      "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos",
                      "logprobs"})
FIELDS = {
    "chat": METADATA | SAMPLING | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                   "tool_choice", "modalities"},
    "text": METADATA | SAMPLING | {"prompt", "echo", "suffix", "best_of"},
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers, self.code = \
            status, message, param, kind, headers, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def check_fields(body: dict, endpoint: str) -> None:
    """Refuse what this server does not do: unknown fields and values it cannot honor, by name."""
    unknown = sorted(set(body) - FIELDS[endpoint])
    if unknown:
        raise ApiError(400, f"'{unknown[0]}' is not supported by fate-serve (it would change the output and is not "
                            "implemented)", unknown[0])
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "'suffix' (fill in the middle) is not supported by fate-serve", "suffix")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "only best_of=1 is supported: one engine generates one sequence at a time", "best_of")
    if body.get("modalities") not in (None, ["text"]):
        raise ApiError(400, "only the text modality is supported", "modalities")


@dataclass(frozen=True)
class Params:
    """One request's generation settings, checked."""

    max_tokens: int
    sampling: SamplingConfig
    stops: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    logprobs: int | None  # None: none asked for; else how many alternatives per token
    echo: bool = False


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


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false", name)
    return value


def parse_params(body: dict, prompt_tokens: int, context: int, vocab_size: int, endpoint: str) -> Params:
    chat = endpoint == "chat"
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported: one engine generates one sequence at a time", "n")
    stream = _flag(body, "stream")
    room = context - prompt_tokens
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: asked}, name, int, room if chat else 16, 1, None)
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
    min_p = _number(body, "min_p", float, 0.0, 0.0, 1.0)
    presence = _number(body, "presence_penalty", float, 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", float, 0.0, -2.0, 2.0)
    repetition = _number(body, "repetition_penalty", float, 1.0, 0.0, 10.0)
    if penalty_problem(min_p, presence, frequency, repetition):
        raise ApiError(400, penalty_problem(min_p, presence, frequency, repetition), "repetition_penalty")
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
                                  top_p=top_p, seed=seed, min_p=min_p, presence_penalty=presence,
                                  frequency_penalty=frequency, repetition_penalty=repetition,
                                  logit_bias=_logit_bias(body.get("logit_bias"), vocab_size))
    except FateError as e:
        raise ApiError(400, str(e)) from None
    return Params(max_tokens, sampling, stops, stream, bool(options.get("include_usage", True)),
                  _flag(body, "ignore_eos"), _logprobs(body, endpoint), False if chat else _flag(body, "echo"))


def _logit_bias(bias, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"'logit_bias' must map at most {MAX_LOGIT_BIAS} token ids to numbers", "logit_bias")
    out = []
    for key, value in bias.items():
        if not (str(key).isdigit() and int(key) < vocab_size):
            raise ApiError(400, f"'logit_bias': {key!r} is not a token id below {vocab_size}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias': the bias of {key} must be a number in [-100, 100]", "logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def _logprobs(body: dict, endpoint: str) -> int | None:
    most = MAX_TOP_LOGPROBS[endpoint]
    if endpoint == "chat":
        wanted = _flag(body, "logprobs")
        top = _number(body, "top_logprobs", int, 0, 0, most)
        if body.get("top_logprobs") is not None and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return top if wanted else None
    return _number(body, "logprobs", int, None, 0, most)


# ---------------------------------------------------------------------- chat messages

def chat_messages(body: dict) -> list[dict]:
    """The conversation as a chat template takes it: text parts joined, an assistant's tool calls
    with their arguments as objects (as Hugging Face templates write them), tool results kept."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a 'role'", "messages")
        role = m["role"]
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"{where}: unknown role {role!r}", "messages")
        message = {"role": "system" if role == "developer" else role, "content": _content(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = _past_calls(m["tool_calls"], where)
        elif message["content"] is None:
            raise ApiError(400, f"{where}: 'content' is required", "messages")
        if role == "tool":
            if not isinstance(m.get("tool_call_id", ""), str):
                raise ApiError(400, f"{where}: 'tool_call_id' must be a string", "messages")
            message["tool_call_id"] = m.get("tool_call_id", "")
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


def _content(content, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: 'content' must be a string or a list of parts", "messages")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if isinstance(kind, str) else "a part that is not {type, text}"
            raise ApiError(400, f"{where}.content[{j}] is {what}: this model takes text parts only", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def _past_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise ApiError(400, f"{where}: 'tool_calls' must be a list", "messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ApiError(400, f"{where}.tool_calls[{j}] must hold a function with a name", "messages")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise ApiError(400, f"{where}.tool_calls[{j}]: 'arguments' is not JSON", "messages") from None
        out.append({"id": call.get("id", ""), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


@dataclass(frozen=True)
class Tools:
    """What a chat request's tools ask for: the list the template renders (None: none), the format
    calls are read back in, and the grammar a forced choice imposes."""

    listed: list[dict] | None = None
    fmt: ToolFormat | None = None
    grammar: Grammar | None = None


def chat_tools(body: dict, template: str | None) -> Tools:
    if body.get("tools") is None:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return Tools()
    try:
        tools = checked_tools(body["tools"])
    except FateError as e:
        raise ApiError(400, str(e), "tools") from None
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return Tools()
    fmt = tool_format(template)
    if fmt is None:
        raise ApiError(400, "this model's chat template does not render tools in a format fate-serve reads back "
                            "(give one that does with --chat-template)", "tools")
    if choice == "auto":
        return Tools(tools, fmt)
    if choice == "required":
        return Tools(tools, fmt, fmt.grammar(tools))
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "'tool_choice' must be none, auto, required or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", "tool_choice")
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise ApiError(400, f"'tool_choice' names {name!r}, which is not in 'tools'", "tool_choice")
    return Tools(tools, fmt, fmt.grammar(chosen))


def response_grammar(body: dict) -> Grammar | None:
    """`response_format`: text (None), json_object, or json_schema."""
    spec = body.get("response_format")
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None)
    if kind == "json_schema":
        schema = spec.get("json_schema")
        schema = schema.get("schema") if isinstance(schema, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "'response_format' json_schema needs {\"json_schema\": {\"name\": ..., "
                                "\"schema\": {...}}}", "response_format")
        try:
            return json_grammar(schema)
        except FateError as e:
            raise ApiError(400, str(e), "response_format") from None
    raise ApiError(400, "'response_format' type must be text, json_object or json_schema", "response_format")


# ---------------------------------------------------------------------- answers

def usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def timings(outcome: Outcome) -> dict:
    """llama-server's `timings` (what its web page shows), and the experts' share of the work."""
    per_token = outcome.bytes_read / outcome.completion_tokens if outcome.completion_tokens else 0.0
    return {"prompt_n": outcome.prompt_tokens, "prompt_per_second": outcome.prefill_tokens_per_s,
            "predicted_n": outcome.completion_tokens, "predicted_per_second": outcome.decode_tokens_per_s,
            "ttft_s": outcome.time_to_first_token_s, "expert_bytes_read": outcome.bytes_read,
            "expert_bytes_read_per_token": per_token, "expert_hit_rate": outcome.hit_rate}


def finish(outcome: Outcome, called: bool = False) -> str:
    """OpenAI's finish reasons (a timed-out request is an error, never a finish)."""
    return "tool_calls" if called else "stop" if outcome.finish_reason == "stop" else "length"


class Logprobs:
    """Token log-probabilities in OpenAI's two shapes (chat: content list; completions: parallel lists)."""

    def __init__(self, token_bytes, chat: bool):
        self.token_bytes, self.chat = token_bytes, chat
        self.offset = 0

    def _text(self, token: int) -> tuple[str, list[int]]:
        raw = self.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def of(self, scored: list[TokenLogprob]) -> dict:
        if self.chat:
            content = []
            for s in scored:
                text, raw = self._text(s.token)
                content.append({"token": text, "logprob": s.logprob, "bytes": raw, "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": b} for t, b, lp in
                    ((*self._text(i), lp) for i, lp in s.top)]})
            return {"content": content, "refusal": None}
        tokens, values, tops, offsets = [], [], [], []
        for s in scored:
            text = self._text(s.token)[0]
            tokens.append(text)
            values.append(s.logprob)
            tops.append({self._text(i)[0]: lp for i, lp in s.top} if s.logprob is not None else None)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def merge(self, parts: list[dict]) -> dict | None:
        if not parts:
            return None
        if self.chat:
            return {"content": [c for p in parts for c in p["content"]], "refusal": None}
        return {k: [v for p in parts for v in p[k]] for k in parts[0]}


class TextShape:
    """/v1/completions bodies."""

    object_whole, object_chunk, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, job_id: str, model: str, logprobs: Logprobs | None):
        self.id, self.model, self.created = f"{self.prefix}-{job_id}", model, int(time.time())
        self.logprobs = logprobs
        self.scored: list[dict] = []

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _scored(self, scored) -> dict | None:
        if self.logprobs is None or scored is None:
            return None
        part = self.logprobs.of(scored)
        self.scored.append(part)
        return part

    def prompt(self, text: str, scored) -> list[dict]:
        """Echo: the prompt as the first text."""
        return self.chunks(text, scored)

    def chunks(self, text: str, scored) -> list[dict]:
        return [{**self._base(self.object_chunk), "choices": [
            {"index": 0, "text": text, "finish_reason": None, "logprobs": self._scored(scored)}]}]

    def last(self, outcome: Outcome, with_usage: bool) -> list[dict]:
        body = {**self._base(self.object_chunk), "choices": [
            {"index": 0, "text": "", "finish_reason": finish(outcome), "logprobs": None}], "timings": timings(outcome)}
        return [{**body, "usage": usage(outcome)} if with_usage else body]

    def whole(self, text: str, outcome: Outcome) -> dict:
        return {**self._base(self.object_whole), "usage": usage(outcome), "timings": timings(outcome), "choices": [
            {"index": 0, "text": text, "finish_reason": finish(outcome),
             "logprobs": self.logprobs.merge(self.scored) if self.logprobs else None}]}


class ChatShape(TextShape):
    """/v1/chat/completions bodies; with tools, the output read back into tool calls as it streams."""

    object_whole, object_chunk, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, job_id: str, model: str, logprobs: Logprobs | None, tools: ToolFormat | None):
        super().__init__(job_id, model, logprobs)
        self.first = True
        self.fmt = tools
        self.stream = ToolStream(tools) if tools else None
        self.calls = 0

    def _delta(self, delta: dict, scored=None) -> dict:
        if self.first:
            delta, self.first = {"role": "assistant", **delta}, False
        return {**self._base(self.object_chunk), "choices": [
            {"index": 0, "delta": delta, "finish_reason": None, "logprobs": self._scored(scored)}]}

    def _split(self, content: str, calls: list[ToolCall], scored) -> list[dict]:
        out = [self._delta({"content": content}, scored)] if content or scored else []
        for call in calls:
            out.append(self._delta({"tool_calls": [call.to_openai(self.calls)]}))
            self.calls += 1
        return out

    def chunks(self, text: str, scored) -> list[dict]:
        if self.stream is None:
            return [self._delta({"content": text}, scored)]
        return self._split(*self.stream.feed(text), scored)

    def last(self, outcome: Outcome, with_usage: bool) -> list[dict]:
        out = self._split(*self.stream.flush(), None) if self.stream else []
        body = {**self._base(self.object_chunk), "choices": [
            {"index": 0, "delta": {}, "finish_reason": finish(outcome, self.calls > 0), "logprobs": None}],
            "timings": timings(outcome)}
        return out + [{**body, "usage": usage(outcome)} if with_usage else body]

    def whole(self, text: str, outcome: Outcome) -> dict:
        content, calls = split_calls(self.fmt, text) if self.fmt else (text, [])
        message = {"role": "assistant", "content": content if content.strip() or not calls else None}
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        return {**self._base(self.object_whole), "usage": usage(outcome), "timings": timings(outcome), "choices": [
            {"index": 0, "message": message, "finish_reason": finish(outcome, bool(calls)),
             "logprobs": self.logprobs.merge(self.scored) if self.logprobs else None}]}
