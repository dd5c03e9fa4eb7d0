"""New weights for a model already served, read from files: a converted checkpoint, a Hugging
Face directory or a GGUF file of the same architecture. HF and GGUF tensors go through the
family's key table in memory (nothing is written to disk); a converted checkpoint is restored
straight into the served placements."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from model.config import ModelConfig, UnsupportedConfigError
from model.convert.transforms import ConversionError

LOAD_FORMATS = ("auto", "xlaserve", "hf", "safetensors", "gguf")
# What a fine-tune may change without changing the architecture: the dtype (cast to the
# served one) and the special tokens' ids (the served tokenizer's stay in force).
NOT_ARCHITECTURE = ("dtype", "bos_token_id", "eos_token_ids")


class UpdateError(ValueError):
    """The files cannot become the served model's weights (one line naming why)."""


def _kind(path: Path, load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise UpdateError(f"load_format {load_format!r} is not supported; one of {', '.join(LOAD_FORMATS)}")
    if not path.exists():
        raise UpdateError(f"{path}: no such file or directory")
    if load_format == "safetensors":
        load_format = "hf"
    if load_format != "auto":
        return load_format
    if path.is_file():
        return "gguf"
    return "xlaserve" if (path / "xlaserve.json").is_file() else "hf"


def same_architecture(new: ModelConfig, served: ModelConfig, path: Path) -> None:
    """Raise UpdateError naming the first field (of those that shape the computation) where
    ``new`` differs from ``served``."""
    for field in dataclasses.fields(ModelConfig):
        if field.name in NOT_ARCHITECTURE:
            continue
        a, b = getattr(new, field.name), getattr(served, field.name)
        if a != b:
            raise UpdateError(f"{path}: another architecture: {field.name} is {a!r}, the served model's is {b!r}")


def load_for_update(path: str | Path, load_format: str, served: ModelConfig, shardings: Any) -> Any:
    """The checkpoint param tree at ``path`` (numpy arrays, or device arrays already in
    ``shardings`` for a converted checkpoint), checked to be ``served``'s architecture.
    Raises UpdateError."""
    from model.checkpoint import CheckpointError, load_config, load_params
    from model.config import from_hf_config
    from model.convert.build import _with_model_prefix, build_params
    from model.convert.gguf import gguf_hf_config, gguf_reader, gguf_tensors
    from model.convert.sources import hf_tensors

    path = Path(path).expanduser()
    kind = _kind(path, load_format)
    try:
        if kind == "xlaserve":
            same_architecture(load_config(path), served, path)
            return load_params(path, served, shardings)
        if kind == "gguf":
            reader = gguf_reader(path)
            hf_cfg = gguf_hf_config(reader)
            tensors = gguf_tensors(reader, hf_cfg)
        else:
            config = path / "config.json"
            if not config.is_file():
                raise UpdateError(f"{path}: not a converted checkpoint nor a Hugging Face directory (no config.json)")
            hf_cfg = json.loads(config.read_text())
            tensors = _with_model_prefix(hf_tensors(path))
        new = from_hf_config(hf_cfg, served.dtype)
        # A GGUF file's rope factors, a tied head saved untied: what the converter settles
        # beyond config.json, the served config already has.
        new = dataclasses.replace(new, rope_scaling=served.rope_scaling) if kind == "gguf" else new
        same_architecture(new, served, path)
        return build_params(served, tensors, progress=False)
    except UpdateError:
        raise
    # Whatever the files' reader raises (a corrupt header, a truncated tensor, orbax's errors)
    # is about these files: the caller gets it as one line, and keeps serving the old weights.
    except (ConversionError, CheckpointError, UnsupportedConfigError, OSError, ValueError, KeyError) as e:
        raise UpdateError(f"{path}: {e}") from None
