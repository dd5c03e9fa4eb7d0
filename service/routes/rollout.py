"""The routes a training loop drives: sleep and wake (``--enable-sleep-mode``), weights updated
in place, pause and resume, and aborting a request by its id (``--enable-weight-updates``).
They change what the server serves, so each is off unless its flag is given. Every call that
waits (for running requests to finish, for weights to load) runs off the event loop."""

from __future__ import annotations

import asyncio

from litestar import get, post
from litestar.params import FromQuery, JSONBody

from model.convert.update import UpdateError
from model.weights import WeightsError
from service import protocol_rollout as r
from service.engine import Engine
from service.errors import InvalidRequest, NotFound
from service.routes.common import Ctx, State, require_generation


def _sleep_engine(ctx: State) -> Engine:
    if not ctx.settings.sleep_mode:
        raise NotFound("sleep mode is off; start the server with --enable-sleep-mode")
    return require_generation(ctx)


def _update_engine(ctx: State) -> Engine:
    if not ctx.settings.weight_updates:
        raise NotFound("weight updates are off; start the server with --enable-weight-updates")
    return require_generation(ctx)


def _mode(mode: str) -> str:
    if mode not in ("wait", "abort"):
        raise InvalidRequest(f"mode must be 'wait' or 'abort', got {mode!r}", param="mode")
    return mode


@post("/sleep", summary="Free the KV cache and move the weights off the device (level 1: to host memory; "
      "2: dropped)", status_code=200)
async def sleep(ctx: Ctx, level: FromQuery[int] = 1, mode: FromQuery[str] = "wait",
                timeout: FromQuery[float | None] = None) -> r.SleepState:
    engine = _sleep_engine(ctx)
    if level not in (1, 2):
        raise InvalidRequest(f"level must be 1 or 2, got {level}", param="level")
    aborted = await asyncio.to_thread(engine.sleep, level, _mode(mode), timeout)
    return r.SleepState(is_sleeping=engine.is_sleeping, level=engine.sleep_level, aborted=aborted)


async def _wake(ctx: State, tags: list[str] | None) -> r.SleepState:
    engine = _sleep_engine(ctx)
    await asyncio.to_thread(engine.wake_up, tuple(tags or ("weights", "kv_cache")))
    return r.SleepState(is_sleeping=engine.is_sleeping, level=engine.sleep_level)


@post("/wakeup", summary="Bring back what /sleep freed (tags: weights, kv_cache; default both)", status_code=200)
async def wakeup(ctx: Ctx, tags: FromQuery[list[str] | None] = None) -> r.SleepState:
    return await _wake(ctx, tags)


@post("/wake_up", summary="/wakeup under vLLM's name", status_code=200, include_in_schema=False)
async def wake_up(ctx: Ctx, tags: FromQuery[list[str] | None] = None) -> r.SleepState:
    return await _wake(ctx, tags)


@get("/is_sleeping", summary="Whether the server sleeps")
async def is_sleeping(ctx: Ctx) -> r.SleepState:
    engine = _sleep_engine(ctx)
    return r.SleepState(is_sleeping=engine.is_sleeping, level=engine.sleep_level)


async def _update(ctx: State, data: r.UpdateWeightsRequest) -> r.UpdateWeightsResponse:
    engine = _update_engine(ctx)
    mode = "abort" if data.abort_all_requests else "wait"
    try:
        version = await asyncio.to_thread(engine.update_weights_from_path, data.model_path, data.load_format,
                                          data.weight_version, mode)
    except UpdateError as e:
        raise InvalidRequest(str(e), param="load_format" if "load_format" in str(e) else "model_path") from None
    except WeightsError as e:
        raise InvalidRequest(f"{data.model_path}: {e}", param="model_path") from None
    return r.UpdateWeightsResponse(success=True, message=f"weights updated from {data.model_path}",
                                   weight_version=version)


@post("/update_weights", summary="Serve new weights from files of the served architecture, between steps",
      status_code=200)
async def update_weights(data: JSONBody[r.UpdateWeightsRequest], ctx: Ctx) -> r.UpdateWeightsResponse:
    return await _update(ctx, data)


@post("/update_weights_from_disk", summary="/update_weights under SGLang's name", status_code=200,
      include_in_schema=False)
async def update_weights_from_disk(data: JSONBody[r.UpdateWeightsRequest], ctx: Ctx) -> r.UpdateWeightsResponse:
    return await _update(ctx, data)


@get("/get_weight_version", summary="The served weights' version")
async def get_weight_version(ctx: Ctx) -> r.WeightVersion:
    return r.WeightVersion(weight_version=require_generation(ctx).weight_version)


@post("/pause", summary="Stop admitting requests (new ones wait); running ones finish (mode=wait) or are "
      "aborted (mode=abort)", status_code=200)
async def pause(ctx: Ctx, mode: FromQuery[str] = "wait", timeout: FromQuery[float | None] = None) -> r.PauseState:
    engine = _update_engine(ctx)
    aborted = await asyncio.to_thread(engine.pause, _mode(mode), timeout)
    return r.PauseState(is_paused=engine.paused, aborted=aborted, waiting=engine.waiting.count)


@post("/resume", summary="Admit requests again after /pause", status_code=200)
async def resume(ctx: Ctx) -> r.PauseState:
    engine = _update_engine(ctx)
    engine.resume()
    return r.PauseState(is_paused=engine.paused, waiting=engine.waiting.count)


@get("/is_paused", summary="Whether admission is paused")
async def is_paused(ctx: Ctx) -> r.PauseState:
    engine = _update_engine(ctx)
    return r.PauseState(is_paused=engine.paused, waiting=engine.waiting.count)


@post("/abort_request", summary="Abort a request by its response id (every choice of it), or all", status_code=200)
async def abort_request(data: JSONBody[r.AbortRequest], ctx: Ctx) -> r.AbortResponse:
    engine = _update_engine(ctx)
    if (data.rid is None) == (not data.abort_all):
        raise InvalidRequest("give rid, or abort_all: true", param="rid")
    aborted = await asyncio.wrap_future(engine.abort_request(None if data.abort_all else data.rid))
    return r.AbortResponse(aborted=aborted)


ROUTES = [sleep, wakeup, wake_up, is_sleeping, update_weights, update_weights_from_disk, get_weight_version,
          pause, resume, is_paused, abort_request]
