"""Image input: a vision-language checkpoint's vision tower and projector, and its images'
preprocessing.

Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP vision transformer over 14x14 patches
of a fixed-size image, its last hidden states average-pooled to ``tokens_per_image`` (256)
soft tokens, RMS-normed (Gemma's ``1 + w``) and projected to the language model's width. The
language model sees them in place of the prompt's ``<image_soft_token>`` embeddings, and
attends among one image's tokens in both directions (``service.engine.images`` gives each
such token the last position of its image as its attention limit).

The tower's weights are kept apart from the language model's (``vision/`` beside ``params/``
in a converted directory, replicated on every device): they are small beside the language
model and run once per image, not per token. Their layers are stacked (L, ...) and run as one
``lax.scan``, so one program serves any depth.

Preprocessing is numpy and Pillow (no torch at serving time): RGB, a bilinear resize to the
tower's size with Pillow (as the HF image processor's Pillow path does), rescale, normalise,
channels first.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from model.config import UnsupportedConfigError

# Keys of a Gemma 3 checkpoint's tower ("vision_tower.vision_model." in the published files;
# transformers 5 saves "vision_tower." alone, or with "model." in front) and projector.
_TOWER = r"(?:model\.)?vision_tower\.(?:vision_model\.)?"
_PROJECTOR = r"(?:model\.)?multi_modal_projector\."
_LAYER = _TOWER + r"encoder\.layers\.(\d+)\."
_LAYER_KEYS = {
    "layer_norm1.weight": "ln1_w", "layer_norm1.bias": "ln1_b",
    "layer_norm2.weight": "ln2_w", "layer_norm2.bias": "ln2_b",
    "self_attn.q_proj.weight": "wq", "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.weight": "wk", "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.weight": "wv", "self_attn.v_proj.bias": "bv",
    "self_attn.out_proj.weight": "wo", "self_attn.out_proj.bias": "bo",
    "mlp.fc1.weight": "w1", "mlp.fc1.bias": "b1",
    "mlp.fc2.weight": "w2", "mlp.fc2.bias": "b2",
}
VISION_KEY = re.compile(f"(?:{_TOWER}|{_PROJECTOR}).*")


class VisionError(ValueError):
    """A vision checkpoint this module cannot read (the message names what)."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    family: str  # "gemma3"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    tokens_per_image: int  # soft tokens an image becomes
    image_token_id: int  # the prompt's placeholder of each soft token
    boi_token_id: int  # "<start_of_image>": where the chat template puts an image
    eoi_token_id: int
    text_hidden_size: int
    dtype: str = "float32"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool(self) -> int:
        """The average pool's kernel (and stride): patches per side over soft tokens per side."""
        return self.patches_per_side // int(round(self.tokens_per_image ** 0.5))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "VisionConfig":
        return cls(**data)


def from_hf_config(cfg: Mapping[str, Any], text_hidden: int, dtype: str) -> VisionConfig | None:
    """The vision tower of an HF config (None when it has none); what we do not implement is
    refused by name."""
    vision = cfg.get("vision_config")
    if cfg.get("model_type") != "gemma3" or not vision:
        return None
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedConfigError(f"vision_config.hidden_act={act!r} is not supported (gelu_pytorch_tanh)")
    if int(vision.get("num_channels", 3)) != 3:
        raise UnsupportedConfigError(f"vision_config.num_channels={vision['num_channels']} is not supported (3)")
    tokens = int(cfg.get("mm_tokens_per_image", 256))
    image, patch = int(vision.get("image_size", 896)), int(vision.get("patch_size", 14))
    side, per_side = image // patch, int(round(tokens ** 0.5))
    if per_side * per_side != tokens or side % per_side:
        raise UnsupportedConfigError(f"mm_tokens_per_image={tokens} does not pool a {side}x{side} patch grid evenly")
    return VisionConfig(
        family="gemma3", hidden_size=int(vision.get("hidden_size", 1152)),
        intermediate_size=int(vision.get("intermediate_size", 4304)),
        num_layers=int(vision.get("num_hidden_layers", 27)), num_heads=int(vision.get("num_attention_heads", 16)),
        image_size=image, patch_size=patch, layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        tokens_per_image=tokens, image_token_id=int(cfg.get("image_token_index", cfg.get("image_token_id", 262144))),
        boi_token_id=int(cfg.get("boi_token_index", 255999)), eoi_token_id=int(cfg.get("eoi_token_index", 256000)),
        text_hidden_size=text_hidden, dtype=dtype)


