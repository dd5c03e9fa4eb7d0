"""Device meshes and the one table from the model's logical axes to mesh axes.

The model code names logical axes only (``model.weights`` gives each weight's); this module
decides which mesh axis each one goes to on a given mesh. A logical axis whose size the mesh
axis does not divide (SmolLM2's 9 query heads and 3 KV heads at ``--tp 2``) falls back to
replication for that axis, and the fallback is logged: GSPMD then computes that part on every
device of the ``model`` axis, which costs speed, never results.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model.config import ModelConfig
from model.weights import is_spec, param_specs

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"

# logical axis -> mesh axis (None: replicated). Weights, KV cache and per-slot state alike.
RULES: dict[str, str | None] = {
    "vocab": MODEL,  # embedding rows and lm_head columns; logits are gathered before sampling
    "embed": None,
    "heads": MODEL,
    "kv_heads": MODEL,  # fewer KV heads than tp: replicated (each device keeps all K heads)
    "head_dim": None,
    "mlp": MODEL,
    # Expert parallel: whole experts split over the model axis (each device runs its experts
    # for every token, and the partial outputs are summed); where E does not divide, the
    # experts are kept whole on every device and their hidden axis is split instead.
    "experts": MODEL,
    "expert_mlp": None,
    "norm": None,
    "slots": DATA,  # decode slots: their sampling state (and their block tables' replica)
    "kv_replicas": DATA,  # the KV block pools: one per data replica, with its own block ids
    "seq": None,
}


class MeshError(ValueError):
    """--tp/--dp do not fit the devices."""


def make_mesh(tp: int = 1, dp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "model") mesh of dp x tp devices (the first dp*tp of ``devices``)."""
    if tp < 1 or dp < 1:
        raise MeshError(f"--tp and --dp must be >= 1, got --tp {tp} --dp {dp}")
    devices = list(jax.devices() if devices is None else devices)
    need = tp * dp
    if need > len(devices):
        kind = devices[0].platform if devices else "device"
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting)"
                if kind == "cpu" else "")
        raise MeshError(f"--tp {tp} --dp {dp} needs {need} devices, found {len(devices)} {kind} "
                        f"device{'s' if len(devices) != 1 else ''}{hint}")
    if jax.process_count() > 1 and need != len(devices):
        raise MeshError(f"--tp {tp} --dp {dp} uses {need} of the {len(devices)} devices of "
                        f"{jax.process_count()} processes; across processes the mesh must take "
                        f"them all (tp x dp = {len(devices)})")
    return Mesh(np.asarray(devices[:need], dtype=object).reshape(dp, tp), (DATA, MODEL))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which logical axes are actually split on this mesh for this model."""

    mesh: Mesh
    rules: dict[str, str | None]
    fallbacks: tuple[str, ...]  # human-readable notes of axes kept whole

    def spec(self, axes: Sequence[str | None]) -> P:
        return P(*[self.rules.get(a) if a else None for a in axes])

    def sharding(self, axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def param_shardings(self, cfg: ModelConfig) -> Any:
        """A tree of NamedShardings matching the param tree."""
        return jax.tree.map(lambda s: self.sharding(s.axes), param_specs(cfg), is_leaf=is_spec)

    def cache_sharding(self) -> NamedSharding:
        """Per-layer KV block pools (replicas, blocks, block, kv_heads, head_dim)."""
        return self.sharding(("kv_replicas", None, None, "kv_heads", "head_dim"))

    def slot_sharding(self, ndim: int) -> NamedSharding:
        """Per-slot state: (slots,) or (slots, vocab); the vocab dim stays whole for sampling."""
        return self.sharding(("slots",) + (None,) * (ndim - 1))


def plan_for(cfg: ModelConfig, mesh: Mesh, slots: int | None = None) -> Plan:
    """The rules table applied to this model on this mesh, with fallbacks where sizes do not
    divide."""
    sizes = {"vocab": cfg.vocab_size, "embed": cfg.hidden_size, "heads": cfg.num_heads,
             "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "mlp": cfg.intermediate_size,
             "experts": cfg.num_experts or 1}
    if slots is not None:
        sizes["slots"] = slots
    sizes["kv_replicas"] = mesh.shape[DATA]
    rules, notes = dict(RULES), []
    for axis, mesh_axis in RULES.items():
        if mesh_axis is None or axis not in sizes:
            continue
        n = mesh.shape[mesh_axis]
        if n > 1 and sizes[axis] % n:
            rules[axis] = None
            notes.append(f"{axis} ({sizes[axis]}) is not divisible by {mesh_axis}={n}: replicated")
    # Query heads split but KV heads not: every device keeps all KV heads (GQA groups stay
    # whole), the standard fallback when there are fewer KV heads than tp.
    n = mesh.shape[MODEL]
    if cfg.num_experts and rules["experts"] is None and n > 1 and cfg.expert_size % n == 0:
        rules["expert_mlp"] = MODEL
        notes.append(f"experts' hidden size ({cfg.expert_size}) split over {MODEL}={n} instead")
    for note in notes:
        log.warning("sharding fallback: %s", note)
    return Plan(mesh=mesh, rules=rules, fallbacks=tuple(notes))
