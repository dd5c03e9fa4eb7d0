"""What a request must fit before the engine takes it: its token ids in the model's vocabulary,
its length (prompt, history and ``max_tokens``) within a session and within the KV pool. Each
check raises a typed error naming the field (a 400)."""

from __future__ import annotations

import dataclasses

from service.errors import ContextLengthExceeded, InvalidRequest, KVPoolExceeded
from service.params import MAX_LOGIT_BIAS, SamplingParams


@dataclasses.dataclass(frozen=True)
class Limits:
    """``session_len`` positions a sequence may hold; ``max_length``: the longest that fits the
    pool (a session, or all of one replica's pool where that is less); ``vocab`` token ids."""

    session_len: int
    max_length: int
    vocab: int

    def prompt(self, n_prompt: int, params: SamplingParams, history: int = 0) -> None:
        total = history + n_prompt
        if total >= self.session_len:
            raise ContextLengthExceeded(total, self.session_len)
        if params.max_tokens is not None and total + params.max_tokens > self.session_len:
            raise ContextLengthExceeded(total, self.session_len, params.max_tokens)
        # Even alone it could never fit the pool (its last sampled token needs no KV).
        if total >= self.max_length or (params.max_tokens is not None and total + params.max_tokens > self.max_length):
            raise KVPoolExceeded(total, self.max_length, params.max_tokens or 0)

    def token_ids(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Token ids a request names must be the model's: one outside is a 400 naming it (the
        sampler indexes its rows with them)."""
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is not in the model's vocabulary [0, {self.vocab})",
                                 param="prompt")
        bad = next((t for t, _ in params.logit_bias if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise InvalidRequest(f"logit_bias: token id {bad} is not in the model's vocabulary [0, {self.vocab})",
                                 param="logit_bias")
        if len(params.logit_bias) > MAX_LOGIT_BIAS:  # each slot's sampling row holds this many
            raise InvalidRequest(f"logit_bias has {len(params.logit_bias)} entries; at most {MAX_LOGIT_BIAS}",
                                 param="logit_bias")
