"""Tool calls: how a model's chat template asks for them, how its output is read back into calls
(whole or as it streams), and the grammar that forces one (runtime.grammar).

A family's format is a row of FORMATS: the text that opens a call, the text that closes it, and
the JSON inside. A template says which one it uses by naming its opening text; one that renders
`tools` but names none of them cannot have its calls read, and a request with tools is refused.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from fate.artifacts import GenerationError

from .grammar import Grammar, json_rule, lark_grammar


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (as OpenAI sends it)
    id: str = ""

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ToolFormat:
    """One family of tool-call syntax. `listed`: the body holds a JSON list of calls, not one."""

    name: str
    start: str
    end: str  # "" : the call runs to the end of the output
    listed: bool = False

    def calls(self, body: str) -> list[ToolCall] | None:
        """The calls a body holds, or None when it is not one (then it is text, as llama-server does)."""
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, RecursionError):
            return None
        items = value if self.listed and isinstance(value, list) else [value]
        calls = []
        for item in items:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):  # some models write the arguments as a JSON string
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False),
                                  f"call_{uuid.uuid4().hex[:24]}"))
        return calls or None

    def grammar(self, tools: list[dict]) -> Grammar:
        """Output that is exactly one call (a list of one, for listed formats) of one of `tools`."""
        choices = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                     "arguments": t["function"].get("parameters") or {"type": "object"}},
                    "required": ["name", "arguments"]} for t in tools]
        call = choices[0] if len(choices) == 1 else {"anyOf": choices}
        body = {"type": "array", "items": call, "minItems": 1, "maxItems": 1} if self.listed else call
        tail = f' "\\n" {json.dumps(self.end)}' if self.end else ""
        lark = f'start: {json.dumps(self.start)} "\\n"? call{tail}\ncall: {json_rule(body)}\n'
        names = ", ".join(t["function"]["name"] for t in tools)
        return lark_grammar(lark, f"a call of {names}")


# Qwen2/3 (-MoE), Hermes and most templates since: <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
# Mistral's (Mixtral's newer templates): [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
FORMATS = (
    ToolFormat("hermes", "<tool_call>", "</tool_call>"),
    ToolFormat("mistral", "[TOOL_CALLS]", "", listed=True),
)


def tool_format(template: str | None) -> ToolFormat | None:
    """The format a chat template uses, or None when it renders no tools or names no known format."""
    if not template or "tools" not in template:
        return None
    return next((f for f in FORMATS if f.start in template), None)


class ToolStream:
    """Splits streamed text into content and tool calls: text that could still be the start of a
    call is held back until the next piece decides; a call is given out once it is complete."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.pending = ""
        self.in_call = False

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        self.pending += piece
        content, calls = "", []
        while True:
            if not self.in_call:
                at = self.pending.find(self.fmt.start)
                if at < 0:
                    hold = _partial(self.pending, self.fmt.start)
                    content += self.pending[: len(self.pending) - hold]
                    self.pending = self.pending[len(self.pending) - hold:]
                    return content, calls
                content += self.pending[:at]
                self.pending, self.in_call = self.pending[at + len(self.fmt.start):], True
            if not self.fmt.end:
                return content, calls
            at = self.pending.find(self.fmt.end)
            if at < 0:
                return content, calls
            body, self.pending, self.in_call = self.pending[:at], self.pending[at + len(self.fmt.end):], False
            found = self.fmt.calls(body)
            if found is None:  # not a call after all: what the model wrote is text
                content += self.fmt.start + body + self.fmt.end
            else:
                calls += found

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end of the output: a call that is still open is read if it is whole JSON, else it is text."""
        rest, self.pending = self.pending, ""
        if not self.in_call:
            return rest, []
        self.in_call = False
        found = self.fmt.calls(rest)
        return ("", found) if found is not None else (self.fmt.start + rest, [])


def _partial(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def split_calls(fmt: ToolFormat, text: str) -> tuple[str, list[ToolCall]]:
    """A whole output's content and calls."""
    stream = ToolStream(fmt)
    content, calls = stream.feed(text)
    more, last = stream.flush()
    return content + more, calls + last


def checked_tools(tools) -> list[dict]:
    """OpenAI's `tools` as a template takes them, checked (GenerationError names what is wrong)."""
    if not isinstance(tools, list) or not tools:
        raise GenerationError("'tools' must be a non-empty list")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)
                and isinstance(function.get("name"), str) and function["name"]):
            raise GenerationError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise GenerationError(f"tools[{i}].function.parameters must be a JSON schema object")
        if function["name"] in names:
            raise GenerationError(f"tools[{i}]: the name {function['name']!r} is given twice")
        names.add(function["name"])
    return tools
