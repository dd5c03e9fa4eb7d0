"""LoRA adapters: PEFT's directories read into the model's layout, and the bank of adapter slots
every step reads.

An adapter changes a projection W (in, out) to W + A·B·scale, A (in, r), B (r, out) (PEFT stores
``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r); scale is ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora``). B's output rows are laid out as the base weight's
(a packed ``qkv_proj`` split, InternLM2's grouped ``wqkv`` reordered) by the family's own
converter key table, so whatever the converter does to a weight it does to B.

The bank holds ``slots`` adapters of rank at most ``rank`` on the device: per layer and target
projection, A stacked as (in, slots * rank) and B as (slots * rank, out), ranks below ``rank``
padded with zeros and the scale folded into B. Each token of a step names a slot (-1: the base
model); ``select`` is 1 on its slot's ``rank`` columns and 0 elsewhere, so

    delta = ((x @ A) * select) @ B

gives each token its own adapter's update in one pair of matmuls whatever the mix in the
batch, and a base token exactly zero (its base output is unchanged to the bit). Loading an
adapter rewrites one slot's columns: the shapes stay, nothing compiles.

Under ``--tp`` A and B are sharded with the projection they feed (B's output columns split
like q/k/v/gate/up's, A's input rows like o/down's), so each device computes the update of its
own part of the output (or, for o/down, its partial sum, reduced with the base product's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig

# Target projections, by the name of the param each updates.
TARGETS = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w_gate": "gate", "w_up": "up", "w_down": "down"}
ATTENTION, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")
# Logical axes of A and B per target (see sharding.mesh.RULES): split with the projection's own.
_AXES = {"q": ((None, None), (None, "heads")), "k": ((None, None), (None, "kv_heads")),
         "v": ((None, None), (None, "kv_heads")), "o": (("heads", None), (None, None)),
         "gate": ((None, None), (None, "mlp")), "up": ((None, None), (None, "mlp")),
         "down": (("mlp", None), (None, None))}
# PEFT config fields refused by name (what they ask for is not implemented).
_REFUSED = {"use_dora": "DoRA (use_dora)", "layer_replication": "layer_replication",
            "lora_bias": "lora_bias", "trainable_token_indices": "trainable_token_indices",
            "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)"}
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the cause."""


@dataclasses.dataclass(frozen=True, eq=False)
class Adapter:
    """One adapter on the host: ``weights[(layer, target)]`` is (A (in, r), B (r, out)), float32,
    the scale folded into B. ``digest`` names its content (the prefix cache keys on it)."""

    name: str
    path: str
    rank: int
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    digest: bytes

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(t for _, t in self.weights)

    @property
    def identity(self) -> bytes:
        """Where its sequences' block hash chains start: no two adapters share KV."""
        return hashlib.blake2b(self.name.encode() + b"\0" + self.digest, digest_size=16).digest()


