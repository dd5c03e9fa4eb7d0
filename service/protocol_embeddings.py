"""Wire types of OpenAI's embeddings API (``POST /v1/embeddings``; see
https://platform.openai.com/docs/api-reference/embeddings). Never imports jax.

Served: ``input`` (a string, a list of strings, token ids, or a list of those),
``encoding_format`` (float, or base64 of little-endian float32), ``dimensions`` (the first N
dimensions, normalised again: Matryoshka truncation); ``user`` is a no-op.
"""

from __future__ import annotations

from typing import Union

from service import protocol as p

_Req, _Resp = p._Req, p._Resp


class EmbeddingRequest(_Req):
    # str | list[str] | list[int] | list[list[int]]; the element kinds are checked when the
    # input is tokenized (msgspec allows one array type in a union).
    input: Union[str, list[Union[str, int, list[int]]]]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None  # no-op


class Embedding(_Resp):
    index: int
    embedding: Union[list[float], str]
    object: str = "embedding"


class EmbeddingUsage(_Resp):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingResponse(_Resp):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: str = "list"
