"""What crosses between the plan and the device: a step's inputs as one pytree, its results as
named host arrays.

``StepShapes`` builds a ``PrefillInputs`` from a plan's ``Prefill`` op (a verify call too) and a
``DecodeInputs`` from its ``Decode``; the jitted steps take them whole. ``span`` is a pytree
meta field, so each span bucket is its own compiled program, as a static argument would be;
every other field is an array, so new values never compile. A new per-token or per-chunk
property (an adapter slot, image embeddings) is one more field here, filled in
``StepShapes`` and read in ``Steps``.

``Sampled`` holds a step's sampled tokens (a row per sampling row) and their logprobs;
``StepOutput`` one prefill call's results.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ImageRows:
    """A prefill call's image tokens (see ``service.engine.images``), each (1, T): ``embeds``
    (1, T, D) the vision tower's output for the tokens where ``use`` is set (taking their
    embedding's place); ``limits`` the last position each token sees (its own, or inside an
    image that image's last)."""

    embeds: np.ndarray
    use: np.ndarray
    limits: np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillInputs:
    """One prefill (or verify) call: T tokens in one row, P sampling rows.

    tokens, positions, rows (1, T): each token, its position and its slot's table row (padding:
    position past every table, row out of range, so its KV write is dropped). ends, slots,
    last, steps (P,): each sampling row's index in ``tokens``, its slot, whether it emits its
    token (a prompt's last chunk or a decode row) and the tokens its sequence generated
    before it. allowed (P, W): each sampling row's token bitmask. following (1, T): the token
    after each position (a scored call's prompt logprobs). live: the real tokens' count.
    adapters (1, T): each token's adapter slot (-1: the base model; see ``model.lora``), None
    when no token has one (the step is then the base model's program, which pays nothing for
    adapters). images: a vision-language model's every call carries ``ImageRows`` (one program
    with images or without); None for a text model."""

    tokens: np.ndarray
    positions: np.ndarray
    rows: np.ndarray
    adapters: np.ndarray | None
    ends: np.ndarray
    slots: np.ndarray
    last: np.ndarray
    steps: np.ndarray
    allowed: np.ndarray
    following: np.ndarray
    live: np.ndarray
    images: ImageRows | None
    span: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeInputs:
    """One decode step over a batch of b rows (a bucket): tokens, positions, steps (b,); rows
    (b,) each batch row's slot (padding: out of range), None at full width (row i is slot i);
    adapters (b,) each row's adapter slot (-1: the base model; None when no row has one);
    allowed (b, W) the rows' token bitmasks; live the rows that count."""

    tokens: np.ndarray | jax.Array
    positions: np.ndarray
    steps: np.ndarray
    rows: np.ndarray | None
    adapters: np.ndarray | None
    allowed: np.ndarray
    live: np.ndarray
    span: int = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class Sampled:
    """Host arrays with a row per sampling row: the token drawn, its logprob, and the top
    alternatives' ids and logprobs (None when no request asks for them)."""

    tokens: np.ndarray
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None

    @classmethod
    def of(cls, arrays) -> "Sampled":
        return cls(*(None if x is None else np.asarray(x) for x in arrays))

    def take(self, rows) -> "Sampled":
        """These rows, in this order."""
        return Sampled(*(None if x is None else x[rows] for x in dataclasses.astuple(self)))


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """One prefill call's results: ``sampled``, a row per sampling row (a verify call: per
    position); ``scores``, when a chunk is scored, a row per token of the call (``tokens``: the
    successor scored); ``hidden``, for embedding chunks, the final hidden states (T, D) float32."""

    sampled: Sampled
    scores: Sampled | None = None
    hidden: np.ndarray | None = None
