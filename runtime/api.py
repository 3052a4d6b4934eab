"""The Python API: an artifact plus its tokenizer, with text in and text out.

    from fate.runtime import Engine
    engine = Engine.load("artifact_dir")       # or EngineOptions(memory_limit=8 * 2**30), or
                                               # EngineOptions(offload=OffloadOptions(parse_budget("25%")))
    print(engine.generate("Once upon a time", max_new_tokens=32).text)
    for piece in engine.stream("Once upon a time"):
        print(piece, end="", flush=True)
    logits = engine.logits(engine.encode("Hello"))      # [tokens, vocab]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .generate import GenerationResult, SamplingConfig, generate, stream_tokens
from .model import FateModel
from .options import EngineOptions
from .text import StreamDecoder, TextCodec


@dataclass
class Completion:
    text: str
    result: GenerationResult


class Engine:
    def __init__(self, model: FateModel, codec: TextCodec):
        self.model = model
        self.codec = codec

    @classmethod
    def load(cls, path: str | os.PathLike, options: EngineOptions | None = None) -> "Engine":
        """All experts resident, or as `options` say (runtime.options.EngineOptions: a budget of
        experts resident and the rest read ahead of need, a memory limit for the whole process, ...)."""
        options = options or EngineOptions()
        model = FateModel.load(path, options)
        return cls(model, TextCodec(model.artifact, verify=options.verify))

    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.codec.decode(ids)

    def prompt_ids(self, prompt: str, chat: bool = False) -> list[int]:
        return self.codec.chat_prompt(prompt) if chat else self.codec.encode(prompt)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model.logits(ids)

    def generate(self, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
                 chat: bool = False) -> Completion:
        result = generate(self.model, self.prompt_ids(prompt, chat), max_new_tokens, sampling, self.codec.eos_ids)
        return Completion(self.decode(result.token_ids), result)

    def stream(self, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
               chat: bool = False, result: GenerationResult | None = None) -> Iterator[str]:
        """Text pieces as tokens are generated; pass `result` to read ids and timings afterwards."""
        ids = self.prompt_ids(prompt, chat)
        result = result if result is not None else GenerationResult(ids)
        result.prompt_ids = ids
        decoder = StreamDecoder(self.codec)
        for token in stream_tokens(self.model, ids, max_new_tokens, sampling, self.codec.eos_ids, result):
            if token not in self.codec.eos_ids:
                piece = decoder.push(token)
                if piece:
                    yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def close(self) -> None:
        self.model.close()
