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
    """RoPE frequency scaling. ``kind`` is "default", "linear", "llama3", "factors": each
    frequency divided by its own factor (a GGUF file's ``rope_freqs``, as llama.cpp applies it),
    or "longrope" (Phi-3): ``factors`` (short) or ``long_factors`` divide the frequencies and
    cos/sin are scaled by ``attention_factor``. Which set applies is fixed by the context the
    server is sized for, as llama.cpp does: the long one past ``original_max_position_embeddings``
    (transformers switches by each forward's length, which a KV cache cannot follow)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    factors: tuple[float, ...] = ()
    long_factors: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention computes: scores ``q.k * scale``, soft-capped as
    ``softcap * tanh(score / softcap)`` when ``softcap`` is set, and a query at position p
    sees positions ``p - window + 1 .. p`` (all of ``0 .. p`` when ``window`` is None).
    Static: hashable, a jitted step closes over one per layer."""

    scale: float
    window: int | None = None
    softcap: float | None = None


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
    # Sliding-window attention: a query sees the last W positions, in the layers that
    # ``sliding_layers`` marks (all of them when it is empty).
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    # Gemma: scores scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
    # attention-score and final-logit soft-capping; embeddings scaled by sqrt(D); a norm
    # after attention and after the MLP too; gelu-tanh MLP; sliding layers' own RoPE base.
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    post_norms: bool = False
    mlp_act: str = "silu"  # "silu" or "gelu_tanh"
    rope_local_theta: float | None = None
    # Mixture of experts (Mixtral, Qwen3-MoE): a token's MLP is the routing-weighted sum of its
    # top ``experts_per_token`` of ``num_experts`` expert MLPs (hidden ``expert_size``), in the
    # layers ``moe_layers`` marks (all of them when it is empty; the others are dense).
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0
    norm_topk_prob: bool = True  # the chosen experts' weights renormalised to sum to 1
    moe_layers: tuple[bool, ...] = ()
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
        """The longest sequence served: the model's positions."""
        return self.max_position_embeddings

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and (not self.moe_layers or self.moe_layers[layer])

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and (not self.sliding_layers or self.sliding_layers[layer])

    def kv_group(self, layer: int) -> int:
        """The KV group a layer keeps its KV in: 0 full attention (every position), 1 sliding
        window (only what windows still read; see ``service.engine.kv``)."""
        return 1 if self.is_sliding(layer) else 0

    def attention_spec(self, layer: int) -> AttentionSpec:
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return AttentionSpec(scale=float(scalar) ** -0.5,
                             window=self.sliding_window if self.is_sliding(layer) else None,
                             softcap=self.attn_softcap)

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
        norms = (4 if self.post_norms else 2) * d
        moe = self.num_experts * (3 * d * self.expert_size) + d * self.num_experts
        layers = sum(attn + norms + (moe if self.is_moe(i) else 3 * d * f) for i in range(self.num_layers))
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + layers + d + head

    @property
    def active_params(self) -> int:
        """Parameters one token's forward pass uses: its experts only, in MoE layers."""
        unused = (self.num_experts - self.experts_per_token) * 3 * self.hidden_size * self.expert_size
        return self.num_params - unused * sum(self.is_moe(i) for i in range(self.num_layers))

    def uses_long_rope(self, context: int) -> bool:
        """Whether a server sized for ``context`` positions takes longrope's long factors."""
        s = self.rope_scaling
        return s.kind == "longrope" and context > s.original_max_position_embeddings

    def rope_attention_factor(self) -> float:
        """The factor cos and sin are scaled by (longrope's; 1 otherwise)."""
        return self.rope_scaling.attention_factor if self.rope_scaling.kind == "longrope" else 1.0

    def inv_freq(self, local: bool = False, context: int = 0) -> np.ndarray:
        """RoPE inverse frequencies (H/2,), float64 on the host, scaling applied; ``local``:
        the sliding layers' own base (unscaled) where the model has one; ``context``: the
        positions served (longrope's choice of factors)."""
        h = self.head_dim
        theta = self.rope_local_theta if local and self.rope_local_theta is not None else self.rope_theta
        inv = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
        s = RopeScaling() if local and self.rope_local_theta is not None else self.rope_scaling
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
        elif s.kind == "longrope":
            factors = s.long_factors if self.uses_long_rope(context) else s.factors
            # float32 like HF's, so the frequencies agree to the last bit
            ext = np.asarray(factors, dtype=np.float32)
            inv = (1.0 / (ext * (theta ** (np.arange(0, h, 2, dtype=np.float32) / h)).astype(np.float32))).astype(np.float64)
        return inv

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelConfig":
        data = dict(data)
        rope = dict(data.get("rope_scaling", {}))
        rope["factors"] = tuple(rope.get("factors", ()))
        rope["long_factors"] = tuple(rope.get("long_factors", ()))
        data["rope_scaling"] = RopeScaling(**rope)
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        data["sliding_layers"] = tuple(data.get("sliding_layers", ()))
        data["moe_layers"] = tuple(data.get("moe_layers", ()))
        return cls(**data)


