"""Tensor and data parallel serving on a ``jax.sharding`` mesh (see ``sharding.mesh``)."""

from sharding.mesh import DATA, MODEL, RULES, MeshError, Plan, make_mesh, plan_for

__all__ = ["DATA", "MODEL", "RULES", "MeshError", "Plan", "make_mesh", "plan_for"]
