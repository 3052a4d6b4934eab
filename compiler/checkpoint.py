"""A Hugging Face checkpoint directory, read one tensor at a time with plain file reads.

Accepts model.safetensors or sharded model-0000x-of-0000y.safetensors with
model.safetensors.index.json. The safetensors header is parsed and checked here (offsets inside
the file, sizes matching shapes and dtypes), and each tensor is read with one positioned read,
then dropped from the page cache: no memory map, so the compile's resident memory is what the
exporter holds, not the model size.

safetensors layout (from its format description): an 8-byte little-endian header length N, N
bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then
the data, offsets relative to its start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fate.artifacts import ModelError, hints
from fate.artifacts.inputs import load_json
from fate.artifacts.store import read_range

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 << 20

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def read_json(path: Path, what: str) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path} not found: {what}") from None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    # transformers writes NaN/Infinity where a config holds them: refused per field, not here
    data = load_json(raw, str(path), ModelError, finite=False)
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    length: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise ModelError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
            header = load_json(f.read(n), f"{path} (safetensors header)", ModelError)
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (bad header)")
    tensors = {}
    data_start = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: bad header entry for {name}") from None
        if not all(is_count(v) for v in (*shape, begin, end)):
            raise ModelError(f"{path}: tensor {name} has a shape or data_offsets that are not whole numbers >= 0")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise ModelError(f"{path}: tensor {name} has {end - begin} bytes for shape {list(shape)} {dtype}")
        if data_start + end > size:
            raise ModelError(f"{path} is truncated: tensor {name} ends past the end of the file")
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, end - begin)
    spans = sorted((t.start, t.start + t.length, name) for name, t in tensors.items() if t.length)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ModelError(f"{path}: tensors {first} and {second} overlap in the file")
    return tensors


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        hint = hints.for_checkpoint(str(model_dir))
        if hint:
            raise ModelError(hint)
        if not self.dir.is_dir():
            raise ModelError(f"{self.dir} is not a directory")
        self.config = read_json(self.dir / "config.json", "a checkpoint directory needs config.json")
        self.tensors: dict[str, TensorInfo] = {}
        for shard, expected in self._shards().items():
            found = read_header(self.dir / shard)
            if expected is not None and expected - set(found):
                missing = sorted(expected - set(found))[:3]
                raise ModelError(f"{self.dir / shard} lacks tensors that {INDEX} puts there, e.g. {', '.join(missing)}")
            self.tensors.update(found)

    def _shards(self) -> dict[str, set[str] | None]:
        """shard file name -> the tensor names the index puts there (None: no index)."""
        index = self.dir / INDEX
        if index.exists():
            weight_map = read_json(index, "").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelError(f"{index} has no weight_map")
            shards: dict[str, set[str]] = {}
            for name, shard in weight_map.items():
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                    raise ModelError(f"{index} names a shard outside the checkpoint: {shard!r}")
                shards.setdefault(shard, set()).add(name)
            return shards
        if (self.dir / SINGLE).exists():
            return {SINGLE: None}
        raise ModelError(f"{self.dir} holds no {SINGLE} and no {INDEX}")

    def names(self) -> set[str]:
        return set(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str, index: int | None = None, raw: bool = False, parts: int | None = None) -> np.ndarray:
        """The tensor (or, with `index`, its slice [index] along the first axis, e.g. one expert of
        a fused expert tensor; with `parts` too, block [index] of that many equal blocks of rows,
        e.g. one expert of experts stacked as [E * I, H]) as float32 numpy, bf16/fp16 widened, read
        with one positioned read; with `raw`, in its stored dtype (packed quantized data)."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelError(f"checkpoint {self.dir} has no tensor {name}")
        start, length, shape = info.start, info.length, info.shape
        if index is not None:
            parts = parts or shape[0]
            if shape[0] % parts or not 0 <= index < parts:
                raise ModelError(f"checkpoint tensor {name} {list(shape)} has no block {index} of {parts}")
            length //= parts
            rows = shape[0] // parts
            start, shape = start + index * length, (shape[1:] if parts == shape[0] else (rows, *shape[1:]))
        data = read_range(info.path, start, length, uncached=True)  # read once: no page-cache copy kept
        if len(data) != length:
            raise ModelError(f"{info.path} changed while reading {name}")
        stored = np.frombuffer(data, dtype=DTYPES[info.dtype]).reshape(shape)
        if raw:
            return stored
        if info.dtype not in FLOAT_DTYPES:
            raise ModelError(f"checkpoint tensor {name} is stored as {info.dtype}; a weight must be one of "
                             f"{', '.join(FLOAT_DTYPES)}")
        if info.dtype == "BF16":
            out = (stored.astype(np.uint32) << 16).view(np.float32)
        else:
            out = stored.astype(np.float32)
        if not np.isfinite(out).all():  # compiled on, it would be a garbage artifact without a word
            where = name if index is None else f"{name}[{index}]"
            raise ModelError(f"checkpoint tensor {where} holds NaN or infinite values (a damaged checkpoint)")
        return out


# MXFP4 (OCP microscaling): e2m1 codes, two per byte low nibble first, 32 per block sharing an
# e8m0 scale 2^(s - 127). Value table from the OCP MX specification, as transformers decodes it.
FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=np.float32)


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [rows, groups, 16], scales uint8 [rows, groups] -> float32 [rows, groups * 32]."""
    values = np.empty((*blocks.shape[:-1], blocks.shape[-1] * 2), np.float32)
    values[..., 0::2] = FP4_E2M1[blocks & 0x0F]
    values[..., 1::2] = FP4_E2M1[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return values.reshape(blocks.shape[0], -1)