def _rope_from_hf(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling, float | None]:
    """Read RoPE settings from either config style: (theta, scaling, the sliding layers' own
    theta where the model gives them one)."""
    params = cfg.get("rope_parameters")
    local = cfg.get("rope_local_base_freq")  # transformers 4 Gemma 3
    if isinstance(params, Mapping) and isinstance(params.get("full_attention"), Mapping):
        # transformers 5, a set per layer type (Gemma 3)
        sliding = dict(params.get("sliding_attention") or {})
        kind = sliding.get("rope_type", "default") or "default"
        if kind != "default":
            raise UnsupportedConfigError(f"rope scaling type {kind!r} on sliding layers is not supported")
        local = sliding.get("rope_theta", local)
        params = params["full_attention"]
    local = None if local is None else float(local)
    if isinstance(params, Mapping) and "rope_theta" in params:  # transformers 5
        theta = float(params["rope_theta"])
        scaling = dict(params)
    else:  # transformers 4
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    return (*_scaling(theta, scaling, cfg), local)


def _scaling(theta: float, scaling: dict[str, Any], cfg: Mapping[str, Any]) -> tuple[float, RopeScaling]:
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
    if kind == "longrope":
        original = int(scaling.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
                       or cfg["max_position_embeddings"])
        factor = scaling.get("factor") or int(cfg.get("max_position_embeddings", original)) / original
        attention = scaling.get("attention_factor")
        if attention is None:  # the LongRoPE paper's, as transformers derives it
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return theta, RopeScaling(kind="longrope", factors=tuple(float(x) for x in scaling["short_factor"]),
                                  long_factors=tuple(float(x) for x in scaling["long_factor"]),
                                  original_max_position_embeddings=original, attention_factor=float(attention))
    raise UnsupportedConfigError(
        f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3, longrope)"
    )


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


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
    if hasattr(fam, "normalize_config"):  # a config the family reads through another's shape
        cfg = fam.normalize_config(cfg)
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        raise UnsupportedConfigError(f"hidden_act={act!r} is not supported ({', '.join(_ACTIVATIONS)})")
    if cfg.get("mlp_bias"):
        raise UnsupportedConfigError("mlp_bias=true is not supported")
    fam.check_config(cfg)
    # Where transformers applies the window: the config's layer_types when it lists them, else
    # the family's rule (every layer for Mistral and Phi-3; Qwen2 from max_window_layers on,
    # with use_sliding_window; Gemma's alternation).
    layers = int(cfg["num_hidden_layers"])
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        layer_types = fam.layer_types(cfg, layers) if hasattr(fam, "layer_types") else None
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise UnsupportedConfigError(f"layer_types {unknown} are not supported (full_attention, sliding_attention)")
        if len(layer_types) != layers:
            raise UnsupportedConfigError(f"layer_types lists {len(layer_types)} layers, num_hidden_layers={layers}")
    sliding = tuple(t == "sliding_attention" for t in layer_types) if layer_types is not None else ()
    uses_window = window is not None and (any(sliding) if sliding else bool(cfg.get("use_sliding_window", False)))
    if uses_window and int(window) < 1:
        raise UnsupportedConfigError(f"sliding_window={window} must be >= 1")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedConfigError("use_bidirectional_attention=true (an embedding model) is not supported")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling, local_theta = _rope_from_hf(cfg)
    head_dim = cfg.get("head_dim") or hidden // heads
    if scaling.kind == "longrope":
        for name, factors in (("short_factor", scaling.factors), ("long_factor", scaling.long_factors)):
            if len(factors) != int(head_dim) // 2:
                raise UnsupportedConfigError(f"rope_scaling {name} has {len(factors)} entries; "
                                             f"head_dim {head_dim} needs {int(head_dim) // 2}")
    torch_dtype = cfg.get("dtype", cfg.get("torch_dtype")) or "float32"
    fields = dict(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=layers,
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
        sliding_window=int(window) if uses_window else None,
        sliding_layers=sliding if uses_window and not all(sliding) else (),
        mlp_act=_ACTIVATIONS[act],
        rope_local_theta=local_theta if uses_window else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        dtype=dtype or (torch_dtype if torch_dtype in ("bfloat16", "float16") else "float32"),
    )
    if hasattr(fam, "config_fields"):  # what sets the family apart, from its config
        fields.update(fam.config_fields(cfg))
    return ModelConfig(**fields)

