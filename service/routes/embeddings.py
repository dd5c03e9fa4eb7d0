"""OpenAI's ``POST /v1/embeddings``: each input's prompt is prefilled by the engine (packed with
other prompts and decode rows, as any prefill) and its final hidden states pooled as the
model's sentence-transformers configuration says (or ``--pooling``); nothing is generated."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from litestar import Request, post
from litestar.params import JSONBody

from service import protocol_embeddings as e
from service.engine import Engine
from service.errors import InvalidRequest, ServiceError
from service.params import SamplingParams
from service.routes.common import Ctx, State, check_model, require_engine, unless_disconnected

MAX_INPUTS = 2048  # OpenAI's limit per request


def require_embedding(ctx: State) -> tuple[Engine, str, bool]:
    """(engine, pooling, normalize) of a server started for embeddings, else a 400 saying how
    to start one."""
    engine = require_engine(ctx)
    spec = ctx.settings.embedding
    if spec is None:
        raise InvalidRequest(f"this server was not started for embeddings: serve an embedding checkpoint, or start "
                             f"it with --task embed (and --pooling last|mean|cls) to embed with "
                             f"{ctx.settings.model_name}", param="model")
    return engine, spec[0], spec[1]


def _inputs(engine: Engine, data: Any) -> list[list[int]]:
    if isinstance(data, str):
        data = [data]
    if not data:
        raise InvalidRequest("input must not be empty", param="input")
    if all(isinstance(x, int) for x in data):
        return [list(data)]
    if len(data) > MAX_INPUTS:
        raise InvalidRequest(f"input has {len(data)} items; at most {MAX_INPUTS} per request", param="input")
    out = []
    for i, x in enumerate(data):
        if isinstance(x, str):
            if not x:
                raise InvalidRequest(f"input[{i}] is an empty string", param="input")
            out.append(engine.tokenizer.encode(x))
        elif isinstance(x, list) and x and all(isinstance(t, int) for t in x):
            out.append(list(x))
        else:
            raise InvalidRequest("input must be a string, a list of strings, a list of token ids or a list of "
                                 "lists of token ids", param="input")
    return out


@post("/v1/embeddings", summary="Embeddings (OpenAI)", status_code=200)
async def embeddings(data: JSONBody[e.EmbeddingRequest], ctx: Ctx, request: Request) -> e.EmbeddingResponse:
    engine, pooling, normalize = require_embedding(ctx)
    if check_model(ctx, data.model) is not None:
        raise InvalidRequest(f"model {data.model!r} is a LoRA adapter; embeddings come from the base model only",
                             param="model")
    if data.encoding_format not in ("float", "base64"):
        raise InvalidRequest(f"encoding_format must be float or base64, got {data.encoding_format!r}",
                             param="encoding_format")
    dims = engine.runner.cfg.hidden_size
    if data.dimensions is not None and not 1 <= data.dimensions <= dims:
        raise InvalidRequest(f"dimensions must be in [1, {dims}], got {data.dimensions}", param="dimensions")
    prompts = _inputs(engine, data.input)
    params = SamplingParams(temperature=0.0, max_tokens=0, embed=pooling)
    engine.check_submit(prompts, params)  # every input checked before any is submitted

    async def one(ids: list[int]) -> np.ndarray:
        async for out in engine.generate(ids, params):
            if out.finish_reason is not None:
                if out.embedding is None:  # the engine failed it (its log says why)
                    raise ServiceError(f"the input was not embedded ({out.finish_reason})")
                return out.embedding
        raise AssertionError("the engine's stream ended without a finish")

    vectors = await unless_disconnected(request, asyncio.gather(*(one(ids) for ids in prompts)))
    items = []
    for i, v in enumerate(vectors):
        v = v[:data.dimensions] if data.dimensions is not None else v
        if normalize or data.dimensions is not None:
            v = v / max(float(np.linalg.norm(v)), 1e-12)
        v = v.astype("<f4")
        items.append(e.Embedding(index=i, embedding=base64.b64encode(v.tobytes()).decode()
                                 if data.encoding_format == "base64" else v.tolist()))
    n = sum(len(ids) for ids in prompts)
    return e.EmbeddingResponse(data=items, model=ctx.settings.model_name,
                               usage=e.EmbeddingUsage(prompt_tokens=n, total_tokens=n))
