"""A Hugging Face checkpoint directory, read one tensor at a time.

Accepts model.safetensors or sharded model-0000x-of-0000y.safetensors with
model.safetensors.index.json. Tensors are read lazily (safetensors maps the file), so peak
memory is what the exporter holds, not the model size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fate.artifacts import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} not found: {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise ModelError(f"{self.dir} is not a directory")
        self.config = read_json(self.dir / "config.json", "a checkpoint directory needs config.json")
        self._where = self._locate_tensors()
        self._handles = {}
        for shard in sorted(set(self._where.values())):
            path = self.dir / shard
            try:
                handle = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise ModelError(f"{path} is missing (named by {INDEX})") from None
            except Exception as e:  # safetensors raises its own error type for bad headers
                raise ModelError(f"{path} is not a readable safetensors file: {e}") from None
            self._check_shard(path, handle)
            self._handles[shard] = handle

    def _locate_tensors(self) -> dict[str, str]:
        """tensor name -> shard file name."""
        index = self.dir / INDEX
        if index.exists():
            weight_map = read_json(index, "").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelError(f"{index} has no weight_map")
            for shard in set(weight_map.values()):
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                    raise ModelError(f"{index} names a shard outside the checkpoint: {shard!r}")
            return dict(weight_map)
        if (self.dir / SINGLE).exists():
            from safetensors import safe_open

            try:
                with safe_open(str(self.dir / SINGLE), framework="pt") as f:
                    return {name: SINGLE for name in f.keys()}
            except Exception as e:
                raise ModelError(f"{self.dir / SINGLE} is not a readable safetensors file: {e}") from None
        raise ModelError(f"{self.dir} holds no {SINGLE} and no {INDEX}")

    def _check_shard(self, path: Path, handle) -> None:
        """The index and the shard must agree. (safe_open itself refuses a truncated file.)"""
        keys = set(handle.keys())
        expected = {n for n, s in self._where.items() if s == path.name}
        if expected - keys:
            missing = sorted(expected - keys)[:3]
            raise ModelError(f"{path} lacks tensors that {INDEX} puts there, e.g. {', '.join(missing)}")

    def names(self) -> set[str]:
        return set(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 numpy (bf16/fp16 checkpoints are widened)."""
        if name not in self._where:
            raise ModelError(f"checkpoint {self.dir} has no tensor {name}")
        try:
            tensor = self._handles[self._where[name]].get_tensor(name)
        except Exception as e:
            raise ModelError(f"cannot read {name} from {self.dir / self._where[name]}: {e}") from None
        return tensor.float().numpy()
