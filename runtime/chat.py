"""fate-run's terminal chat: `fate-run ARTIFACT` with no prompt.

With a chat template, a conversation: the history goes through the template every turn, and the
keys and values of the previous turns are kept, so a turn prefills only its new tokens. Without
one, a prompt loop: each line is a prompt of its own. `/reset` forgets the history, Ctrl-D leaves,
Ctrl-C stops a reply (and, at the prompt, leaves). The stats line follows each reply on stderr.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from .api import Engine
from .conversations import ConversationCache
from .generate import GenerationResult, SamplingConfig, stream_tokens
from .text import StreamDecoder

HELP = "/reset forgets the conversation, /help shows this, Ctrl-D leaves, Ctrl-C stops a reply"


class Chat:
    def __init__(self, engine: Engine, sampling: SamplingConfig, max_new_tokens: int, system: str | None = None,
                 cache_bytes: int = 256 << 20):
        self.engine, self.sampling, self.max_new_tokens, self.system = engine, sampling, max_new_tokens, system
        self.templated = bool(engine.codec.chat_template)
        self.history: list[dict] = []
        self.kept = ConversationCache(cache_bytes if self.templated else 0)

    def reset(self) -> None:
        self.history = []
        self.kept = ConversationCache(self.kept.limit_bytes)

    def prompt_ids(self, line: str) -> list[int]:
        codec = self.engine.codec
        if not self.templated:
            return codec.encode(line)
        system = [{"role": "system", "content": self.system}] if self.system else []
        return codec.chat_ids(system + self.history + [{"role": "user", "content": line}])

    def reply(self, line: str, write: Callable[[str], None]) -> GenerationResult:
        """Generate the answer to one line, writing it as it comes; the history grows only by a
        reply that was not interrupted."""
        model, codec = self.engine.model, self.engine.codec
        ids = self.prompt_ids(line)
        room = model.context - len(ids)
        if room < 1:
            raise ContextFull(f"the conversation fills the context of {model.context} tokens: /reset to start anew")
        cache = self.kept.take(ids) or model.new_cache()
        result = GenerationResult(ids)
        decoder, pieces = StreamDecoder(codec), []
        try:
            for token in stream_tokens(model, ids, min(self.max_new_tokens, room), self.sampling, codec.eos_ids,
                                       result, cache):
                if token not in codec.eos_ids:
                    piece = decoder.push(token)
                    pieces.append(piece)
                    write(piece)
            rest = decoder.flush()
            pieces.append(rest)
            write(rest)
        except KeyboardInterrupt:
            result.stats.stop_reason = "interrupted"
            return result
        if self.templated:
            self.kept.put(ids + result.token_ids, cache)
            self.history += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(pieces)}]
        return result


class ContextFull(Exception):
    pass


def run_chat(engine: Engine, sampling: SamplingConfig, max_new_tokens: int, summary: Callable, name: str,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> None:
    chat = Chat(engine, sampling, max_new_tokens)
    terminal = stdin.isatty()
    kind = "a chat (the model's template)" if chat.templated else "a prompt loop (this model has no chat template)"
    print(f"fate-run: {name}, {kind}; {HELP}", file=stderr, flush=True)

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    while True:
        if terminal:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # Ctrl-D, or the end of piped input
            if terminal:
                stdout.write("\n")
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/reset":
            chat.reset()
            print("fate-run: the conversation is forgotten", file=stderr, flush=True)
            continue
        if line.strip() in ("/help", "/?"):
            print(f"fate-run: {HELP}", file=stderr, flush=True)
            continue
        try:
            result = chat.reply(line, write)
        except ContextFull as e:
            print(f"fate-run: {e}", file=stderr, flush=True)
            continue
        stdout.write("\n")
        stdout.flush()
        print(summary(engine, result), file=stderr, flush=True)
