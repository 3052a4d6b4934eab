"""Qwen3.5-MoE as released (Qwen3_5MoeForConditionalGeneration, `qwen3_5_moe`): its language model
only, read from `text_config` and the tensors under `model.language_model.`; the vision tower
(`model.visual.`) and the multi-token-prediction module (`mtp.`) are not run, so skipped."""

from fate.artifacts import ModelError

from .base import Family
from .qwen3_5_moe_text import FAMILY as TEXT
from .qwen3_5_moe_text import read_config as read_text_config
from .qwen3_5_moe_text import tensors


def read_config(cfg: dict):
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ModelError("config.json: a qwen3_5_moe checkpoint needs its text_config")
    # the multimodal model ties its LM head by its own top-level key; special tokens may sit there too
    merged = {**{k: cfg[k] for k in ("eos_token_id", "bos_token_id") if k in cfg}, **text}
    if "tie_word_embeddings" in cfg:
        merged["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return read_text_config(merged)


FAMILY = Family(
    model_type="qwen3_5_moe",
    architecture="Qwen3_5MoeForConditionalGeneration",
    read_config=read_config,
    tensors=tensors("model.language_model."),
    skip=TEXT.skip + (r"model\.visual\..*",),
    layouts=TEXT.layouts,
)
