"""Compiled step programs kept on disk, so that a restart loads them instead of tracing.

JAX's persistent compilation cache saves XLA's compile, but it is keyed by the lowered
program: every start still traces and lowers each step shape (about 0.6 s each for the
bundled model's 30 layers, 22 shapes) before the cache can answer. A ``Program`` keys a
step's executables by what determines them without tracing: the code (a hash of this
package's sources and native kernels), the JAX and jaxlib versions, the machine
(``host_id``), the step's static settings, and every argument's shape, dtype and placement.
A restart then deserializes each executable (about 0.2 s) and never traces.

Only executables compiled in this process with JAX's own cache off are written: one that
JAX's cache gave back serializes without its machine code on the CPU. A file that does not
load (another jaxlib, a torn write) is compiled again and replaced.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

log = logging.getLogger(__name__)

_root: Path | None = None  # where programs are kept; None: not kept (each start traces)


def enable(root: Path | None) -> None:
    """Keep compiled step programs under ``root`` (None: stop keeping them; runners built
    afterwards read their setting). JAX's persistent cache is off meanwhile: an executable it
    gives back serializes without its machine code on the CPU, so every executable stored must
    be compiled afresh (what that cache would keep besides the steps compiles in moments)."""
    from jax._src import compilation_cache

    global _root
    _root = None if root is None else Path(root)
    jax.config.update("jax_enable_compilation_cache", _root is None)
    compilation_cache.reset_cache()  # it decides whether it is on once, at its first use


def enabled() -> bool:
    return _root is not None


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of what shapes a step's program: every Python source of the packages that trace
    it and the native kernels' sources, with the versions of JAX and jaxlib, the Python
    version and the settings read from the environment while tracing."""
    top = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in ("model", "sharding", "service"):
        for path in sorted((top / pkg).rglob("*")):
            if path.suffix in (".py", ".cc", ".h") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(top)).encode())
                h.update(path.read_bytes())
    import jaxlib

    h.update(f"{jax.__version__} {jaxlib.__version__} {sys.version}".encode())
    for name in sorted(os.environ):
        if name.startswith(("XLASERVE_", "XLA_", "JAX_")) and name != "XLASERVE_CACHE":
            h.update(f"{name}={os.environ[name]}".encode())
    return h.hexdigest()


def _leaf(x) -> tuple:
    # An array, a numpy value, or a ShapeDtypeStruct (a warm-up's stand-in for a step's output).
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), np.dtype(x.dtype).name
    return np.shape(x), np.result_type(x).name


def _signature(args: tuple) -> tuple:
    """What an argument list compiles by: its tree and each leaf's shape and dtype (a numpy
    value goes in as a device array of the same shape and dtype)."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple(map(_leaf, leaves))


def _placements(args: tuple) -> str:
    return repr([getattr(x, "sharding", None) for x in jax.tree.leaves(args)])


class Program:
    """A jitted step called through its compiled executables, one per shape of the arguments
    at ``varying``. The others (weights, KV cache, sampling state) keep their shapes and
    placements for the runner's life; an executable refuses anything else with an error,
    never a wrong result. ``static``: a text of everything else the traced program depends on
    (the model's config, the backend, the step's settings).

    ``executable`` makes one ready without running it (a warm-up needs no step run). With a
    store (``enable``, and ``keep``: false for a step each process of a mesh must trace
    alike) executables are read from it and written to it; without one they live in memory."""

    def __init__(self, jitted: Callable, name: str, static: str, varying: tuple[int, ...], keep: bool = True):
        self._jitted = jitted
        self._name = name
        self._static = static
        self._varying = varying
        self._root = _root if keep else None
        self._executables: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.loaded = 0  # executables read from the store
        self.compiled = 0  # executables compiled in this process

    def key(self, *args) -> tuple:
        """The in-memory key of these arguments' executable (the varying ones' signature)."""
        return _signature(tuple(args[i] for i in self._varying))

    def __call__(self, *args):
        exe = self._executables.get(self.key(*args))
        if exe is None:
            exe = self.executable(*args)
        return exe(*args)

    def lower(self, *args):
        """The jitted step lowered for these arguments (to read its program)."""
        return self._jitted.lower(*args)

    def _cache_size(self) -> int:
        return len(self._executables)

    def ready(self, *args) -> bool:
        return self.key(*args) in self._executables

    def stored(self, *args) -> bool:
        """Whether these arguments' executable is in the store (loading it compiles nothing)."""
        return self._root is not None and self._path(args).exists()

    def executable(self, *args):
        """The executable these arguments (arrays, or ShapeDtypeStructs with their placements)
        run: in memory, else from the store, else compiled now (and stored). Any thread."""
        key = self.key(*args)
        with self._lock:
            exe = self._executables.get(key)
        if exe is None:  # loading or compiling outside the lock: two shapes may load at once
            made, loaded = self._load_or_compile(args)
            with self._lock:
                exe = self._executables.setdefault(key, made)
                if exe is made:  # counted once, should two threads have made the same one
                    self.loaded += loaded
                    self.compiled += not loaded
        return exe

    def _path(self, args: tuple) -> Path:
        h = hashlib.sha256()
        for part in (code_fingerprint(), self._name, self._static, repr(_signature(args)), _placements(args),
                     repr([str(d) for d in jax.devices()])):
            h.update(part.encode())
            h.update(b"\0")
        return self._root / f"{self._name}-{h.hexdigest()[:32]}.bin"

    def _load_or_compile(self, args: tuple) -> tuple[Any, bool]:
        """(the executable, whether it was read from the store rather than compiled)."""
        if self._root is None:
            return self._jitted.lower(*args).compile(), False
        from jax.experimental import serialize_executable

        path = self._path(args)
        if path.exists():
            try:
                payload, in_tree, out_tree, ids = pickle.loads(path.read_bytes())
                by_id = {d.id: d for d in jax.devices()}
                return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                 execution_devices=[by_id[i] for i in ids]), True
            except Exception as e:  # another jaxlib's format, a torn file: compile it again
                log.info("compiled program %s did not load (%s); compiling it again", path.name, e)
        # JAX's persistent cache is off while programs are stored (see enable).
        exe = self._jitted.lower(*args).compile()
        try:
            # The devices it runs on, in the order of its device assignment.
            ids = [d.id for d in exe._executable.xla_executable.local_devices()]
            blob = pickle.dumps((*serialize_executable.serialize(exe), ids))
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
                f.write(blob)
            os.replace(f.name, path)  # whole or not at all, should two servers start at once
        except Exception as e:  # a read-only cache, a backend that cannot serialize
            log.info("compiled program %s not kept (%s)", path.name, e)
        return exe, False
