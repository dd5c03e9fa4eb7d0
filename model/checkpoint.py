"""Loading a converted checkpoint directory (``xlaserve.json`` + orbax ``params/``)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import jax

from model.config import ModelConfig
from model.weights import abstract_params

FORMAT_VERSION = 1  # of the converted layout; tools/convert_hf.py writes it


def cache_dir() -> Path:
    """Where converted models, compiled XLA programs and native kernels are kept."""
    return Path(os.environ.get("XLASERVE_CACHE", Path.home() / ".cache" / "xlaserve"))


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """A short hash of this CPU's model and instruction-set flags. Machine code in the cache
    (native kernels, XLA's CPU programs) is kept under it: a cache made on one machine (a
    container image's, a shared home) is never run on a CPU that lacks its instructions."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    text += line
                if key in ("flags", "Features"):  # one processor's lines are enough
                    break
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class CheckpointError(Exception):
    """The directory is not a usable converted checkpoint."""


def is_converted(path: str | Path) -> bool:
    return (Path(path) / "xlaserve.json").is_file()


def load_config(path: str | Path) -> ModelConfig:
    meta_path = Path(path) / "xlaserve.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: cannot read ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('format_version')}, "
                              f"this xlaserve reads version {FORMAT_VERSION}; convert again")
    return ModelConfig.from_json(meta["config"])


def load_embedding(path: str | Path) -> dict[str, Any] | None:
    """An embedding checkpoint's pooling (``{"pooling": "last" | "mean" | "cls", "normalize":
    bool}``, as its sentence-transformers files said at conversion), or None for a
    generative one."""
    try:
        return json.loads((Path(path) / "xlaserve.json").read_text()).get("embedding")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read xlaserve.json ({e})") from None


def load_vision(path: str | Path):
    """A vision-language checkpoint's ``model.vision.VisionConfig`` (None: text only)."""
    from model.vision import VisionConfig

    try:
        meta = json.loads((Path(path) / "xlaserve.json").read_text()).get("vision")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read xlaserve.json ({e})") from None
    return None if meta is None else VisionConfig.from_json(meta)


def load_params(path: str | Path, cfg: ModelConfig, shardings: Any = None, dtype: str | None = None) -> Any:
    """Restore params straight into their target shardings (one device when None).

    ``dtype`` casts at restore time (orbax reads and casts per array), so a bfloat16 serve of a
    float32 checkpoint never holds the float32 copy on the device.
    """
    import orbax.checkpoint as ocp

    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    if shardings is None:
        device = jax.sharding.make_single_device_sharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_params(cfg))
    target = abstract_params(cfg, shardings)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore((Path(path) / "params").absolute(), target)
