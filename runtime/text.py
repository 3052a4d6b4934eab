"""Text in and out: the artifact's tokenizer, its chat template, and streaming detokenization."""

from __future__ import annotations

import functools
import sys
import time

from fate.artifacts import Artifact, ArtifactError, GenerationError
from fate.artifacts import layout
from fate.artifacts.inputs import with_stderr_held

# A chat template is code from the artifact: it renders in Jinja's sandbox within these bounds.
TEMPLATE_SECONDS = 2.0
TEMPLATE_MAX_CHARS = 1 << 22


class _TemplateBudget(Exception):
    pass


def render_template(template: str, **context) -> str:
    """Render a Jinja template from an artifact in the immutable sandbox, refusing (GenerationError)
    one that runs longer than TEMPLATE_SECONDS or writes more than TEMPLATE_MAX_CHARS: a template
    that loops must not hang the command."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                    abs(right) * max(1, abs(left).bit_length()) > 1 << 16:
                raise SecurityError("an exponent too large")
            if operator == "*":  # a sequence times a count, either way round
                for items, count in ((left, right), (right, left)):
                    if isinstance(count, int) and hasattr(items, "__len__") and len(items) * count > TEMPLATE_MAX_CHARS:
                        raise SecurityError("a repetition too large")
            return super().call_binop(context, operator, left, right)

    deadline = time.monotonic() + TEMPLATE_SECONDS

    def trace(frame, event, arg):  # line events in the template's own code: every loop turn
        if frame.f_code.co_filename != "<template>":
            return None
        if time.monotonic() > deadline:
            raise _TemplateBudget(f"it ran longer than {TEMPLATE_SECONDS:g} s")
        return trace

    env = Bounded(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):  # what Hugging Face templates call to refuse a conversation (as transformers)
        from jinja2.exceptions import TemplateError

        raise TemplateError(str(message))

    env.globals["raise_exception"] = raise_exception
    pieces, size = [], 0
    previous = sys.gettrace()
    try:
        compiled = env.from_string(template)
        sys.settrace(trace)
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                raise _TemplateBudget(f"it wrote more than {TEMPLATE_MAX_CHARS} characters")
            pieces.append(piece)
    except (_TemplateBudget, RecursionError, MemoryError) as e:
        raise GenerationError(f"the model's chat template was stopped: {e or 'too deep'}") from None
    except Exception as e:  # template errors are the artifact's, not a bug of ours
        raise GenerationError(f"the model's chat template failed: {e}") from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)


class TextCodec:
    def __init__(self, artifact: Artifact, verify: bool = True):
        from tokenizers import Tokenizer

        spec = artifact.manifest.tokenizer
        path = layout.tokenizer_file("tokenizer.json")
        if path not in spec.files:
            raise ArtifactError(f"{artifact.root} has no tokenizer.json")
        self.label = artifact.member(path).label
        data = artifact.read_bytes(path, verify=verify)
        self.tokenizer = self._guarded("load", lambda: Tokenizer.from_str(data.decode("utf-8")), held=True)
        self._guarded("encode text", lambda: self.tokenizer.encode("Fate checks its tokenizer: 12 ü ∑ 🙂"), held=True)
        self.chat_template = spec.chat_template
        self.eos_ids = set(spec.eos_token_ids)
        self.bos_token = self._token(spec.bos_token_id)
        self.eos_token = self._token(spec.eos_token_ids[0])

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (a byte-level token's string has one per byte):
        a text of n characters is at least n / this many tokens, known before encoding it. Listed
        once, when first asked (fate-serve's first request), not at every start."""
        return max(1, max(map(len, self._guarded("list its vocabulary", self.tokenizer.get_vocab)), default=1))

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tokenizer.id_to_token(token_id) or "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._guarded("encode text",
                             lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids,
                             held=True)

    def decode(self, ids: list[int], special: bool = False) -> str:
        """Text of `ids`; `special`: special tokens written out (a tool-call marker that is one)."""
        return self._guarded("decode tokens", lambda: self.tokenizer.decode(ids, skip_special_tokens=not special))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level token may be part of a character, which
        decode() would show as U+FFFD): what OpenAI's logprobs give as `bytes`."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return self.decode([token_id], special=True).encode("utf-8")

    @functools.cached_property
    def _byte_level(self) -> bool:
        import json

        decoder = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        return decoder.get("type") == "ByteLevel" or any(
            d.get("type") == "ByteLevel" for d in decoder.get("decoders", []) if isinstance(d, dict))

    def _guarded(self, what: str, call, held: bool = False):
        """A tokenizer is data from the artifact that runs as code (regexes, normalizers): whatever
        the tokenizers library raises, including a Rust panic (pyo3's PanicException, a
        BaseException), is one error naming the file. `held`: the panic's own message and backtrace,
        which Rust writes to stderr, are kept off it (loading and encoding; decoding, once per token,
        is not held: its panics are one error too, after Rust's lines)."""
        try:
            return with_stderr_held(call) if held else call()
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001
            detail = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise ArtifactError(f"{self.label}: the tokenizer cannot {what}: {detail}") from None

    def chat_prompt(self, user_message: str, system: str | None = None) -> list[int]:
        """Token ids of the model's chat template applied to one user turn."""
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": user_message}]
        return self.chat_ids(messages)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the model's chat template applied to a conversation ({role, content} each,
        and what else a message carries: tool_calls, tool_call_id), ending where the assistant's
        reply begins; `tools` as Hugging Face templates take them."""
        if not self.chat_template:
            raise GenerationError("this model has no chat template; run without --chat, or give one with --chat-template")
        text = render_template(self.chat_template, messages=messages, add_generation_prompt=True,
                               bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)
        return self.encode(text, add_special_tokens=False)

    def use_template(self, path: str) -> None:
        """--chat-template FILE: a Jinja chat template in place of the artifact's, checked on one turn now."""
        try:
            with open(path, encoding="utf-8") as f:
                template = f.read(TEMPLATE_MAX_CHARS + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise GenerationError(f"--chat-template {path}: cannot read it ({getattr(e, 'strerror', None) or e})") \
                from None
        if not template.strip() or len(template) > TEMPLATE_MAX_CHARS:
            raise GenerationError(f"--chat-template {path}: empty, or over {TEMPLATE_MAX_CHARS} characters")
        previous, self.chat_template = self.chat_template, template
        try:
            self.chat_ids([{"role": "user", "content": "Hello"}])
        except GenerationError as e:
            self.chat_template = previous
            raise GenerationError(f"--chat-template {path}: {e}") from None


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what ByteLevel pre-tokenizers write each byte as), inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _bytes_to_unicode()


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back an incomplete UTF-8
    character (shown as U+FFFD by the decoder) until the next token completes it. A character
    spans at most 4 bytes, so a replacement character that 4 more tokens have not completed is
    invalid for good and is emitted as it is: sampled text that is a run of stray bytes still
    streams, instead of appearing all at once at the end.

    Each token decodes a window of the last few tokens, not the whole text (which made a long
    generation quadratic): once everything decoded so far has been emitted and ends in a complete
    character, the window restarts CONTEXT tokens back, those tokens' text counted as emitted. The
    context keeps what a decoder does at the start of a text (a leading space stripped) away from
    the tokens still to come."""

    MAX_HELD = 4
    CONTEXT = 8

    def __init__(self, codec: TextCodec, special: bool = False):
        self.codec = codec
        self._decode = (lambda ids: codec.decode(ids, special=True)) if special else codec.decode
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:]
        self.emitted = 0  # characters of the window's text already given out
        self.held = 0  # tokens since the text last ended in a complete character

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decode(self.ids[self.start:])
        if text.endswith("\ufffd") and self.held < self.MAX_HELD:
            self.held += 1
            text = text.rstrip("\ufffd")  # what is before the incomplete character is final
        else:
            self.held = 0
        piece, self.emitted = text[self.emitted:], max(self.emitted, len(text))
        if self.held == 0 and self.emitted == len(text) and len(self.ids) - self.start > 2 * self.CONTEXT:
            self.start = len(self.ids) - self.CONTEXT
            self.emitted = len(self._decode(self.ids[self.start:]))
        return piece

    def flush(self) -> str:
        """What is still held back when generation ends (an incomplete character stays U+FFFD)."""
        text = self._decode(self.ids[self.start:])
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
