"""Hugging Face checkpoint readers: each yields (key, numpy array) one tensor at a time, so
peak memory stays one source tensor beyond the converted params."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from model.convert.transforms import ConversionError

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


def _read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Memory-mapped reader (numpy has no bfloat16, which the ``safetensors`` numpy API needs)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    except (OSError, ValueError, struct.error) as e:
        raise ConversionError(f"{path.name}: not a valid safetensors file ({e})") from None
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path.name}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.size:
            raise ConversionError(f"{path.name}: tensor {key} runs past the end of the file (truncated?)")
        yield key, data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path.name}: reading .bin checkpoints needs torch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ConversionError(f"{path.name}: not a readable PyTorch checkpoint ({e})") from None
    for key, t in state.items():
        yield key, t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _safetensors_files(src: Path) -> list[str]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in src.glob("*.safetensors"))


def hf_keys(src: Path) -> set[str] | None:
    """The tensor names of a safetensors checkpoint, from its headers (None for .bin files,
    which would have to be loaded whole)."""
    files = _safetensors_files(src)
    if not files:
        return None
    keys: set[str] = set()
    for name in files:
        try:
            with open(src / name, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                keys |= set(json.loads(f.read(n))) - {"__metadata__"}
        except (OSError, ValueError, struct.error) as e:
            raise ConversionError(f"{name}: not a valid safetensors file ({e})") from None
    return keys


def hf_tensors(src: Path) -> Iterator[tuple[str, np.ndarray]]:
    files = _safetensors_files(src)
    if files:
        for name in files:
            if not (src / name).exists():
                raise ConversionError(f"{name} is listed in the index but missing from {src}")
            yield from _read_safetensors(src / name)
        return
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weights found")
    for p in bins:
        yield from _read_torch_bin(p)
