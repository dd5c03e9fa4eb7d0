"""The conversion: (key, tensor) pairs through the family's key table into a checked param
tree, saved as a converted checkpoint directory (``xlaserve.json``, orbax ``params/``, the
tokenizer files).

It fails closed: an unmapped key, a missing or duplicate param, a shape that does not match
the weight spec, or a config attribute we do not implement is an error that names the key.
Output is written to a temporary sibling directory and renamed into place only when
complete: a failure leaves no half-written output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from model.checkpoint import FORMAT_VERSION
from model.config import ModelConfig, RopeScaling, UnsupportedConfigError, from_hf_config
from model.convert.gguf import gguf_hf_config, gguf_reader, gguf_rope_factors, gguf_tensors, gguf_tokenizer_files
from model.convert.sources import hf_keys, hf_tensors
from model.convert.transforms import ConversionError
from model import vision as vision_model
from model.weights import param_specs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
                   "preprocessor_config.json", "processor_config.json")
# Keys that carry no weights we need (derived buffers of old checkpoints).
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def _np_dtype(name: str):
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def _empty_tree(cfg: ModelConfig) -> dict[str, Any]:
    specs = param_specs(cfg)
    return {k: ([dict() for _ in v] if k == "layers" else None) for k, v in specs.items()}


def build_params(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], progress: bool = True) -> dict:
    """Consume (key, tensor) pairs through the family's table into a checked param tree."""
    from model.families import family  # its key tables import this package's transforms

    table = [(re.compile(p), fn) for p, fn in family(cfg.family).KEY_TABLE]
    specs = param_specs(cfg)
    out = _empty_tree(cfg)
    dtype = _np_dtype(cfg.dtype)
    total = sum(1 for _ in _iter_paths(specs))
    bar = _progress(total, progress)
    slices: dict[tuple, set[int]] = {}  # a stacked param (the experts) -> its slices given so far
    for key, tensor in tensors:
        if IGNORED.fullmatch(key):
            continue
        for pattern, fn in table:
            m = pattern.fullmatch(key)
            if m:
                break
        else:
            raise ConversionError(f"unexpected tensor {key!r}: no rule maps it for family {cfg.family}")
        if cfg.tie_word_embeddings and (key.endswith("lm_head.weight") or key == "output.weight"):
            continue  # tied: the head is the embedding; some checkpoints store a copy
        for path, value in fn(np.asarray(tensor, dtype=np.float32), cfg, m):
            if len(path) == 4:  # ("layers", i, name, j): slice j of a stacked param (one expert's)
                if _assign_slice(specs, out, slices, key, path, value, dtype):
                    bar.update(1)  # the stacked param is complete
                continue
            try:
                spec = _lookup(specs, path)
            except (KeyError, IndexError):
                raise ConversionError(f"tensor {key!r} maps to {'.'.join(map(str, path))}, "
                                      "which this model config does not have") from None
            if tuple(value.shape) != spec.shape:
                raise ConversionError(f"tensor {key!r}: shape {tuple(tensor.shape)} does not fit "
                                      f"{'.'.join(map(str, path))} {spec.shape}")
            if _lookup(out, path, missing_ok=True) is not None:
                raise ConversionError(f"tensor {key!r}: duplicate value for {'.'.join(map(str, path))}")
            _assign(out, path, np.ascontiguousarray(value.astype(dtype)))
            bar.update(1)
    bar.close()
    missing = [".".join(map(str, p)) for p in _iter_paths(specs) if _lookup(out, p, missing_ok=True) is None]
    for path, given in slices.items():
        n = _lookup(specs, path).shape[0]
        missing += [f"{'.'.join(map(str, path))}[{j}]" for j in range(n) if j not in given]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"checkpoint is missing params: {', '.join(missing[:5])}{more}")
    return out


def _assign_slice(specs, out, slices, key, path, value, dtype) -> bool:
    """Slice ``path[3]`` of the stacked param ``path[:3]``: the array is made on its first slice,
    and every slice must come exactly once. True when this slice completes it."""
    where, j = path[:3], path[3]
    try:
        spec = _lookup(specs, where)
    except (KeyError, IndexError):
        raise ConversionError(f"tensor {key!r} maps to {'.'.join(map(str, where))}, "
                              "which this model config does not have") from None
    if not 0 <= j < spec.shape[0]:
        raise ConversionError(f"tensor {key!r}: index {j} is past {'.'.join(map(str, where))}'s {spec.shape[0]}")
    if tuple(value.shape) != spec.shape[1:]:
        raise ConversionError(f"tensor {key!r}: shape {tuple(value.shape)} does not fit a slice of "
                              f"{'.'.join(map(str, where))} {spec.shape}")
    given = slices.setdefault(where, set())
    if j in given:
        raise ConversionError(f"tensor {key!r}: duplicate value for {'.'.join(map(str, where))}[{j}]")
    if not given:
        _assign(out, where, np.zeros(spec.shape, dtype))
    _lookup(out, where)[j] = value.astype(dtype)
    given.add(j)
    return len(given) == spec.shape[0]


def _iter_paths(specs) -> Iterator[tuple]:
    for k, v in specs.items():
        if k == "layers":
            for i, layer in enumerate(v):
                for name in layer:
                    yield ("layers", i, name)
        else:
            yield (k,)


def _lookup(tree, path, missing_ok=False):
    node = tree
    for p in path:
        if missing_ok and isinstance(node, dict) and p not in node:
            return None
        node = node[p]
    return node


def _assign(tree, path, value):
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="converting", unit="tensor", file=sys.stderr)


