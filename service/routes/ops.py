"""Operational routes: tokenize / detokenize / LMDeploy's encode, health and metrics."""

from __future__ import annotations

from litestar import Response, get, post
from litestar.params import JSONBody

from service import protocol as p
from service.errors import InvalidRequest
from service.metrics import CONTENT_TYPE
from service.routes.common import Ctx, chat_ids, check_model, require_engine


@post("/v1/tokenize", summary="Tokenize a prompt or chat messages", status_code=200)
async def tokenize(data: JSONBody[p.TokenizeRequest], ctx: Ctx) -> p.TokenizeResponse:
    engine = require_engine(ctx)
    check_model(ctx, data.model)
    if data.messages is not None:
        ids = chat_ids(ctx, engine, data.messages)
    elif data.prompt is not None:
        ids = engine.tokenizer.encode(data.prompt, add_special_tokens=data.add_special_tokens)
    else:
        raise InvalidRequest("give prompt or messages", param="prompt")
    return p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.session_len)


@post("/v1/detokenize", summary="Detokenize token ids", status_code=200)
async def detokenize(data: JSONBody[p.DetokenizeRequest], ctx: Ctx) -> p.DetokenizeResponse:
    engine = require_engine(ctx)
    check_model(ctx, data.model)
    vocab = engine.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in data.tokens):
        raise InvalidRequest(f"token ids must be in [0, {vocab})", param="tokens")
    return p.DetokenizeResponse(prompt=engine.tokenizer.decode(data.tokens, skip_special_tokens=False))


@post("/v1/encode", summary="Encode text to token ids (LMDeploy)", status_code=200)
async def encode(data: JSONBody[p.EncodeRequest], ctx: Ctx) -> p.EncodeResponse:
    engine = require_engine(ctx)

    def one(text: str) -> list[int]:
        if data.do_preprocess:
            return chat_ids(ctx, engine, [p.ChatMessage(role="user", content=text)])
        return engine.tokenizer.encode(text, add_special_tokens=data.add_bos)

    if isinstance(data.input, str):
        ids = one(data.input)
        return p.EncodeResponse(input_ids=ids, length=len(ids))
    all_ids = [one(t) for t in data.input]
    return p.EncodeResponse(input_ids=all_ids, length=[len(x) for x in all_ids])


@get("/health", summary="Readiness", opt={"public": True})
async def health(ctx: Ctx) -> Response:
    if ctx.engine is None:
        return Response({"status": "loading"}, status_code=503)
    if ctx.engine.draining:
        return Response({"status": "draining"}, status_code=503)
    if not ctx.engine.is_alive(ctx.settings.stall_timeout):
        return Response({"status": "engine stalled"}, status_code=503)
    return Response({"status": "ok"}, status_code=200)


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE)
async def metrics(ctx: Ctx) -> Response:
    engine = require_engine(ctx)
    return Response(engine.metrics.render(engine), media_type=CONTENT_TYPE)
