"""A request as submitted, and the sequence the engine makes of it.

``Request`` is what the caller asked for and never changes; ``Sequence`` is what the engine
thread does with it (its slot, what is prefilled, what it generated, its stop-string state).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from model.tokenizer import IncrementalDetokenizer
from service.params import SamplingParams


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Output:
    """One increment of a request's result."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the cache: on the first Output and the final one
    history_tokens: int = 0
    # The prompt's tokens after its first, each with its logprob given those before it (when
    # the request scores its prompt): on the first Output only.
    prompt_logprobs: list[TokenLogprob] | None = None
    stop_string: str | None = None  # the stop string that finished it (finish_reason "stop")
    embedding: Any = None  # an embedding request's pooled hidden state (np.ndarray (D,), float32)
    # A request with a prediction: its tokens checked as drafts and kept, and not kept (final).
    prediction_tokens: tuple[int, int] | None = None
    weight_version: str | None = None  # the weights that computed every token of it (final)


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    id: str
    prompt_ids: tuple[int, ...] | list[int]  # the new tokens (for a session turn: this turn only)
    params: SamplingParams
    emit: Callable[[Output], None]
    session_id: int | None = None
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    adapter: int = -1  # the adapter slot its tokens use (-1: the base model)
    root: bytes = b""  # where its blocks' hash chain starts: its adapter's identity
    images: tuple = ()  # its prompt's images (service.engine.images.Image), in order


@dataclasses.dataclass(eq=False)
class Sequence:
    """The engine thread's state of one request (compared by identity)."""

    req: Request
    seq: list[int] = dataclasses.field(default_factory=list)  # the prompt (after earlier session turns)
    slot: int = -1
    # Positions of seq + generated whose KV is computed, or planned by a step already built
    # (decode rows count: a decode step writes its input token's KV).
    prefilled: int = 0
    cached: int = 0  # of the prompt's, reused from cached blocks or a session's (not computed)
    admitted: int = 0  # admission order: the most recently admitted is preempted first
    preempted: int = 0  # times its blocks were taken back (it is recomputed from its tokens)
    generated: list[int] = dataclasses.field(default_factory=list)
    max_tokens: int = 0
    detok: IncrementalDetokenizer | None = None
    pending_text: str = ""  # decoded text held back: it may start a stop string
    stop_hit: str | None = None  # the stop string matched, once one is
    history: int = 0  # tokens of earlier session turns
    first_token_time: float | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # scored so far, until the first Output
    pooled: Any = None  # an embedding request's pooling so far (np.ndarray (D,), float64)
    # The grammar's matcher (llguidance) of a constrained request, advanced with each token;
    # while ``grammar_wait`` is set it waits for that text (the end of the reasoning) first.
    matcher: Any = None
    grammar_wait: str | None = None
    raw_tail: str = ""  # the output's last characters, special tokens included (grammar_wait)
    predicted: list[int] = dataclasses.field(default_factory=lambda: [0, 0])  # prediction tokens kept, not kept
    # Speculative decoding with a draft model (``service.engine.draft``): positions whose draft
    # KV is known (valid while ``draft_epoch`` equals ``preempted``).
    draft_prefilled: int = 0
    draft_epoch: int = 0
    draft_len: int = 0  # the drafts its next step may check (``speculate.adapt``; 0: K)
    weight_version: str = ""  # the engine's weights when it was admitted (they cannot change while it runs)
    # Its images' soft tokens from the vision tower (host arrays, kept for a recompute after a
    # preemption), and its prompt as the prefix cache hashes it (see ``hash_tokens``).
    image_features: list = dataclasses.field(default_factory=list)
    keys: list[int] | None = None

    @property
    def id(self) -> str:
        return self.req.id

    @property
    def params(self) -> SamplingParams:
        return self.req.params

    @property
    def target(self) -> int:
        """Positions whose KV must be computed before its next token is drawn: the prompt's,
        then (recomputing after a preemption) every token but the last sampled one."""
        return len(self.seq) + len(self.generated) - 1 if self.generated else len(self.seq)

    @property
    def pending(self) -> bool:
        """Tokens wait for prefill chunks (the prompt, or a preempted sequence's recompute)."""
        return self.prefilled < self.target

    @property
    def decodable(self) -> bool:
        """Prompt prefilled and a first token sampled: the next step decodes it."""
        return bool(self.generated) and self.prefilled == self.target

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens ``start..end`` of the prompt followed by the output."""
        n = len(self.seq)
        if end <= n:
            return self.seq[start:end]
        return self.seq[start:] + self.generated[max(start - n, 0):end - n] if start < n else \
            self.generated[start - n:end - n]

    def hash_tokens(self, start: int, end: int) -> list[int]:
        """``tokens(start, end)`` as the prefix cache hashes them: an image's tokens stand for
        its content (``service.engine.images.hash_keys``)."""
        if not self.req.images:
            return self.tokens(start, end)
        if self.keys is None:
            from service.engine.images import hash_keys

            self.keys = hash_keys(self.seq, self.req.images)
        n = len(self.seq)
        return self.keys[start:end] if end <= n else self.keys[start:] + self.tokens(max(start, n), end)

    @property
    def constrained(self) -> bool:
        return self.matcher is not None

    @property
    def masked(self) -> bool:
        """Its next token is drawn under its grammar's mask."""
        return self.matcher is not None and self.grammar_wait is None

    @property
    def length(self) -> int:
        """Tokens of the whole sequence so far, the last sampled one included."""
        return len(self.seq) + len(self.generated)
