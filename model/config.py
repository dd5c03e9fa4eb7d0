"""Model configuration: one frozen dataclass, built from a Hugging Face ``config.json``.

Both config styles are read: transformers 4 (``rope_theta`` + ``rope_scaling``) and
transformers 5 (``rope_parameters``). Attributes that would change the math and that we do
not implement are refused with a clear error instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for something this project does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``kind`` is "default", "linear", "llama3", or "factors": each
    frequency divided by its own factor (a GGUF file's ``rope_freqs``, as llama.cpp applies it)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    factors: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    # Sliding-window attention over the last W positions. Windowed attention itself is not
    # implemented: sequences are served up to W tokens, where it equals full attention.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self):
        from model.families import FAMILIES  # the families import this module

        if self.family not in FAMILIES:
            raise UnsupportedConfigError(f"unknown model family {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def max_context(self) -> int:
        """The longest sequence served exactly: the model's positions, within its window."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @property
    def q_per_kv(self) -> int:  # G, query heads sharing one KV head
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * h
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * layer + d + head

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (H/2,), float64 on the host, scaling applied."""
        h = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
        s = self.rope_scaling
        if s.kind == "linear":
            inv = inv / s.factor
        elif s.kind == "llama3":
            low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
            high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        elif s.kind == "factors":
            inv = inv / np.asarray(s.factors, dtype=np.float64)
        return inv

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelConfig":
        data = dict(data)
        rope = dict(data.get("rope_scaling", {}))
        rope["factors"] = tuple(rope.get("factors", ()))
        data["rope_scaling"] = RopeScaling(**rope)
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)


def _rope_from_hf(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """Read RoPE settings from either config style."""
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:  # transformers 5
        theta = float(params["rope_theta"])
        scaling = dict(params)
    else:  # transformers 4
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise UnsupportedConfigError(
        f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def family_of(cfg: Mapping[str, Any]) -> str:
    from model.families import MODEL_TYPES

    model_type = cfg.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    archs = ", ".join(cfg.get("architectures") or []) or "none"
    raise UnsupportedConfigError(
        f"unsupported architecture: model_type={model_type!r} (architectures: {archs}); "
        f"supported model types: {', '.join(sorted(MODEL_TYPES))}"
    )


def from_hf_config(cfg: Mapping[str, Any], dtype: str | None = None) -> ModelConfig:
    """Build a ModelConfig from a parsed HF ``config.json``; refuse what we do not implement."""
    from model.families import family as family_module

    family = family_of(cfg)
    fam = family_module(family)
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise UnsupportedConfigError(f"hidden_act={act!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise UnsupportedConfigError("mlp_bias=true is not supported")
    fam.check_config(cfg)
    # Where transformers applies the window: Mistral and Phi-3 whenever it is set, Qwen2 with
    # use_sliding_window, any config whose layer_types name sliding layers.
    window = cfg.get("sliding_window")
    layer_kinds = set(cfg.get("layer_types") or ())
    unknown = sorted(layer_kinds - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedConfigError(f"layer_types {unknown} are not supported (full_attention, sliding_attention)")
    uses_window = cfg.get("use_sliding_window", cfg.get("model_type") in ("mistral", "phi3")) or (
        "sliding_attention" in layer_kinds)
    if uses_window and window is not None and int(window) < 1:
        raise UnsupportedConfigError(f"sliding_window={window} must be >= 1")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope_from_hf(cfg)
    head_dim = cfg.get("head_dim") or hidden // heads
    torch_dtype = cfg.get("dtype", cfg.get("torch_dtype")) or "float32"
    return ModelConfig(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=fam.QKV_BIAS,
        qk_norm=getattr(fam, "QK_NORM", False),
        sliding_window=int(window) if uses_window and window is not None else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        dtype=dtype or (torch_dtype if torch_dtype in ("bfloat16", "float16") else "float32"),
    )