def save_checkpoint(dst: Path, cfg: ModelConfig, params: dict, source: str,
                    embedding: dict[str, Any] | None = None, vision: tuple | None = None) -> None:
    """``vision``: a vision tower's (VisionConfig, params), saved beside the language model's."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((dst / "params").absolute(), params)
    meta = {"format_version": FORMAT_VERSION, "config": cfg.to_json(), "source": source}
    if embedding is not None:
        meta["embedding"] = embedding
    if vision is not None:
        vision_model.save(dst, vision[1])
        meta["vision"] = vision[0].to_json()
    (dst / "xlaserve.json").write_text(json.dumps(meta, indent=2))


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
            progress: bool = True, generation: dict[str, Any] | None = None) -> Path:
    """Convert ``src`` (HF dir or .gguf file) into ``dst``; returns ``dst``. Atomic.
    ``generation``: sampling defaults to write into the output's ``generation_config.json``
    over the source's (a GGUF file carries none)."""
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    if dst.exists():
        raise ConversionError(f"{dst} already exists; remove it or choose another output path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        if src.is_file():
            _convert_gguf(src, tmp, dtype, progress)
        else:
            _convert_hf_dir(src, tmp, dtype, progress)
        if generation:
            path = tmp / "generation_config.json"
            gen = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**gen, **generation}, indent=2))
        # mkdtemp's directory is private (0700); the converted model is as readable as any
        # file this process writes (the umask decides), e.g. to a container that mounts it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.replace(tmp, dst)
    except UnsupportedConfigError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(str(e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _convert_hf_dir(src: Path, tmp: Path, dtype: str | None, progress: bool) -> None:
    config_path = src / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{src}: not a Hugging Face checkpoint (no config.json)")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_path}: invalid JSON ({e})") from None
    cfg = from_hf_config(hf_cfg, dtype)
    if not any((src / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConversionError(f"{src}: no tokenizer.json or tokenizer.model")
    embedding = sentence_transformers_pooling(src)
    keys = hf_keys(src)
    if embedding is not None and keys is not None and "lm_head.weight" not in keys and not cfg.tie_word_embeddings:
        # An embedding model saved without its head (Qwen3-Embedding-4B): the head is never
        # used for embeddings, so the embedding stands in for it rather than a copy.
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    vc = vision_model.from_hf_config(hf_cfg, cfg.hidden_size, cfg.dtype)
    tower: dict[str, np.ndarray] = {}

    def text_tensors():  # the tower's tensors are set aside for its own tree
        for key, tensor in _with_model_prefix(hf_tensors(src)):
            if vc is not None and vision_model.VISION_KEY.fullmatch(key):
                tower[key] = np.asarray(tensor, np.float32)
            else:
                yield key, tensor

    params = build_params(cfg, text_tensors(), progress)
    try:
        vision = None if vc is None else (vc, vision_model.build_params(vc, tower))
    except vision_model.VisionError as e:
        raise ConversionError(str(e)) from None
    save_checkpoint(tmp, cfg, params, source=str(src), embedding=embedding, vision=vision)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    # Generation defaults (EOS ids) may live only in config.json.
    if not (tmp / "generation_config.json").exists():
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id") if k in hf_cfg}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _with_model_prefix(tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Keys of a checkpoint saved from the bare model (``AutoModel``: ``layers.0...``, as
    embedding checkpoints are) under the ``model.`` prefix the key tables expect."""
    for key, tensor in tensors:
        yield (f"model.{key}" if BARE_KEY.match(key) else key), tensor


BARE_KEY = re.compile(r"(embed_tokens|layers|norm)\.")


def sentence_transformers_pooling(src: Path) -> dict[str, Any] | None:
    """The pooling of a sentence-transformers checkpoint (``modules.json`` naming a Pooling
    module and its ``config.json``; a Normalize module), or None when ``src`` has none."""
    path = src / "modules.json"
    if not path.exists():
        return None
    try:
        modules = json.loads(path.read_text())
        pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
        normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
        conf = json.loads((src / pooling["path"] / "config.json").read_text()) if pooling else {}
    except (OSError, json.JSONDecodeError, TypeError, AttributeError) as e:
        raise ConversionError(f"{path}: cannot read its sentence-transformers modules ({e})") from None
    if pooling is None:
        raise ConversionError(f"{path}: no Pooling module; xlaserve pools by last, mean or cls")
    # Older files flag each mode (pooling_mode_lasttoken: true); newer ones name it
    # (pooling_mode: "lasttoken").
    names = {"lasttoken": "last", "mean_tokens": "mean", "mean": "mean", "cls_token": "cls", "cls": "cls"}
    named = conf.get("pooling_mode")
    given = ([named] if isinstance(named, str) else list(named or [])) + [
        k.removeprefix("pooling_mode_") for k, v in conf.items() if k.startswith("pooling_mode_") and v is True]
    modes = sorted({names.get(m, m) for m in given})
    if len(modes) != 1 or modes[0] not in ("last", "mean", "cls"):
        raise ConversionError(f"{src / pooling['path'] / 'config.json'}: pooling {modes} is not served "
                              "(one of lasttoken, mean, cls)")
    return {"pooling": modes[0], "normalize": normalize}


def _convert_gguf(src: Path, tmp: Path, dtype: str | None, progress: bool) -> None:
    if src.suffix != ".gguf":
        raise ConversionError(f"{src}: expected a Hugging Face directory or a .gguf file")
    reader = gguf_reader(src)
    hf_cfg = gguf_hf_config(reader)
    cfg = from_hf_config(hf_cfg, dtype or "float32")
    factors = gguf_rope_factors(reader, cfg.head_dim)
    if factors is not None:
        cfg = dataclasses.replace(cfg, rope_scaling=RopeScaling(kind="factors", factors=factors))
    gguf_tokenizer_files(reader, tmp)
    params = build_params(cfg, gguf_tensors(reader, hf_cfg), progress)
    save_checkpoint(tmp, cfg, params, source=str(src))
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