def expand_prompt(text: str, vc: VisionConfig, token_text) -> str:
    """A rendered prompt with each image's place (the template's ``<start_of_image>``) expanded
    as Gemma 3's processor does: a blank line, the begin token, the image's soft tokens, the
    end token, a blank line. ``token_text``: a token id's text."""
    boi, soft, eoi = (token_text(i) for i in (vc.boi_token_id, vc.image_token_id, vc.eoi_token_id))
    return text.replace(boi, f"\n\n{boi}{soft * vc.tokens_per_image}{eoi}\n\n")


def param_shapes(vc: VisionConfig) -> dict[str, Any]:
    d, f, L, p = vc.hidden_size, vc.intermediate_size, vc.num_layers, vc.patch_size
    layer = {"ln1_w": (d,), "ln1_b": (d,), "ln2_w": (d,), "ln2_b": (d,), "wq": (d, d), "bq": (d,), "wk": (d, d),
             "bk": (d,), "wv": (d, d), "bv": (d,), "wo": (d, d), "bo": (d,), "w1": (d, f), "b1": (f,),
             "w2": (f, d), "b2": (d,)}
    return {"patch_w": (3 * p * p, d), "patch_b": (d,), "pos": (vc.patches_per_side ** 2, d),
            "post_w": (d,), "post_b": (d,), "proj_norm": (d,), "proj": (d, vc.text_hidden_size),
            "layers": {k: (L, *s) for k, s in layer.items()}}


