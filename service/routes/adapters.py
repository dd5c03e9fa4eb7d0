"""LoRA adapters loaded and unloaded while serving (vLLM's routes), when the server was started
with ``--enable-runtime-lora``: they change what the server serves."""

from __future__ import annotations

import asyncio

from litestar import post
from litestar.params import JSONBody

from model.lora import AdapterError, load_adapter
from service import protocol as p
from service.engine.adapters import AdapterLoadError
from service.errors import NotFound
from service.routes.common import Ctx, State, require_generation


def _engine(ctx: State):
    if not ctx.settings.runtime_lora:
        raise NotFound("loading adapters at runtime is off; start the server with --enable-runtime-lora")
    engine = require_generation(ctx)
    if engine.adapters is None:  # not reached: --enable-runtime-lora gives the engine adapter slots
        raise NotFound("this server has no adapter slots")
    return engine


@post("/v1/load_lora_adapter", summary="Load a LoRA adapter (PEFT directory) under a name", status_code=200)
async def load_lora_adapter(data: JSONBody[p.LoadLoraRequest], ctx: Ctx) -> p.LoraResponse:
    engine = _engine(ctx)
    if data.load_inplace:
        raise AdapterLoadError("load_inplace is not supported: unload the adapter, then load it", param="load_inplace")
    engine.adapters.check_new(data.lora_name, ctx.settings.model_name)
    spec = engine.adapters.spec
    try:  # the files are read off the event loop; only the device write waits for the engine
        adapter = await asyncio.to_thread(load_adapter, data.lora_path, data.lora_name, engine.runner.cfg, spec.rank)
    except AdapterError as e:
        raise AdapterLoadError(str(e), param="lora_path") from None
    await asyncio.wrap_future(engine.load_adapter(adapter))
    return p.LoraResponse(lora_name=data.lora_name, status="loaded")


@post("/v1/unload_lora_adapter", summary="Unload a LoRA adapter (requests using it finish first)", status_code=200)
async def unload_lora_adapter(data: JSONBody[p.UnloadLoraRequest], ctx: Ctx) -> p.LoraResponse:
    engine = _engine(ctx)
    engine.adapters.remove(data.lora_name)
    return p.LoraResponse(lora_name=data.lora_name, status="unloaded")
