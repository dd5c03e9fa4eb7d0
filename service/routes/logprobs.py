"""Logprobs as the APIs report them: a token's text, chat's ``logprobs.content`` (shared by chat
completions and Responses) and the legacy completions ``logprobs``."""

from __future__ import annotations

from service import protocol as p
from service.engine import Engine, Output


def token_str(engine: Engine, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(engine: Engine, out: Output) -> p.ChoiceLogprobs | None:
    if not out.logprobs:
        return None
    content = []
    raw = engine.grammars.token_bytes  # a token's own bytes: its decoded text loses a split character's
    for lp in out.logprobs:
        content.append(p.TokenLogprobOut(
            token=token_str(engine, lp.token_id), logprob=lp.logprob, bytes=list(raw(lp.token_id)),
            top_logprobs=[p.TopLogprob(token=token_str(engine, i), logprob=v, bytes=list(raw(i)))
                          for i, v in lp.top]))
    return p.ChoiceLogprobs(content=content)


def completion_logprobs(engine: Engine, outs: list[Output], offset: int,
                        prompt: list[int] | None = None) -> p.CompletionLogprobs:
    """The legacy completions ``logprobs``: with ``prompt`` (echo), the prompt's tokens first
    (the first has no logprob, as in OpenAI's API), their offsets into the echoed text, then
    the completion's from ``offset``."""
    lp = p.CompletionLogprobs()
    if prompt:
        scores = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), [])
        at = 0
        for i, token in enumerate(prompt):
            s = token_str(engine, token)
            lp.tokens.append(s)
            lp.text_offset.append(at)
            at += len(s)
            if i == 0:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                t = scores[i - 1]
                lp.token_logprobs.append(t.logprob)
                lp.top_logprobs.append({token_str(engine, a): v for a, v in t.top})
    for out in outs:
        for t in out.logprobs:
            s = token_str(engine, t.token_id)
            lp.tokens.append(s)
            lp.token_logprobs.append(t.logprob)
            lp.top_logprobs.append({token_str(engine, i): v for i, v in t.top})
            lp.text_offset.append(offset)
            offset += len(s)
    return lp
