"""Speculative decoding: cheap proposals for a sequence's next tokens, checked by the target
model in one call.

A speculating sequence's step is a *verify chunk*: its last token and up to K proposed ones at
consecutive positions, in a prefill call that samples at every position (``Chunk.drafts``).
The token drawn at position i is what plain decoding would draw there: the same model row,
the same sampling settings and the request's own random key at the same step. The drafts are
accepted while each equals the token drawn before it, and the first token drawn that differs
(or the one after the last draft) comes free. So the output is token for token what the
model alone gives, greedy or seeded, whatever shares the batch; for a greedy request this is
the usual longest-matching-prefix rule. For a proposal of one token per position (n-gram
lookup: a one-hot draft distribution) it accepts as often as rejection sampling would: a draft
x survives with probability p(x) either way.

The KV written at rejected positions lies past the sequence's length; the next step writes
over it, and no block holding it is registered in the prefix cache before it is.

A request's prediction (OpenAI's Predicted Outputs: the text it expects the answer to repeat)
proposes its drafts whatever the server's method, also where the server speculates nothing
else: the tokens after where the output's last few tokens occur in the prediction.

Proposals come from one interface (``Proposer``: n-gram lookup, a request's prediction, a
draft model), asked once per step by the scheduler after it gave each row blocks for its
drafts' limit.

Not speculated (their rows decode as usual): requests under a grammar (the mask of position
i + 1 needs the matcher past token i, on the host), with repetition, presence or frequency
penalties (they count tokens drawn earlier in the same call), scored or pooled prompts, and
steps with more decode rows than ``max_batch``, where a step is no longer bound by reading the
weights and checking drafts costs more than it saves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import numpy as np

from service.engine.request import Sequence


class Proposer(Protocol):
    """Proposes each row's next tokens, at most its limit (possibly none). ``tables``: the first
    KV group's (1, slots, max blocks) tables, with blocks for every row's limit past its
    length (a draft model writes its KV there)."""

    def propose(self, rows: list[Sequence], limits: list[int], tables: np.ndarray) -> list[list[int]]: ...


def propose_ngram(tokens: list[int], k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    last n tokens (the longest n from ``max_n`` down to ``min_n`` that occurs), at most k."""
    if k <= 0 or len(tokens) < min_n + 1:
        return []
    arr = np.asarray(tokens, np.int64)
    end = len(arr)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        tail = arr[end - n:]
        # Windows starting at 0 .. end - n - 1 (the tail itself excluded), latest first.
        windows = np.lib.stride_tricks.sliding_window_view(arr[:end - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in arr[start:start + k]]
    return []


def propose_from_prediction(generated: list[int], prediction: tuple[int, ...], k: int, max_n: int = 4) -> list[int]:
    """Predicted Outputs: the prediction's tokens after where the output's last n tokens occur
    in it (the longest n that does, at the occurrence nearest the output's own length, where an
    answer that follows its prediction is), at most k."""
    if k <= 0 or not generated or not prediction:
        return []
    pred = np.asarray(prediction, np.int64)
    out = np.asarray(generated[-max_n:], np.int64)
    for n in range(min(max_n, len(out), len(pred)), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(pred, n)
        hits = np.flatnonzero((windows == out[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[np.argmin(np.abs(hits + n - len(generated)))]) + n
            return [int(t) for t in pred[start:start + k]]
    return []


@dataclasses.dataclass(frozen=True)
class Lookup:
    """A proposer from a lookup over each row's tokens: (tokens so far, k) -> proposed tokens
    (n-gram prompt lookup by default; tests give ones that are always right or wrong)."""

    lookup: Callable[[list[int], int], list[int]] = propose_ngram

    def propose(self, rows: list[Sequence], limits: list[int], tables=None) -> list[list[int]]:
        return [list(self.lookup(s.tokens(0, s.length), k))[:k] for s, k in zip(rows, limits)]


class Prediction:
    """Each row's own prediction (Predicted Outputs) proposes its drafts."""

    @staticmethod
    def propose(rows: list[Sequence], limits: list[int], tables=None) -> list[list[int]]:
        return [propose_from_prediction(s.generated, s.params.prediction, k) for s, k in zip(rows, limits)]


def adapt(seq: Sequence, drafted: int, accepted: int) -> None:
    """After a verify of ``drafted`` drafts of which ``accepted`` were: a sequence whose drafts
    all pass drafts twice as many next time (up to K), one whose drafts all fail half as many
    (down to one, which a verify checks for about the cost of a decode step); a partial run
    keeps the length. Measured against fixed lengths in docs/PERFORMANCE.md: at one stream it
    keeps nearly all of K=8's gain, at four streams it beats both K=4 and K=8 (K=8 loses
    there on misses), because rows that keep missing stop paying for long drafts."""
    if drafted <= 0:
        return
    if accepted >= drafted:
        seq.draft_len = max(seq.draft_len, min(64, 2 * drafted))
    elif accepted == 0:
        seq.draft_len = max(1, drafted // 2)


@dataclasses.dataclass(frozen=True)
class Speculation:
    """What the engine speculates with: ``method`` ("ngram", "draft", or None: off, when only
    requests that send a prediction speculate), up to ``k`` draft tokens a row, only in steps
    of at most ``max_batch`` decode rows. An engine always has one (``Speculation.off()``), so
    verify shapes are always warmed up. A request's prediction is its proposer whatever the
    method. ``propose`` overrides the n-gram lookup; ``draft``: method "draft"'s model
    (``service.engine.draft.DraftModel``)."""

    method: str | None = "ngram"
    k: int = 4
    max_batch: int = 4
    propose: Callable[[list[int], int], list[int]] | None = None
    draft: Any = dataclasses.field(default=None, compare=False)
    # Each sequence's draft length adapts to how its drafts fare (``adapt``), from K down to 1
    # and back; False: always up to ``k``.
    adaptive: bool = True

    def __post_init__(self):
        if self.method not in (None, "ngram", "draft"):
            raise ValueError(f"--speculative-algorithm {self.method!r}: ngram or draft")
        if (self.method == "draft") != (self.draft is not None):
            raise ValueError("--speculative-algorithm draft needs --speculative-draft-model, and only it")
        if not 1 <= self.k <= 16:
            raise ValueError(f"--speculative-num-draft-tokens {self.k}: 1 to 16")
        if self.max_batch < 1:
            raise ValueError(f"--speculative-max-batch {self.max_batch}: at least 1")

    @classmethod
    def off(cls, k: int = 4, max_batch: int = 4) -> "Speculation":
        return cls(method=None, k=k, max_batch=max_batch)

    @property
    def on(self) -> bool:
        return self.method is not None

    @property
    def proposer(self) -> Proposer | None:
        """The method's proposer (None when off)."""
        if self.method == "draft":
            return self.draft
        return Lookup(self.propose or propose_ngram) if self.method == "ngram" else None

    def describe(self) -> str:
        what = self.method if self.draft is None else f"draft model {self.draft.name}"
        length = f"up to {self.k} draft tokens" + (", fewer while they are rejected" if self.adaptive else "")
        return f"speculative decoding: {what}, {length}, in steps of <= {self.max_batch} rows"

    def eligible(self, seq: Sequence) -> bool:
        p = seq.params
        return ((self.on or bool(p.prediction)) and seq.matcher is None
                and p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0
                and p.embed is None and p.speculative)

    def limit(self, seq: Sequence, room: int) -> int:
        """The most draft tokens ``seq``'s next step may check: at most k, at most ``room``
        (positions left in its session) and fewer than the tokens it may still generate (the
        verify step draws one more than it drafts); 0 when it may not speculate."""
        if not self.eligible(seq):
            return 0
        want = min(self.k, seq.draft_len or self.k) if self.adaptive else self.k
        return max(0, min(want, room, seq.max_tokens - len(seq.generated) - 1))

    def drafts(self, rows: list[Sequence], limits: list[int], tables: np.ndarray) -> list[list[int]]:
        """Each row's drafts, at most its limit: by its prediction where it sends one, else by
        the method's proposer (each proposer called once, for all its rows)."""
        out: list[list[int]] = [[] for _ in rows]
        for proposer, wants in ((Prediction, lambda s: bool(s.params.prediction)),
                                (self.proposer, lambda s: not s.params.prediction)):
            picked = [i for i, s in enumerate(rows) if limits[i] > 0 and wants(s)]
            if proposer is None or not picked:
                continue
            got = proposer.propose([rows[i] for i in picked], [limits[i] for i in picked], tables)
            for i, drafts in zip(picked, got):
                out[i] = list(drafts)[:limits[i]]
        return out
