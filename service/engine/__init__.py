"""The engine in parts: ``request`` (what was submitted, and the engine's sequence of it),
``slots`` (slot table, prefix reuse, sessions), ``scheduler`` (a plain-data ``plan`` per step),
``runner`` (device state, ``execute(plan)``), ``output`` (detokenize, stops, finish, metrics),
``bridge`` (engine thread to asyncio) and ``core`` (the thread's loop)."""

from service.engine.core import Engine
from service.engine.request import Output, Request, Sequence, TokenLogprob

__all__ = ["Engine", "Output", "Request", "Sequence", "TokenLogprob"]
