"""Llama-4 as released (Llama4ForConditionalGeneration, `llama4`: Scout, Maverick): its language model
only (llama4_text), read from `text_config` and the tensors under `language_model.`; the vision tower
(`vision_model.`) and its projector are not run, so skipped."""

from fate.artifacts import ModelError

from .base import Family
from .llama4_text import FAMILY as TEXT
from .llama4_text import read_config as read_text_config


def read_config(cfg: dict):
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ModelError("config.json: a llama4 checkpoint needs its text_config")
    # its language model ties its LM head as text_config says (the top-level key ties nothing of it)
    return read_text_config(text)


FAMILY = Family(
    model_type="llama4",
    architecture="Llama4ForConditionalGeneration",
    read_config=read_config,
    tensors={role: "language_model." + name for role, name in TEXT.tensors.items()},
    skip=TEXT.skip + (r"vision_model\..*", r"multi_modal_projector\..*"),
    layouts=TEXT.layouts,
)
