"""The runner: device state (params, paged KV cache, per-slot sampling state) and the host API
that runs the jitted steps of ``steps`` over it, padded to the shapes of ``shapes``; ``execute``
runs a scheduler's plan, whose ops it takes as they are (``run_prefill``, ``dispatch_decode``).

The KV cache is a pool of ``num_blocks`` blocks of ``block_size`` positions per data replica
(and one of ``window_blocks`` for the sliding-window layers); each step is given every KV
group's block tables ((groups, slots, max blocks) int32, the block manager's).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import layers, lora, weights
from model import vision as vision_model
from model.backends import Backend, keep_freed_memory, param_bytes, select
from model.config import ModelConfig
from service import sampling as smp
from service.engine import programs
from service.engine.plan import Chunk, Decode, Prefill, StepPlan
from service.engine.shapes import StepShapes
from service.engine.step_io import DecodeInputs, PrefillInputs, Sampled, StepOutput
from service.engine.steps import Steps
from service.params import MAX_TOP_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)

_compiles = 0


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    global _compiles
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def compile_count() -> int:
    """XLA compilations (or persistent-cache loads) in this process so far."""
    return _compiles


def _host(x: jax.Array) -> np.ndarray:
    """A replicated step output as a host array (this process's replica: on a mesh spanning
    processes the others' are not addressable here)."""
    return np.asarray(x.addressable_data(0))


def replayed(method):
    """A step every process of a multi-process mesh runs: process 0 announces the call (its
    name and host arguments) before running it, and the others replay it in ``follow``."""

    @functools.wraps(method)
    def announced(self, *args):
        if self.channel is not None and self.channel.leader:
            self.channel.announce(method.__name__, args)
        return method(self, *args)

    return announced


@dataclasses.dataclass
class DecodeHandle:
    """A dispatched decode step: its device outputs, and where its slots' rows are."""

    out: tuple
    where: np.ndarray
    rows: np.ndarray


class ModelRunner:
    """Owns the device state. With a sharding ``plan`` (see ``sharding``), params, KV cache and
    per-slot state live sharded on its mesh: weights split over ``model`` (tensor parallel),
    slots over ``data`` (data parallel); logits are gathered before sampling."""

    def __init__(self, cfg: ModelConfig, params: Any, max_batch_size: int, session_len: int,
                 eos_ids: frozenset[int] = frozenset(), max_prefill_chunk: int = 512,
                 top_logprobs: int = MAX_TOP_LOGPROBS, plan: Any = None, channel: Any = None,
                 quantize: str | None = None, kv_cache_dtype: str | None = None,
                 backend: Backend | None = None, block_size: int = 32, num_blocks: int | None = None,
                 window_blocks: int = 0, adapters: lora.BankSpec | None = None, vision: tuple | None = None):
        self.cfg = cfg
        self.plan = plan
        self.channel = channel  # sharding.distributed.StepChannel when the mesh spans processes
        mask = np.zeros((cfg.vocab_size,), bool)
        mask[[i for i in eos_ids if 0 <= i < cfg.vocab_size]] = True
        self.slots = max_batch_size
        self.session_len = session_len
        self.max_chunk = min(max_prefill_chunk, session_len)
        # The device path, chosen once: the native CPU kernels on one CPU device, else XLA.
        self.backend = backend or select(sharded=plan is not None, cfg=cfg, plan=plan)
        self.backend.check(quantize, kv_cache_dtype)
        self._quantize = quantize
        if jax.default_backend() == "cpu":
            keep_freed_memory()
        self.full_width = plan is not None and plan.mesh.shape["data"] > 1
        self.replicas = 1 if plan is None else plan.mesh.shape["data"]
        if max_batch_size % self.replicas:
            raise ValueError(f"{max_batch_size} slots do not split over {self.replicas} data replicas")
        self.block_size = block_size
        self.max_blocks = -(-session_len // block_size)  # table entries of one sequence
        # Per replica; by default every slot can hold a whole session.
        self.num_blocks = num_blocks or max_batch_size // self.replicas * self.max_blocks
        # The sliding-window layers' own pool (see service.engine.blocks): ``window_blocks``
        # blocks per replica, the tables a step takes then (2, slots, max blocks).
        self.window = cfg.sliding_window if window_blocks and cfg.sliding_window and window_blocks < self.num_blocks \
            else None
        self.window_blocks = window_blocks if self.window else 0
        if self.window and window_blocks < -(-self.window // block_size) + 2:
            raise ValueError(f"{window_blocks} blocks of {block_size} cannot hold one sequence's window of "
                             f"{self.window} positions")
        self.kv_groups = 2 if self.window else 1  # the tables' first axis: full attention, then windows
        # A vision-language model's tower: (VisionConfig, params placed on every device).
        self.vision = vision
        if vision is not None:
            vc = vision[0]
            if self.max_chunk < vc.tokens_per_image:
                raise ValueError(f"a prefill chunk of {self.max_chunk} tokens cannot hold an image's "
                                 f"{vc.tokens_per_image}")
            self._encode = programs.Program(jax.jit(lambda p, x: vision_model.encode(p, vc, x)), "encode",
                                            repr(vc), (1,), channel is None)
        self.shapes = StepShapes(self.backend, max_batch_size, cfg.vocab_size, session_len, self.max_chunk,
                                 self.full_width, block_size, cfg.hidden_size if vision is not None else 0)
        # Every array is committed to its final placement, like every later (jit-output) value
        # of it: otherwise the second call of each step sees new input shardings and compiles
        # all over again.
        if plan is None:
            device = jax.devices()[0]
            place = lambda tree: jax.device_put(tree, device)  # noqa: E731
            self._cache_sh = self._sampling_sh = self._out_sh = None
            self.params = self.backend.prepare(params, cfg, quantize)
            self.eos_mask = place(jnp.asarray(mask))
        else:
            cache_sh = plan.cache_sharding()
            self._cache_sh = [(cache_sh, cache_sh)] * cfg.num_layers
            self._sampling_sh = jax.tree.map(lambda x: plan.slot_sharding(x.ndim),
                                             jax.eval_shape(lambda: smp.SlotSampling.empty(
                                                 max_batch_size, cfg.vocab_size)))
            self._out_sh = plan.replicated
            self.params = self.backend.prepare(jax.device_put(params, plan.param_shardings(cfg)), cfg)
            self.eos_mask = jax.device_put(mask, plan.replicated)
        # Every step looks its positions' cos/sin up here (see layers.rope_tables).
        self.rope = jax.device_put(layers.rope_tables(cfg, session_len),
                                   jax.devices()[0] if plan is None else plan.replicated)
        kv_dtype = self._kv_dtype = self.backend.cache_dtype(cfg, kv_cache_dtype)
        # Tests set this to an exception the next step raises after its state was donated (as a
        # step failing on the device would), to check that the engine recovers.
        self.fault: Exception | None = None
        self._new_state()
        # What new weights must prepare into (``swap_params``): the same tree, shapes, dtypes and
        # placements, so the compiled steps take them as they are.
        self._param_avals = self._avals(self.params)
        self._host_params = None  # the weights while asleep at level 1 (``sleep``)
        self._host_bank = None
        weight_mib = param_bytes(self.params) / 2**20
        cache_mib = sum(x.nbytes for kv in self.cache for x in kv) / 2**20
        log.info("%s: weights %s, %.0f MiB; KV cache %s, %.0f MiB: %d blocks of %d positions (%d tokens)%s%s, "
                 "%d slots", self.backend.describe(),
                 quantize or cfg.dtype, weight_mib, "bfloat16" if kv_dtype == jnp.uint16 else kv_dtype.name,
                 cache_mib, self.num_blocks, block_size, self.num_blocks * block_size,
                 f", the {sum(map(cfg.is_sliding, range(cfg.num_layers)))} sliding-window layers "
                 f"{self.window_blocks} blocks" if self.window else "",
                 f" per data replica (x{self.replicas})" if self.replicas > 1 else "", max_batch_size)
        self._token_sharding = (jax.sharding.make_single_device_sharding(jax.devices()[0]) if plan is None
                                else plan.replicated)
        if adapters is not None:  # the update is added to the activations, in their dtype
            adapters = dataclasses.replace(adapters, dtype=self.backend.activation_dtype(cfg))
        steps = Steps(cfg, self.backend, max_batch_size, top_logprobs, plan, adapters)
        prefill, decode, set_row, score = steps.jitted(self._cache_sh, self._sampling_sh, self._out_sh)
        # Kept on disk when the CLI enables it (see ``programs``), so a restart does not trace them again;
        # a step a mesh of several processes runs is traced by each process alike.
        static, keep = steps.describe(), channel is None
        self._prefill = programs.Program(prefill, "prefill", static, (5, 6, 7), keep)
        self._decode = programs.Program(decode, "decode", static, (5, 6, 7), keep)
        self._set_row = programs.Program(set_row, "set_row", static, (1, 2), keep)
        self._score = programs.Program(score, "score", static, (1, 2, 3), keep)
        # LoRA adapters: ``adapters.slots`` of them on the device at once (``load_adapter``), and
        # each decode slot's adapter slot (-1: the base model; the last entry is padding's).
        self.adapters = adapters
        self.slot_adapter = np.full((max_batch_size + 1,), -1, np.int32)
        # What steps read: None without a bank, so a server without adapters does no per-step work for them.
        self._adapter_rows = self.slot_adapter if adapters is not None else None
        self.resident: dict[int, lora.Adapter] = {}  # adapter slot -> the adapter written there
        self.bank = None
        if adapters is not None:
            if channel is not None:
                raise ValueError("LoRA adapters are not supported on a mesh spanning processes")
            bank_sh = None if plan is None else adapters.shardings(cfg, plan)
            self.bank = jax.jit(lambda: adapters.empty(cfg), out_shardings=bank_sh)()
            if plan is None:
                self.bank = jax.device_put(self.bank, jax.devices()[0])
            self._write_slot = steps.jitted_write_slot(bank_sh)
            log.info("LoRA: %d adapter slots of rank %d over %s, %.1f MiB", adapters.slots, adapters.rank,
                     "/".join(adapters.targets), param_bytes(self.bank) / 2**20)

    def _new_state(self) -> None:
        """The KV cache and sampling state, created directly in place (sharded when there is a
        plan), never whole on one device; every block and row empty."""
        cfg = self.cfg
        self.cache = jax.jit(lambda: self.backend.init_cache(cfg, self.num_blocks, self.block_size, self._kv_dtype,
                                                             self.replicas, self.window_blocks),
                             out_shardings=self._cache_sh)()
        self.sampling = jax.jit(lambda: smp.SlotSampling.empty(self.slots, cfg.vocab_size),
                                out_shardings=self._sampling_sh)()
        if self.plan is None:
            device = jax.devices()[0]
            self.cache, self.sampling = jax.device_put((self.cache, self.sampling), device)

    def recover(self) -> bool:
        """After a failed step: whether the device state survived; if a step had taken the
        (donated) KV cache or sampling state with it, both are made anew, empty, so the next
        steps run (every sequence's KV and sampling row must then be set again)."""
        leaves = jax.tree.leaves((self.cache, self.sampling))
        if not any(x.is_deleted() for x in leaves):
            return True
        log.warning("the failed step consumed the KV cache; creating it anew")
        self._new_state()
        return False

    # -- sleep and weight updates (engine thread; no step in flight, no sequence running) ------

    @staticmethod
    def _avals(tree) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, [(x.shape, x.dtype, x.sharding) for x in leaves]

    @property
    def has_weights(self) -> bool:
        return self.params is not None and (self.adapters is None or self.bank is not None)

    @property
    def weights_dropped(self) -> bool:
        """Asleep at level 2: no weights on the device nor in host memory."""
        return self.params is None and self._host_params is None

    @property
    def has_cache(self) -> bool:
        return self.cache is not None

    def param_shardings(self) -> Any:
        """Where each checkpoint weight lives (the tree of ``model.weights.param_specs``)."""
        if self.plan is not None:
            return self.plan.param_shardings(self.cfg)
        device = jax.sharding.make_single_device_sharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, weights.param_specs(self.cfg), is_leaf=weights.is_spec)

    def prepare_params(self, params: Any, copy: bool = True) -> Any:
        """New weights as this runner serves them, without touching the ones it serves:
        ``params`` (the checkpoint's tree; arrays of any placement, or numpy) checked against
        the model (``weights.WeightsError`` names a tensor that does not fit), cast to the
        served dtype, put in the served placement (a device array moves or reshards device to
        device; ``copy``: never aliased, so a caller that later donates or deletes its arrays
        cannot take the served weights with them), then prepared by the backend (packed
        panels, quantized copies). Any thread; ``swap_params`` puts the result in service."""
        if self.channel is not None:
            raise ValueError("updating weights is not supported on a mesh spanning processes")
        tree = weights.check_params(self.cfg, params)
        dtype = jnp.dtype(self.cfg.dtype)

        def place(x, sharding):
            if isinstance(x, jax.Array):
                cast = x.astype(dtype) if x.dtype != dtype else x
                return jax.device_put(cast, sharding, may_alias=False if copy and cast is x else None)
            return jax.device_put(np.asarray(x, dtype), sharding)

        placed = jax.tree.map(place, tree, self.param_shardings())
        prepared = self.backend.prepare(placed, self.cfg, self._quantize if self.plan is None else None)
        if self._avals(prepared) != self._param_avals:  # a backend's preparing depends on nothing else
            raise ValueError("the new weights prepare into another layout than the served ones")
        return jax.block_until_ready(prepared)

    def swap_params(self, prepared: Any) -> None:
        """Serve ``prepare_params``'s weights from the next step on; the old ones are dropped."""
        self.params, self._host_params = prepared, None

    def sleep(self, level: int) -> None:
        """Give the device memory back: the KV cache and sampling state are freed, and the
        weights are copied to host memory (``level`` 1) or dropped (2: they must be updated or
        reloaded before serving). Adapter slots go to host memory at either level."""
        if self.channel is not None:
            raise ValueError("sleep is not supported on a mesh spanning processes")
        self.cache = self.sampling = None
        if self.bank is not None:
            self._bank_sh = jax.tree.map(lambda x: x.sharding, self.bank)
            self._host_bank, self.bank = jax.tree.map(np.array, self.bank), None
        if self.params is not None:
            if level == 1:  # np.array copies: no host view keeps a device buffer alive
                self._host_params = jax.tree.map(np.array, self.params)
            self.params = None
        if level >= 2:
            self._host_params = None

    def wake(self, weights: bool = True, kv_cache: bool = True) -> None:
        """Undo ``sleep``: weights from host memory back to their placements (as they were,
        packed), and a new empty KV cache and sampling state."""
        if weights and self.params is None and self._host_params is not None:
            treedef, avals = self._param_avals  # the placements they were served in
            shardings = jax.tree.unflatten(treedef, [sharding for _, _, sharding in avals])
            self.params, self._host_params = jax.device_put(self._host_params, shardings), None
        if weights and self._host_bank is not None:
            self.bank, self._host_bank = jax.device_put(self._host_bank, self._bank_sh), None
        if kv_cache and self.cache is None:
            self._new_state()

    def empty_tables(self) -> np.ndarray:
        """Tables of the shape every step takes, (groups, slots, max blocks), every entry block 0."""
        return np.zeros((self.kv_groups, self.slots, self.max_blocks), np.int32)

    # -- host API (engine thread only) ----------------------------------------------------------
    # Inputs go in as numpy values, which every process of a multi-process mesh can pass.
    # With a ``channel`` (several processes), process 0 announces each step before running it
    # and the others replay it in ``follow``.

    def execute(self, plan: StepPlan, inflight: "DecodeHandle | None" = None, masks: dict | None = None):
        """Run a step's plan: its prefill calls in order, then dispatch its decode step (fed by
        ``inflight``'s tokens on the device when the plan chains on it). ``masks``: the token
        bitmask row (W,) int32 of each slot a grammar constrains this step. Returns the prefill
        calls' ``StepOutput``s and the decode step's handle (or None)."""
        results = [self.run_prefill(op, plan.tables, masks) for op in plan.ops]
        handle = None
        if plan.decode is not None:
            handle = self.dispatch_decode(plan.decode, plan.tables, masks, inflight)
        return results, handle

    def set_slot(self, slot: int, params: SamplingParams, prompt_ids, seed: int, adapter: int = -1) -> None:
        """Make ``slot`` ready for a sequence: its sampling row, and the adapter slot its tokens
        use (-1: the base model)."""
        if adapter >= 0 and (self.adapters is None or adapter >= self.adapters.slots):
            raise ValueError(f"adapter slot {adapter} does not exist")
        self._set_row_step(slot, smp.row_values(params, self.cfg.vocab_size, prompt_ids, seed), adapter)

    @replayed
    def _set_row_step(self, slot: int, row, adapter: int = -1) -> None:
        self.sampling = self._set_row(self.sampling, np.int32(slot), row)
        self.slot_adapter[slot] = adapter

    def load_adapter(self, slot: int, adapter: "lora.Adapter | None") -> None:
        """Write ``adapter`` (None: zeros) into adapter slot ``slot``, between steps; no step
        reads the slot meanwhile (the engine's thread calls this)."""
        if adapter is not None:
            self.adapters.check(adapter)
        columns = self.adapters.columns(adapter, self.cfg)
        self.bank = self._write_slot(self.bank, np.int32(slot), columns)
        self.resident.pop(slot, None)
        if adapter is not None:
            self.resident[slot] = adapter

    def run_prefill(self, op: Prefill, tables: np.ndarray, masks: dict | None = None,
                    as_tokens: int | None = None) -> StepOutput:
        """One prefill call: ``op``'s chunks (of distinct slots; at most ``prompts_per_call``
        of them, ``max_chunk`` tokens in all) in one row of tokens. ``sampled`` has a row per
        chunk, in order: the token drawn after its last position (meaningful where it ends its
        prompt or is a decode row riding along); in a verify call a row per position instead,
        the token drawn after each as a decode step there would draw it. A scored call's
        ``scores`` and an embedding call's ``hidden`` have a row per token, in the chunks' order."""
        self._check_positions(max(c.start + len(c.tokens) for c in op.chunks) - 1)
        inputs = self.shapes.prefill_inputs(op, masks, self._adapter_rows, as_tokens)
        n = int(inputs.live)
        out, hidden = self._prefill_step(tables, inputs, op.scores)
        sampled, scores = out[:4], out[4:]
        rows = n if op.verify else len(op.chunks)
        return StepOutput(Sampled.of(None if x is None else _host(x)[:rows] for x in sampled),
                          Sampled(inputs.following[0], *map(_host, scores)) if op.scores else None,
                          _host(hidden)[:n].astype(np.float32) if op.embeds else None)

    def _step_args(self, tables, inputs: PrefillInputs | DecodeInputs) -> tuple:
        """A prefill or decode step's arguments (what its ``Program`` keys and runs)."""
        return self.params, self.cache, self.sampling, self.rope, self.eos_mask, tables, self.bank, inputs

    @replayed
    def _prefill_step(self, tables, inputs: PrefillInputs, scored: bool):
        cache, sampling, (out, hidden) = self._prefill(*self._step_args(tables, inputs))
        self._raise_fault()
        self.cache, self.sampling = cache, sampling
        if scored:
            out = (*out, *self._score(self.params, hidden, inputs.following, inputs.live))
        return out, hidden

    def _check_positions(self, last: int) -> None:
        """Every real token's position has a row in the RoPE table (``session_len`` rows): the
        step looks positions up with clipping, which only padding may rely on."""
        if last >= self.session_len:
            raise ValueError(f"position {last} is past the {self.session_len} positions a sequence may hold "
                             "(--session-len)")

    def dispatch_decode(self, d: Decode, tables: np.ndarray, masks: dict | None = None,
                        inflight: "DecodeHandle | None" = None, as_rows: int | None = None) -> "DecodeHandle":
        """Start a decode step over ``d`` and return its handle without waiting for it
        (``fetch`` waits). A chained ``d`` (no tokens) takes its inputs from ``inflight``, the
        previous step over the same slots, on the device: step t+1 is queued before the host
        has even looked at step t's tokens."""
        self._check_positions(max(d.positions))
        inputs, where = self.shapes.decode_inputs(d, masks, self._adapter_rows, as_rows)
        rows = inputs.rows if inputs.rows is not None else np.arange(self.slots)
        if d.chained:
            if (inflight is None or inflight.rows.shape != rows.shape or (inflight.rows != rows).any()
                    or self.channel is not None):
                raise ValueError("chained decode steps must cover the same slots on one process")
            out = self._run_decode(tables, dataclasses.replace(inputs, tokens=inflight.out[0]))
        else:
            out = self._decode_step(tables, inputs)
        return DecodeHandle(out, where, rows)

    @replayed
    def _decode_step(self, tables, inputs: DecodeInputs):
        return self._run_decode(tables, self._placed(inputs))

    def _placed(self, inputs: DecodeInputs) -> DecodeInputs:
        # Placed like a step's own output tokens, so both kinds of input run one executable.
        return dataclasses.replace(inputs, tokens=jax.device_put(inputs.tokens, self._token_sharding))

    def fetch(self, handle: "DecodeHandle") -> Sampled:
        """Wait for a dispatched step: host arrays whose rows follow its slots."""
        return Sampled.of(None if x is None else _host(x)[handle.where] for x in handle.out)

    def _run_decode(self, tables, inputs: DecodeInputs):
        cache, sampling, out = self._decode(*self._step_args(tables, inputs))
        self._raise_fault()
        self.cache, self.sampling = cache, sampling
        return out

    def _raise_fault(self) -> None:
        if self.fault is not None:
            fault, self.fault = self.fault, None
            raise fault

    def follow(self) -> None:
        """On processes other than 0: replay the steps process 0 announces, until it stops."""
        while (call := self.channel.next_call()) is not None:
            name, args = call
            getattr(self, name)(*args)

    def stop_followers(self) -> None:
        """Process 0: release the other processes (once)."""
        if self.channel is not None and self.channel.leader:
            self.channel.stop()
            self.channel = None

    IMAGE_BATCHES = (1, 2, 4, 8)  # the vision tower's batch buckets

    def encode_images(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """The vision tower over images (3, S, S), batched in buckets of ``IMAGE_BATCHES``:
        each image's soft tokens (tokens_per_image, D) float32 on the host."""
        out: list[np.ndarray] = []
        top = self.IMAGE_BATCHES[-1]
        for i in range(0, len(pixels), top):
            group = pixels[i:i + top]
            b = next(x for x in self.IMAGE_BATCHES if x >= len(group))
            batch = np.zeros((b, *group[0].shape), np.float32)
            batch[:len(group)] = group
            feats = _host(self._encode(self.vision[1], batch)).astype(np.float32)
            out += list(feats[:len(group)])
        return out

    def memory(self) -> dict[str, float]:
        """MiB: this process's resident memory, and the weights' and KV cache's share of it."""
        try:
            with open("/proc/self/statm") as f:
                resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            resident = 0.0
        weights = 0.0 if self.params is None else param_bytes(self.params) / 2**20
        cache = 0.0 if self.cache is None else sum(x.nbytes for kv in self.cache for x in kv) / 2**20
        return {"resident": resident, "weights": weights, "kv_cache": cache}

    def _programs(self) -> list:
        return [self._prefill, self._decode, self._set_row, self._score] + ([self._encode] if self.vision else [])

    def program_counts(self) -> tuple[int, int]:
        """(read from the store, compiled) executables of the step programs so far."""
        return sum(p.loaded for p in self._programs()), sum(p.compiled for p in self._programs())

    def compiled_variants(self) -> int:
        return sum(p._cache_size() for p in self._programs())

    def warmup(self, progress=None, verify_tokens: int = 0) -> None:
        """Make every step shape's program ready now, so serving never compiles
        (``verify_tokens``: the most tokens a verify call of speculative decoding holds; 0:
        none). With adapter slots every shape twice: the base model's program, and the one
        adapters' rows take. Nothing runs: each program is compiled, or read from the store
        (see ``programs``), two at a time. On a mesh of several processes each shape runs
        once instead, so that every process compiles it as it replays the step."""
        if self.vision is not None:
            vc = self.vision[0]
            for b in self.IMAGE_BATCHES:
                self._encode.executable(self.vision[1], np.zeros((b, 3, vc.image_size, vc.image_size), np.float32))
        self.backend.settle((self.params, self.cache, self.bank))
        variants = [-1] if self.adapters is None else [-1, 0]
        for adapter in variants:
            self.set_slot(0, SamplingParams(), [0], 0, adapter)
            calls = self._warmup_calls(verify_tokens)
            if self.channel is not None:
                self._warmup_runs(progress, calls, adapter)
            else:
                self._ready(progress, calls, adapter)
        self.set_slot(0, SamplingParams(), [0], 0)

    def _warmup_calls(self, verify_tokens: int) -> list[tuple]:
        """(shape, op, size) of every step shape: ``op`` on one live token or row, shaped as
        ``size`` (its program is the same, and padding costs next to nothing)."""
        calls = []
        for shape in self.shapes.warmup_shapes(verify_tokens):
            kind, n = shape[0], shape[1]
            if kind == "decode":
                op = Decode((0,), (0,), (shape[2] - 1,), (0,))
            elif kind == "verify":
                op = Prefill((Chunk(slot=0, tokens=(0,), start=shape[2] - n, last=True, step=1, decode=True),),
                             verify=True)
            elif kind == "score":  # a scored prompt: its prefill, then its scores
                op = Prefill((Chunk(slot=0, tokens=(0,), start=0, last=True, score=True),))
            else:
                op = Prefill((Chunk(slot=0, tokens=(0,), start=shape[2] - n, last=True),))
            calls.append((shape, op, n))
        return calls

    def _warmup_runs(self, progress, calls: list[tuple], adapter: int) -> None:
        # Nothing is cached yet: every position of every slot may land in block 0.
        tables = self.empty_tables()
        for i, (shape, op, n) in enumerate(calls):
            if progress:
                progress(i, len(calls), shape if adapter < 0 else (*shape, "adapters"))
            if isinstance(op, Decode):
                self.fetch(self.dispatch_decode(op, tables, as_rows=n))
            else:
                self.run_prefill(op, tables, as_tokens=n)
        jax.block_until_ready(self.cache)

    def _ready(self, progress, calls: list[tuple], adapter: int) -> None:
        tables = self.empty_tables()
        todo = []  # (shape, program, arguments)
        for shape, op, n in calls:
            if isinstance(op, Decode):
                inputs, _ = self.shapes.decode_inputs(op, None, self._adapter_rows, n)
                todo.append((shape, self._decode, self._step_args(tables, self._placed(inputs))))
            else:
                inputs = self.shapes.prefill_inputs(op, None, self._adapter_rows, n)
                todo.append((shape, self._prefill, self._step_args(tables, inputs)))
        self._make(progress, todo, adapter)
        # A scored call's second program takes the prefill's hidden states: stand-ins for them,
        # shaped and placed as the prefill's executable returns them.
        scores = []
        for shape, program, args in todo:
            if shape[0] == "score":
                hidden = program.executable(*args).out_info[2][1]
                inputs = args[-1]
                scores.append((("scores", shape[1]), self._score, (self.params, hidden, inputs.following, inputs.live)))
        self._make(progress, scores, adapter)

    def _make(self, progress, todo: list[tuple], adapter: int) -> None:
        """Every ``(shape, program, args)``'s executable: the stored ones read two at a time (on
        2 cores that halves the wait), then the others compiled in turn."""
        import concurrent.futures

        # One entry per executable (a scored prompt's prefill may be a plain prefill's twin).
        unique = {}
        for t in todo:
            unique.setdefault((id(t[1]), t[1].key(*t[2])), t)
        stored = [t for t in unique.values() if t[1].stored(*t[2])]
        if stored:
            log.info("loading %d compiled programs", len(stored))
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda t: t[1].executable(*t[2]), stored))
        missing = [t for t in todo if not t[1].ready(*t[2])]
        for i, (shape, program, args) in enumerate(missing):
            if progress:
                progress(i, len(missing), shape if adapter < 0 else (*shape, "adapters"))
            program.executable(*args)
