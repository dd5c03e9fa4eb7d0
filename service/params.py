"""What a request asks of the sampler and of the stop logic: plain host data, free of jax, so
the wire types (``service.protocol``) and the clients import it cheaply. The device side of
sampling is ``service.sampling``."""

from __future__ import annotations

import dataclasses
from typing import Any, Union

from service.errors import InvalidRequest

MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler and of the stop logic (host side)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style, over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    max_tokens: int | None = None  # None: the rest of the session length
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: chosen token's logprob + top k alternatives
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob + top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # An llguidance grammar (see service.structured) the output must match; it applies after
    # ``grammar_after`` appears in the output when that is set (the end of a reasoning block).
    grammar: str | None = None
    grammar_after: str | None = None
    # An embedding request: its prompt's final hidden states pooled ("last", "mean" or "cls")
    # come back in its Output; nothing is generated (max_tokens 0).
    embed: str | None = None
    # The engine may check proposed tokens in one call (speculative decoding, where the server
    # enables it); the output is the same either way, so this only opts out of the work.
    speculative: bool = True
    # Predicted Outputs: token ids the answer is expected to repeat; proposed as drafts.
    prediction: tuple[int, ...] = ()
    # The LoRA adapter (by name) whose model generates; None: the base model.
    adapter: str | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            # 0 only when the prompt is scored: nothing is generated, the prompt is the answer.
            (self.max_tokens is None or self.max_tokens >= (0 if self.scores_only else 1),
             "max_tokens", "must be >= 0" if self.scores_only else "must be >= 1"),
            (self.embed in (None, "last", "mean", "cls"), "embed", "must be last, mean or cls"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
             "logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for ok, param, msg in checks:
            if not ok:
                raise InvalidSamplingParam(param, f"{param} {msg}, got {getattr(self, param, None)!r}")


    @property
    def scores_only(self) -> bool:
        """The prompt itself is the answer (scored, or pooled into an embedding): it may ask
        for no tokens."""
        return self.prompt_logprobs is not None or self.embed is not None

    @property
    def computes_prompt(self) -> bool:
        """Every prompt position must be computed (no cached prefix): its scores, or a pooling
        over all of them, need each one's hidden state."""
        return self.prompt_logprobs is not None or self.embed in ("mean", "cls")


class InvalidSamplingParam(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# -- a request's fields -> SamplingParams -------------------------------------------------------


def _stops(stop: Union[str, list[str], None]) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 16 or any(not s for s in stops):
        raise InvalidRequest("stop must be at most 16 non-empty strings", param="stop")
    return stops


# OpenAI's own bound on logit_bias entries; each slot's sampling row holds this many (the
# engine refuses more on submit: ``service.engine.limits.Limits.token_ids``).
MAX_LOGIT_BIAS = 300


def _bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    try:
        out = tuple((int(k), float(v)) for k, v in bias.items())
    except ValueError:
        raise InvalidRequest("logit_bias keys must be token ids", param="logit_bias") from None
    if any(not -100 <= v <= 100 for _, v in out):
        raise InvalidRequest("logit_bias values must be in [-100, 100]", param="logit_bias")
    return out


def from_request(req: Any, defaults: SamplingParams | None, max_tokens: int | None,
              logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """A request's fields (any wire type of ``service.protocol``) as SamplingParams; a bad value
    is an InvalidRequest naming its field. Precedence: the request's value, then the server
    default (``defaults``), then OpenAI's default (SamplingParams' own)."""
    d = defaults or SamplingParams()

    def pick(name: str):
        value = getattr(req, name, None)
        return value if value is not None else getattr(d, name)

    n = getattr(req, "n", 1)
    if n < 1 or n > 16:
        raise InvalidRequest(f"n must be in [1, 16], got {n}", param="n")
    try:
        return SamplingParams(
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=pick("top_k"),
            min_p=pick("min_p"),
            repetition_penalty=pick("repetition_penalty"),
            presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            logit_bias=_bias(getattr(req, "logit_bias", None)),
            seed=getattr(req, "seed", None),
            max_tokens=max_tokens,
            min_tokens=getattr(req, "min_tokens", None) or getattr(req, "min_new_tokens", None) or 0,
            stop=_stops(req.stop),
            stop_token_ids=tuple(getattr(req, "stop_token_ids", None) or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=getattr(req, "include_stop_str_in_output", False),
            grammar=req.grammar() if hasattr(req, "grammar") else None,
            speculative=getattr(req, "speculative", True),
        )
    except InvalidSamplingParam as e:
        raise InvalidRequest(str(e), param=e.param) from None
