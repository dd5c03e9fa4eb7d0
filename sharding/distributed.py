"""One mesh over several processes (machines), with JAX's own multi-controller runtime.

Every process runs the same jitted steps on its part of the mesh. Process 0 owns the
scheduler (and the HTTP server); before each step it broadcasts the call (the runner method's
name and its host arguments) and the other processes replay it, one generic mechanism for
every step. Nothing else crosses between processes: params are restored by each process into
its own shards, and step outputs are replicated, so process 0 reads them locally.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

STOP, CALL = 0, 1
HEADER = 2  # int32 words: op, payload bytes


def initialize(coordinator_address: str, nnodes: int, node_rank: int) -> None:
    """Join the job; call before anything touches a device. On CPU the collectives go over
    gloo (TCP)."""
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank must be in [0, {nnodes}), got {node_rank}")
    if not coordinator_address:
        raise ValueError("--coordinator-address HOST:PORT is required with --nnodes > 1")
    _stdout_for_output_only()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=nnodes,
                               process_id=node_rank)
    log.info("process %d/%d joined: %d local of %d devices", node_rank, nnodes,
             jax.local_device_count(), jax.device_count())


def _stdout_for_output_only() -> None:
    """gloo's C++ side announces its connections on file descriptor 1, at any moment, cutting
    into the program's output. Point descriptor 1 at stderr and give Python's ``sys.stdout``
    the original stdout, so stdout carries only what the program prints itself."""
    sys.stdout.flush()
    output = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(output, "w", buffering=1)


class StepChannel:
    """Process 0 announces each step's call; the others receive it (broadcasts over the mesh).

    A call is pickled: the processes of one job run the same code and trust each other, and
    the arguments are small host values (numpy arrays, ints, tuples of them)."""

    def __init__(self) -> None:
        self.leader = jax.process_index() == 0

    @staticmethod
    def _broadcast(tree: Any) -> Any:
        from jax.experimental import multihost_utils

        return multihost_utils.broadcast_one_to_all(tree)

    def announce(self, name: str, args: tuple) -> None:
        payload = np.frombuffer(pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        self._broadcast(np.asarray([CALL, payload.size], np.int32))
        self._broadcast(payload)

    def stop(self) -> None:
        self._broadcast(np.asarray([STOP, 0], np.int32))

    def next_call(self) -> tuple[str, tuple] | None:
        """The announced (method name, arguments), or None when process 0 stops."""
        op, size = (int(x) for x in self._broadcast(np.zeros((HEADER,), np.int32)))
        if op == STOP:
            return None
        payload = self._broadcast(np.zeros((size,), np.uint8))
        return pickle.loads(np.asarray(payload).tobytes())