def target_sizes(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of a target projection."""
    d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return {"q": (d, n * h), "k": (d, k * h), "v": (d, k * h), "o": (n * h, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}[target]


def family_targets(cfg: ModelConfig, layer: int) -> tuple[str, ...]:
    """What an adapter may update in ``layer``: attention everywhere, the MLP where it is dense
    (an MoE layer's experts are not targets)."""
    return ATTENTION if cfg.is_moe(layer) else ATTENTION + MLP


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    file = path / "adapter_config.json"
    if not file.is_file():
        raise AdapterError(f"{path}: no adapter_config.json (a LoRA adapter as PEFT saves it)")
    try:
        conf = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(conf, dict):
        raise AdapterError(f"{file}: not a JSON object")
    kind = conf.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise AdapterError(f"{file}: peft_type {kind!r} is not supported (LORA only)")
    for field, what in _REFUSED.items():
        if conf.get(field):
            raise AdapterError(f"{file}: {what} is not supported")
    if conf.get("modules_to_save"):
        raise AdapterError(f"{file}: modules_to_save {conf['modules_to_save']} is not supported (whole "
                           "modules trained beside the adapter)")
    if conf.get("bias", "none") != "none":
        raise AdapterError(f"{file}: bias={conf['bias']!r} is not supported (only 'none')")
    if not isinstance(conf.get("r", 8), int) or conf.get("r", 8) < 1:
        raise AdapterError(f"{file}: r must be a positive integer")
    return conf


def _alpha(conf: dict[str, Any], module: str) -> float:
    """The module's lora_alpha: ``alpha_pattern``'s entry whose key ends its name, else the default."""
    for pattern, alpha in (conf.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(alpha)
    return float(conf.get("lora_alpha", 8))


def _module_params(cfg: ModelConfig, module: str, w: np.ndarray) -> list[tuple[tuple, np.ndarray]]:
    """The family's key table applied to a weight of ``module``'s shape: [(param path, ours)]."""
    from model.families import family

    key = module + ".weight"
    for pattern, transform in family(cfg.family).KEY_TABLE:
        m = re.fullmatch(pattern, key)
        if m:
            return transform(w, cfg, m)
    raise AdapterError(f"module {module!r} is not a projection of this {cfg.family} model")


def load_adapter(path: str | Path, name: str, cfg: ModelConfig, max_rank: int | None = None) -> Adapter:
    """Read a PEFT LoRA directory for this model; ``AdapterError`` names what cannot be served."""
    from model.convert.sources import _read_safetensors

    path = Path(path).expanduser()
    conf = read_config(path)
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        other = " (adapter_model.bin is not read: save with safe_serialization)" \
            if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path}: no adapter_model.safetensors{other}")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    digest = hashlib.blake2b(file.read_bytes(), digest_size=16)
    try:
        tensors = list(_read_safetensors(file))
    except Exception as e:  # a truncated or foreign file: say which
        raise AdapterError(f"{file}: not a readable safetensors file ({e})") from None
    for key, w in tensors:
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{file}: tensor {key!r} is not a LoRA A or B matrix (embedding, lm_head or "
                               "other trained modules are not supported)")
        pairs.setdefault(m[1], {})[m[2]] = np.asarray(w, np.float32)
    if not pairs:
        raise AdapterError(f"{file}: no LoRA weights")
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{file}: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        a, b = ab["A"], ab["B"]
        if ".layers." not in f".{module}":
            raise AdapterError(f"{file}: {module}: adapters of the embedding or lm_head are not supported")
        if ".experts." in module or "block_sparse_moe" in module:
            raise AdapterError(f"{file}: {module}: adapters of MoE experts are not supported (attention and "
                               "dense MLP projections are)")
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
            raise AdapterError(f"{file}: {module}: lora_A {a.shape} and lora_B {b.shape} do not pair")
        if max_rank is not None and r > max_rank:
            raise AdapterError(f"{path}: {module} has rank {r}, above --max-lora-rank {max_rank}")
        alpha = _alpha(conf, module)
        scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
        # B's rows are the base weight's output rows: the key table lays them out as it lays the
        # weight's, once B is widened to the weight's input size (its columns past r zero).
        wide = np.zeros((b.shape[0], max(a.shape[1], r)), np.float32)
        wide[:, :r] = b * scale
        try:
            outs = _module_params(cfg, module, wide)
        except Exception as e:
            if isinstance(e, AdapterError):
                raise AdapterError(f"{file}: {e}") from None
            raise AdapterError(f"{file}: {module}: lora_B {b.shape} does not fit this model ({e})") from None
        for param_path, ours in outs:
            if len(param_path) != 3 or param_path[2] not in TARGETS:
                raise AdapterError(f"{file}: {module} updates {'.'.join(map(str, param_path))}, which is not a "
                                   "supported target (q/k/v/o, gate/up/down)")
            layer, target = param_path[1], TARGETS[param_path[2]]
            if target not in family_targets(cfg, layer):
                raise AdapterError(f"{file}: {module}: layer {layer} has no dense {target} projection")
            fan_in, fan_out = target_sizes(cfg, target)
            if a.shape[1] != fan_in:
                raise AdapterError(f"{file}: {module}: lora_A {a.shape} does not fit its {fan_in} inputs")
            weights[(layer, target)] = (np.ascontiguousarray(a.T), ours.reshape(-1, fan_out)[:r].copy())
    rank = max(a.shape[1] for a, _ in weights.values())
    return Adapter(name, str(path), rank, weights, digest.digest())


# -- the device bank --------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """One target's adapters in slots: a (in, S*R), b (S*R, out). A backend may hold them in
    a form of its own (``Backend.adapter_slots``) with the same two methods."""

    a: jax.Array
    b: jax.Array

    def delta(self, x: jax.Array, select: jax.Array) -> jax.Array:
        """x (..., in), select (..., S*R) -> each row's own adapter's update (..., out)."""
        return ((x.astype(self.a.dtype) @ self.a) * select) @ self.b

    def write(self, lo: jax.Array, a: jax.Array, b: jax.Array) -> "Slots":
        """Columns lo .. lo + R of a and rows lo .. lo + R of b replaced by a (in, R), b (R, out)."""
        return Slots(jax.lax.dynamic_update_slice_in_dim(self.a, a.astype(self.a.dtype), lo, axis=1),
                     jax.lax.dynamic_update_slice_in_dim(self.b, b.astype(self.b.dtype), lo, axis=0))


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """The bank's shape: ``slots`` adapters of rank at most ``rank`` over ``targets``, in
    ``dtype`` (the activations')."""

    slots: int
    rank: int
    targets: tuple[str, ...]
    dtype: Any = "float32"

    def layer_targets(self, cfg: ModelConfig, layer: int) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t in family_targets(cfg, layer))

    def empty(self, cfg: ModelConfig) -> list[dict[str, Slots]]:
        width = self.slots * self.rank
        out = []
        for i in range(cfg.num_layers):
            layer = {}
            for t in self.layer_targets(cfg, i):
                fan_in, fan_out = target_sizes(cfg, t)
                layer[t] = Slots(jnp.zeros((fan_in, width), self.dtype), jnp.zeros((width, fan_out), self.dtype))
            out.append(layer)
        return out

    def shardings(self, cfg: ModelConfig, plan) -> list[dict[str, Slots]]:
        return [{t: Slots(plan.sharding(_AXES[t][0]), plan.sharding(_AXES[t][1]))
                 for t in self.layer_targets(cfg, i)} for i in range(cfg.num_layers)]

    def columns(self, adapter: Adapter | None, cfg: ModelConfig) -> list[dict[str, Slots]]:
        """One slot's columns for ``adapter`` (None: zeros), host arrays shaped (in, R) and (R, out)."""
        out = []
        for i in range(cfg.num_layers):
            layer = {}
            for t in self.layer_targets(cfg, i):
                fan_in, fan_out = target_sizes(cfg, t)
                a, b = np.zeros((fan_in, self.rank), np.float32), np.zeros((self.rank, fan_out), np.float32)
                if adapter is not None and (i, t) in adapter.weights:
                    wa, wb = adapter.weights[(i, t)]
                    a[:, :wa.shape[1]], b[:wb.shape[0]] = wa, wb
                layer[t] = Slots(a.astype(self.dtype), b.astype(self.dtype))
            out.append(layer)
        return out

    def check(self, adapter: Adapter) -> None:
        """Refuse an adapter this bank cannot hold, naming why."""
        if adapter.rank > self.rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {adapter.rank}, above --max-lora-rank {self.rank}")
        missing = sorted(adapter.targets - set(self.targets))
        if missing:
            raise AdapterError(f"adapter {adapter.name!r} updates {', '.join(missing)}, which this server's adapter "
                               f"slots do not hold (they hold {', '.join(self.targets)})")


def write_slot(bank: list, slot: int, rank: int, columns: list) -> list:
    """The bank with slot ``slot``'s columns replaced (jit it with the bank donated)."""
    lo = slot * rank
    return [{t: layer[t].write(lo, cols[t].a, cols[t].b) for t in layer} for layer, cols in zip(bank, columns)]


def select(adapters: jax.Array, slots: int, rank: int, dtype: Any) -> jax.Array:
    """adapters (...,) int32 slot per token (-1: none) -> (..., slots * rank) 0/1 in ``dtype``."""
    column_slot = jnp.arange(slots * rank, dtype=jnp.int32) // rank
    return (adapters[..., None] == column_slot).astype(dtype)
