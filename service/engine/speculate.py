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

Not speculated (their rows decode as usual): requests under a grammar (the mask of position
i + 1 needs the matcher past token i, on the host), with repetition, presence or frequency
penalties (they count tokens drawn earlier in the same call), scored or pooled prompts, and
steps with more decode rows than ``max_batch``, where a step is no longer bound by reading the
weights and checking drafts costs more than it saves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from service.engine.request import Sequence

# A proposer: (the sequence's tokens so far, at most k) -> proposed next tokens (possibly none).
Proposer = Callable[[list[int], int], list[int]]


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
class Speculation:
    """What the engine speculates with: ``method`` ("ngram"; None: only requests that send a
    prediction), up to ``k`` draft tokens a row, only in steps of at most ``max_batch`` decode
    rows. A request's prediction (Predicted Outputs) is its proposer whatever the method.
    ``propose`` overrides the method's proposer (tests give ones that are always right or
    always wrong)."""

    method: str | None = "ngram"
    k: int = 4
    max_batch: int = 4
    propose: Proposer | None = None
    # method "draft": the model proposing (``service.engine.draft.DraftModel``); the engine asks
    # it before each step and ``drafts`` hands each row its proposal.
    draft: Any = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.method not in (None, "ngram", "draft"):
            raise ValueError(f"--speculative-algorithm {self.method!r}: ngram or draft")
        if (self.method == "draft") != (self.draft is not None):
            raise ValueError("--speculative-algorithm draft needs --speculative-draft-model, and only it")
        if not 1 <= self.k <= 16:
            raise ValueError(f"--speculative-num-draft-tokens {self.k}: 1 to 16")
        if self.max_batch < 1:
            raise ValueError(f"--speculative-max-batch {self.max_batch}: at least 1")

    def describe(self) -> str:
        what = self.method if self.draft is None else f"draft model {self.draft.name}"
        return f"speculative decoding: {what}, up to {self.k} draft tokens, in steps of <= {self.max_batch} rows"

    def eligible(self, seq: Sequence) -> bool:
        p = seq.params
        return ((self.method is not None or bool(p.prediction)) and seq.matcher is None
                and p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0
                and p.embed is None and p.speculative)

    def drafts(self, seq: Sequence, room: int) -> list[int]:
        """Draft tokens for ``seq``'s next step: at most k, at most ``room`` (positions left in
        its session) and fewer than the tokens it may still generate (the verify step draws
        one more than it drafts)."""
        limit = min(self.k, room, seq.max_tokens - len(seq.generated) - 1)
        if limit <= 0 or not self.eligible(seq):
            return []
        if seq.params.prediction:
            return propose_from_prediction(seq.generated, seq.params.prediction, limit)
        if self.method == "draft":
            proposal, seq.proposal = seq.proposal or [], None
            return proposal[:limit]
        propose = self.propose or propose_ngram
        return list(propose(seq.tokens(0, seq.length), limit))[:limit]
