"""The tokenizer and generation settings of a checkpoint, as the artifact stores them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fate.artifacts import ArtifactError, GenerationDefaults, ModelError, TokenizerSpec
from fate.artifacts import layout

from .checkpoint import read_json
from .families import ArchConfig
from .families.base import token_ids

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class TokenizerBundle:
    files: dict[str, bytes]
    spec: TokenizerSpec
    generation: GenerationDefaults | None


def _token_string(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _number(config: dict, key: str, default, kind: type):
    value = config.get(key)
    if value is None or value == 0:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ArtifactError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def read_tokenizer(model_dir: Path, cfg: ArchConfig) -> TokenizerBundle:
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{model_dir} has no tokenizer.json (Fate needs the fast-tokenizer file)")
    try:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception as e:
        raise ModelError(f"{model_dir / 'tokenizer.json'} cannot be loaded: {e}") from None
    files = {n: (model_dir / n).read_bytes() for n in TOKENIZER_FILES if (model_dir / n).is_file()}

    tok_cfg = read_json(model_dir / "tokenizer_config.json", "") if "tokenizer_config.json" in files else {}
    template = tok_cfg.get("chat_template")
    if "chat_template.jinja" in files:
        try:
            template = files["chat_template.jinja"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelError(f"{model_dir / 'chat_template.jinja'} is not UTF-8 text (byte {e.start})") from None
    if not isinstance(template, str):
        template = None  # lists of named templates are not supported; no template then

    gen_path = model_dir / "generation_config.json"
    gen_cfg = read_json(gen_path, "") if gen_path.is_file() else {}
    eos = token_ids(gen_cfg.get("eos_token_id")) or cfg.eos_token_ids
    if not eos and (eos_str := _token_string(tok_cfg.get("eos_token"))) is not None:
        eos = token_ids(tokenizer.token_to_id(eos_str))
    if not eos:
        raise ModelError(f"{model_dir}: no eos token id in generation_config.json, config.json or tokenizer_config.json")
    bos = gen_cfg.get("bos_token_id", cfg.bos_token_id)

    generation = None
    if gen_cfg:
        try:  # 0 or null means "not set" in transformers' configs
            generation = GenerationDefaults(
                do_sample=gen_cfg.get("do_sample", False) is True,
                temperature=_number(gen_cfg, "temperature", 1.0, float),
                top_p=_number(gen_cfg, "top_p", 1.0, float),
                top_k=_number(gen_cfg, "top_k", 0, int),
            )
        except ArtifactError as e:
            raise ModelError(f"{gen_path}: {e}") from None
    spec = TokenizerSpec(files=[layout.tokenizer_file(n) for n in files], eos_token_ids=eos,
                         bos_token_id=bos if isinstance(bos, int) else None, chat_template=template)
    return TokenizerBundle(files=files, spec=spec, generation=generation)