def build_params(vc: VisionConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The tower's tree from its HF tensors (by key), in ``vc.dtype``; every weight must be
    there once, and nothing else (a vision head, unused by Gemma 3, is dropped)."""
    import ml_dtypes

    dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[vc.dtype]
    shapes = param_shapes(vc)
    out: dict[str, Any] = {}
    layers: dict[str, list] = {k: [None] * vc.num_layers for k in shapes["layers"]}
    for key, w in tensors.items():
        w = np.asarray(w, np.float32)
        if m := re.fullmatch(_LAYER + r"(.+)", key):
            i, name = int(m.group(1)), _LAYER_KEYS.get(m.group(2))
            if name is None or i >= vc.num_layers:
                raise VisionError(f"unexpected vision tensor {key!r}")
            layers[name][i] = w.T if name[0] == "w" else w  # Linear (out, in) -> (in, out)
            continue
        name = re.sub(f"^(?:{_TOWER}|{_PROJECTOR})", "", key)
        if name == "embeddings.patch_embedding.weight":  # (D, C, p, p) -> (C*p*p, D), a patch's pixels channel-major
            out["patch_w"] = w.reshape(w.shape[0], -1).T
        elif name == "embeddings.patch_embedding.bias":
            out["patch_b"] = w
        elif name == "embeddings.position_embedding.weight":
            out["pos"] = w
        elif name == "post_layernorm.weight":
            out["post_w"] = w
        elif name == "post_layernorm.bias":
            out["post_b"] = w
        elif name == "mm_soft_emb_norm.weight":  # Gemma's norm scales by 1 + w, in float32
            out["proj_norm"] = w + 1.0
        elif name == "mm_input_projection_weight":
            out["proj"] = w
        elif name.startswith("head."):
            continue
        else:
            raise VisionError(f"unexpected vision tensor {key!r}")
    missing = [k for k in shapes if k != "layers" and k not in out]
    missing += [f"layers.{i}.{k}" for k, v in layers.items() for i, x in enumerate(v) if x is None]
    if missing:
        raise VisionError(f"the checkpoint's vision tower lacks {', '.join(missing[:5])}")
    out["layers"] = {k: np.stack(v) for k, v in layers.items()}
    for k, shape in [*((k, s) for k, s in shapes.items() if k != "layers"),
                     *((f"layers.{k}", s) for k, s in shapes["layers"].items())]:
        got = out["layers"][k[7:]] if k.startswith("layers.") else out[k]
        if tuple(got.shape) != tuple(shape):
            raise VisionError(f"vision weight {k} has shape {tuple(got.shape)}, the config says {tuple(shape)}")
    return jax.tree.map(lambda x: np.asarray(x, dtype), out)


def save(dst: Path, params: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((Path(dst) / "vision").absolute(), params)


def load(path: Path, vc: VisionConfig, sharding: Any = None) -> dict[str, Any]:
    """The tower's params, restored onto ``sharding`` (every device of a mesh: replicated;
    default the first device)."""
    import orbax.checkpoint as ocp

    sharding = sharding or jax.sharding.make_single_device_sharding(jax.devices()[0])
    dtype = jnp.dtype(vc.dtype)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype, sharding=sharding), param_shapes(vc),
                          is_leaf=lambda x: isinstance(x, tuple))
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore((Path(path) / "vision").absolute(), target)


def _layer_norm(x, w, b, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps) * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def encode(params: dict[str, Any], vc: VisionConfig, pixels: jax.Array) -> jax.Array:
    """(B, 3, S, S) normalised pixels -> (B, tokens_per_image, text hidden) soft-token
    embeddings, in the weights' dtype."""
    dtype = params["proj"].dtype
    b, c, s, _ = pixels.shape
    p, side, d = vc.patch_size, vc.patches_per_side, vc.hidden_size
    patches = pixels.astype(dtype).reshape(b, c, side, p, side, p).transpose(0, 2, 4, 1, 3, 5)
    x = patches.reshape(b, side * side, c * p * p) @ params["patch_w"] + params["patch_b"]
    x = x + params["pos"][None]
    heads, hd = vc.num_heads, d // vc.num_heads

    def layer(x, w):
        h = _layer_norm(x, w["ln1_w"], w["ln1_b"], vc.layer_norm_eps)
        q, k, v = ((h @ w[f"w{n}"] + w[f"b{n}"]).reshape(b, -1, heads, hd) for n in "qkv")
        scores = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) * hd ** -0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bnqk,bknh->bqnh", probs, v).reshape(b, -1, d)
        x = x + out @ w["wo"] + w["bo"]
        h = _layer_norm(x, w["ln2_w"], w["ln2_b"], vc.layer_norm_eps)
        h = jax.nn.gelu(h @ w["w1"] + w["b1"], approximate=True) @ w["w2"] + w["b2"]
        return x + h, None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    x = _layer_norm(x, params["post_w"], params["post_b"], vc.layer_norm_eps)
    # Average pool (k x k) over the patch grid, row-major as the projector's AvgPool2d reads it.
    k, t = vc.pool, side // vc.pool
    x = x.reshape(b, t, k, t, k, d).astype(jnp.float32).mean(axis=(2, 4)).astype(dtype).reshape(b, t * t, d)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + vc.layer_norm_eps)
    x = (xf * params["proj_norm"].astype(jnp.float32)).astype(dtype)
    return (x @ params["proj"]).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """An image (Pillow) to the tower's input, as the checkpoint's HF image processor makes it
    (its ``preprocessor_config.json``: size, rescale factor, mean and std)."""

    size: int
    rescale: float = 1 / 255
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def of(cls, path: Path, vc: VisionConfig) -> "Preprocessor":
        """The processor config in ``path`` (a converted or HF directory); the tower's size
        and Gemma 3's defaults where it has none. Pan-and-scan crops are refused."""
        cfg: dict[str, Any] = {}
        for name in ("preprocessor_config.json", "processor_config.json"):
            f = Path(path) / name
            if f.exists():
                data = json.loads(f.read_text())
                cfg = data.get("image_processor", data)
                break
        if cfg.get("do_pan_and_scan"):
            raise UnsupportedConfigError("do_pan_and_scan=true (image crops) is not supported")
        size = cfg.get("size") or {}
        side = int(size.get("height", vc.image_size)) if isinstance(size, dict) else int(size)
        if side != vc.image_size:
            raise UnsupportedConfigError(f"the image processor's size {side} is not the vision tower's {vc.image_size}")
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        mean, std = (0.0,) * 3, (1.0,) * 3
        if cfg.get("do_normalize", True):
            mean = tuple(float(x) for x in cfg.get("image_mean", (0.5,) * 3))
            std = tuple(float(x) for x in cfg.get("image_std", (0.5,) * 3))
        return cls(side, rescale, mean, std)

    def __call__(self, image) -> np.ndarray:
        """A Pillow image -> (3, size, size) float32."""
        from PIL import Image

        rgb = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = np.asarray(rgb).astype(np.float64) * self.rescale
        x = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return x.transpose(2, 0, 1).astype(np.float32)
