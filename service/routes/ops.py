"""Operational routes: tokenize / detokenize / LMDeploy's encode, health, metrics and the load
report a gateway balances on."""

from __future__ import annotations

import datetime

import msgspec
from litestar import Response, get, post
from litestar.params import FromQuery, JSONBody

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
    if ctx.engine.failed is not None:
        return Response({"status": "engine failed", "detail": ctx.engine.failed}, status_code=503)
    if not ctx.engine.is_alive(ctx.settings.stall_timeout):
        return Response({"status": "engine stalled"}, status_code=503)
    # Asleep (POST /sleep) the process is healthy, and says it serves no requests until woken.
    return Response({"status": "sleeping" if ctx.engine.is_sleeping else "ok"}, status_code=200)


class SchedulerLoad(msgspec.Struct):
    """One data-parallel rank's load, in the fields SGLang's ``/v1/loads`` uses (the gateway in
    front of replicas, ``xlaserve serve proxy``, reads them). The engine reports its data
    replicas together, as rank 0: it places each request in a replica itself."""

    dp_rank: int
    num_running_reqs: int
    num_waiting_reqs: int
    num_total_reqs: int
    num_used_tokens: int  # KV positions in blocks that requests and sessions reference
    max_total_num_tokens: int  # the KV pool's positions, all replicas together
    max_running_requests: int  # decode slots
    token_usage: float  # num_used_tokens / max_total_num_tokens
    cache_hit_rate: float  # cached prompt tokens / all prompt tokens since start


class LoadAggregate(msgspec.Struct):
    total_running_reqs: int
    total_waiting_reqs: int
    total_reqs: int
    total_tokens: int
    avg_token_usage: float


class LoadsResponse(msgspec.Struct):
    timestamp: str
    version: str
    dp_rank_count: int
    loads: list[SchedulerLoad]
    aggregate: LoadAggregate


# Sections a caller may ask for with ?include=: "core" is what this server has; the others
# (SGLang's disaggregation, queue and memory breakdowns) have no counterpart here and are left
# out of the answer, as SGLang leaves out sections it does not run.
LOAD_SECTIONS = {"core", "all", "queues", "memory", "disagg", "speculative", "lora"}


@get("/v1/loads", summary="Running and waiting requests and KV usage, for a gateway's balancing")
async def loads(ctx: Ctx, include: FromQuery[str] = "core") -> LoadsResponse:
    engine = require_engine(ctx)
    unknown = sorted(set(include.split(",")) - LOAD_SECTIONS)
    if unknown:
        raise InvalidRequest(f"include: unknown section {unknown[0]!r}; one of {sorted(LOAD_SECTIONS)}",
                             param="include")
    snap = engine.snapshot()
    running, waiting = int(snap["running"]), int(snap["waiting"])
    used, capacity = int(snap["kv_tokens"]), int(snap["kv_capacity"])
    prompt = snap["prompt_tokens"] + snap["cached_tokens"]
    usage = used / capacity if capacity else 0.0
    load = SchedulerLoad(dp_rank=0, num_running_reqs=running, num_waiting_reqs=waiting,
                         num_total_reqs=running + waiting, num_used_tokens=used, max_total_num_tokens=capacity,
                         max_running_requests=engine.runner.slots, token_usage=usage,
                         cache_hit_rate=snap["cached_tokens"] / prompt if prompt else 0.0)
    return LoadsResponse(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(), version="xlaserve",
                         dp_rank_count=1, loads=[load],
                         aggregate=LoadAggregate(total_running_reqs=running, total_waiting_reqs=waiting,
                                                 total_reqs=running + waiting, total_tokens=used,
                                                 avg_token_usage=usage))


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE)
async def metrics(ctx: Ctx) -> Response:
    engine = require_engine(ctx)
    return Response(engine.metrics.render(engine), media_type=CONTENT_TYPE)
