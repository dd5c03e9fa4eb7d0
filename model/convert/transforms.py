"""Tensor transforms for the converter's key tables. HF tensors are torch Linear weights
(out, in); ours are (in, out) with heads split (see ``model.weights``).

A transform takes (tensor, config, regex match of the key) and returns
``[(param path, array), ...]``: most give one param, a packed tensor gives several.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Out = list[tuple[tuple, np.ndarray]]  # (param path, array)
Transform = Callable[..., Out]
KeyTable = list[tuple[str, Transform]]  # (key regex, transform)

LAYER = r"model\.layers\.(\d+)\."  # HF's per-layer key prefix; group 1 is the layer index


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message names the cause."""


def layer(name: str):
    return lambda m: ("layers", int(m[1]), name)


def top(name: str):
    return lambda m: (name,)


def same(path) -> Transform:
    return lambda w, cfg, m: [(path(m), w)]


def linear(path) -> Transform:  # (out, in) -> (in, out)
    return lambda w, cfg, m: [(path(m), w.T)]


def q_proj(w, cfg, m) -> Out:  # (N*H, D) -> (D, N, H)
    return [(("layers", int(m[1]), "wq"), w.T.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim))]


def kv_proj(name: str) -> Transform:
    def f(w, cfg, m):  # (K*H, D) -> (D, K, H)
        return [(("layers", int(m[1]), name), w.T.reshape(cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim))]
    return f


def o_proj(w, cfg, m) -> Out:  # (D, N*H) -> (N, H, D)
    return [(("layers", int(m[1]), "wo"), w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size))]


def head_bias(name: str, heads_attr: str) -> Transform:
    def f(w, cfg, m):  # (heads*H,) -> (heads, H)
        return [(("layers", int(m[1]), name), w.reshape(getattr(cfg, heads_attr), cfg.head_dim))]
    return f
