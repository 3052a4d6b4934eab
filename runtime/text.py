"""Text in and out: the artifact's tokenizer, its chat template, and streaming detokenization."""

from __future__ import annotations

from fate.artifacts import Artifact, ArtifactError, GenerationError
from fate.artifacts import layout


class TextCodec:
    def __init__(self, artifact: Artifact, verify: bool = True):
        from tokenizers import Tokenizer

        spec = artifact.manifest.tokenizer
        path = layout.tokenizer_file("tokenizer.json")
        if path not in spec.files:
            raise ArtifactError(f"{artifact.root} has no tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_str(artifact.read_bytes(path, verify=verify).decode("utf-8"))
        except ArtifactError:
            raise
        except Exception as e:
            raise ArtifactError(f"{artifact.member(path).label} cannot be loaded: {e}") from None
        self.chat_template = spec.chat_template
        self.eos_ids = set(spec.eos_token_ids)
        self.bos_token = self._token(spec.bos_token_id)
        self.eos_token = self._token(spec.eos_token_ids[0])

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tokenizer.id_to_token(token_id) or "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, user_message: str, system: str | None = None) -> list[int]:
        """Token ids of the model's chat template applied to one user turn."""
        if not self.chat_template:
            raise GenerationError("this model has no chat template; run without --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": user_message}]
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # template errors are the artifact's, not a bug of ours
            raise GenerationError(f"the model's chat template failed: {e}") from None
        return self.encode(text, add_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back an incomplete UTF-8
    character (shown as U+FFFD by the decoder) until the next token completes it."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        """What is still held back when generation ends (an incomplete character stays U+FFFD)."""
        text = self.codec.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
