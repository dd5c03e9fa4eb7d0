"""The LoRA adapters an engine serves, by name, each in one of the runner's adapter slots.

A request names its adapter (``SamplingParams.adapter``); ``resolve`` gives the slot its tokens
use and the identity its KV's hash chain starts from. Names are read and changed from any
thread (under a lock); slots are written on the engine thread only, between steps.

Loading more adapters than there are slots (``--max-loras``) is refused, naming the flag: an
adapter keeps its slot while it is loaded. Unloading takes the name away at once (new requests
get 404) and leaves the slot to the requests still using it: a later load takes a slot no
loaded adapter holds and no submitted request uses, so a running request never sees its
adapter's weights change.
"""

from __future__ import annotations

import threading
from typing import Iterable

from model.lora import Adapter, AdapterError, BankSpec
from service.errors import InvalidRequest, ModelNotFound


class AdapterLoadError(InvalidRequest):
    """An adapter that cannot be loaded (HTTP 400 naming the field)."""


class AdapterRegistry:
    def __init__(self, spec: BankSpec, resident: dict[int, Adapter]):
        self.spec = spec
        self._lock = threading.Lock()
        self._by_name: dict[str, tuple[Adapter, int]] = {a.name: (a, slot) for slot, a in resident.items()}

    def resolve(self, name: str) -> tuple[int, bytes]:
        """(adapter slot, identity) of a loaded adapter; ModelNotFound otherwise."""
        with self._lock:
            entry = self._by_name.get(name)
        if entry is None:
            raise ModelNotFound(f"The model '{name}' does not exist")
        return entry[1], entry[0].identity

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._by_name

    def loaded(self) -> list[Adapter]:
        """The loaded adapters, in slot order."""
        with self._lock:
            return [a for a, _ in sorted(self._by_name.values(), key=lambda e: e[1])]

    def check_new(self, name: str, base: str) -> None:
        if not name or name == base:
            raise AdapterLoadError(f"lora_name {name!r} must be a name other than the base model's", param="lora_name")
        if name in self:
            raise AdapterLoadError(f"an adapter named {name!r} is already loaded; unload it first",
                                   param="lora_name")

    def install(self, adapter: Adapter, busy: Iterable[int], write) -> int:
        """Put ``adapter`` in a free slot (engine thread): one no loaded adapter holds and no
        submitted request uses (``busy``); ``write(slot, adapter)`` writes the device's copy."""
        try:
            self.spec.check(adapter)
        except AdapterError as e:
            raise AdapterLoadError(str(e), param="lora_path") from None
        with self._lock:
            if adapter.name in self._by_name:
                raise AdapterLoadError(f"an adapter named {adapter.name!r} is already loaded", param="lora_name")
            taken = {slot for _, slot in self._by_name.values()} | set(busy)
            free = [s for s in range(self.spec.slots) if s not in taken]
            if not free:
                raise AdapterLoadError(
                    f"all {self.spec.slots} adapter slots are taken (--max-loras {self.spec.slots}); unload an "
                    "adapter first (a slot is free once no running request uses it)", param="lora_name")
            write(free[0], adapter)
            self._by_name[adapter.name] = (adapter, free[0])
            return free[0]

    def remove(self, name: str) -> Adapter:
        with self._lock:
            entry = self._by_name.pop(name, None)
        if entry is None:
            raise ModelNotFound(f"No adapter named {name!r} is loaded")
        return entry[0]
