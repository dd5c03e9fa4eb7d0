"""``EngineConfig``: what an engine is built with, checked once, and the sizes it derives: the
decode slots, the session length, and the KV pools (per data replica: the full-attention
layers' blocks, and the sliding-window layers' own pool).

The command line, ``service.models.build_engine``, the tools and the tests all build engines
from one of these, so every check and every default lives here. A bad value is an
``EngineConfigError`` naming the flag, which the command line prints as one line.
"""

from __future__ import annotations

import dataclasses
import logging

from model.config import ModelConfig
from service.engine.speculate import Speculation

log = logging.getLogger(__name__)

# On CPU the KV pool shares the host's memory with the weights and everything else, so by
# default it holds this many whole sessions (and many more short ones), never more than
# CPU_MAX_FRACTION of the memory available.
CPU_SESSIONS, CPU_MAX_FRACTION = 6, 0.1


class EngineConfigError(ValueError):
    """A setting an engine cannot be built with; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """``max_batch_size`` decode slots (rounded down to a multiple of ``dp``); ``session_len``
    (None: the model's, at most 4096); the KV pool: ``num_blocks`` blocks per data replica when
    given, else sized by ``cache_max_entry_count`` (a fraction of free memory up to 1, tokens
    above 1; None: 0.8 of an accelerator's, on CPU ``CPU_SESSIONS`` sessions); ``window_pool``:
    sliding-window layers get a pool of their own where that makes them hold less."""

    max_batch_size: int = 64
    session_len: int | None = None
    block_size: int = 32
    cache_max_entry_count: float | None = None
    num_blocks: int | None = None
    window_pool: bool = True
    max_prefill_chunk: int = 512
    max_queue: int = 256
    dtype: str | None = None
    quantize: str | None = None
    kv_cache_dtype: str | None = None
    tp: int = 1
    dp: int = 1
    speculative_algorithm: str | None = "ngram"  # "ngram", "draft", or "none" / None: off
    speculative_num_draft_tokens: int = 8
    speculative_max_batch: int = 4
    speculative_draft_model: str | None = None
    speculative_draft_quantize: str | None = None
    # LoRA adapters: (name, path) served from the start; adapter slots on the device (None: as
    # many as given, at least 4 with runtime loading) and their rank (None: the largest given,
    # 16 when none is); runtime_lora: adapters may be loaded and unloaded while serving.
    adapters: tuple[tuple[str, str], ...] = ()
    max_loras: int | None = None
    max_lora_rank: int | None = None
    runtime_lora: bool = False

    def __post_init__(self):
        if self.block_size < 16 or self.block_size % 16:
            raise EngineConfigError(f"--block-size {self.block_size}: a multiple of 16 positions")
        if self.max_batch_size < 1:
            raise EngineConfigError(f"--max-batch-size {self.max_batch_size}: at least 1")
        if self.session_len is not None and self.session_len < 2:
            raise EngineConfigError(f"--session-len {self.session_len}: at least 2 tokens")
        if self.tp < 1 or self.dp < 1:
            raise EngineConfigError(f"--tp {self.tp} --dp {self.dp}: at least 1 each")
        count = self.cache_max_entry_count
        if count is not None and count <= 0:
            raise EngineConfigError(f"--cache-max-entry-count {count}: a fraction of free memory in (0, 1], "
                                    "or tokens above 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise EngineConfigError(f"a KV pool of {self.num_blocks} blocks holds nothing")
        if (self.speculative_algorithm == "draft") != bool(self.speculative_draft_model):
            raise EngineConfigError("--speculative-algorithm draft and --speculative-draft-model go together")
        try:
            self.speculation()
        except ValueError as e:
            raise EngineConfigError(str(e)) from None
        names = [name for name, _ in self.adapters]
        if len(set(names)) < len(names) or not all(names):
            raise EngineConfigError(f"--adapters: names must be distinct and non-empty, got {names}")
        if self.max_loras is not None and self.max_loras < 1:
            raise EngineConfigError(f"--max-loras {self.max_loras}: at least 1")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise EngineConfigError(f"--max-lora-rank {self.max_lora_rank}: at least 1")
        if self.max_loras is not None and len(self.adapters) > self.max_loras:
            raise EngineConfigError(f"--adapters names {len(self.adapters)} adapters, more than --max-loras "
                                    f"{self.max_loras}")

    @property
    def lora(self) -> bool:
        """Whether the engine has adapter slots."""
        return bool(self.adapters) or self.runtime_lora

    def adapter_slots(self) -> int:
        return self.max_loras or max(len(self.adapters), 4 if self.runtime_lora else 1)

    @property
    def slots(self) -> int:
        """Decode slots: each data replica holds the same number."""
        return max(self.dp, self.max_batch_size - self.max_batch_size % self.dp)

    def session_for(self, cfg: ModelConfig) -> int:
        return self.session_len or min(cfg.max_context, 4096)

    def speculation(self, draft=None) -> Speculation:
        """The engine's speculation (off without an algorithm); ``draft``: method "draft"'s
        model, once loaded."""
        method = None if self.speculative_algorithm == "none" else self.speculative_algorithm
        return Speculation(method if method != "draft" or draft is not None else "ngram",
                           self.speculative_num_draft_tokens, self.speculative_max_batch, draft=draft) \
            if method else Speculation.off(self.speculative_num_draft_tokens, self.speculative_max_batch)

    def verify_tokens(self) -> int:
        """The most tokens a verify call holds (warmed up with or without a method: a request's
        prediction is checked in them)."""
        return min(self.speculative_max_batch, self.slots) * (self.speculative_num_draft_tokens + 1)

    def check_device(self, sharded: bool) -> None:
        """What only the native CPU kernels run needs them here."""
        from model.backends import select

        kernel_only = ([f"--quantize {self.quantize}"] if self.quantize is not None else []) + (
            ["--kv-cache-dtype int8"] if self.kv_cache_dtype == "int8" else [])
        if kernel_only:
            try:
                select(sharded=sharded).check(self.quantize, self.kv_cache_dtype)
            except ValueError:
                verb = "runs" if len(kernel_only) == 1 else "run"
                raise EngineConfigError(
                    f"{' and '.join(kernel_only)} {verb} on the native CPU kernels only: one CPU device, no "
                    "--tp/--dp, a C++ compiler, XLASERVE_CPU_KERNELS not 0") from None

    # -- the KV pools ---------------------------------------------------------------------------

    def window_blocks(self, cfg: ModelConfig, session_len: int) -> int:
        """Blocks of one data replica's pool for the sliding-window layers (0: none)."""
        if not self.window_pool:
            return 0
        return window_pool_blocks(cfg.sliding_window, self.slots // self.dp, self.block_size, session_len,
                                  self.max_prefill_chunk)

    def pool_blocks(self, cfg: ModelConfig, session_len: int) -> int:
        """Blocks of one data replica's full-attention pool: ``num_blocks``, or
        ``cache_max_entry_count`` of free memory (a fraction up to 1) or tokens (above 1); on
        CPU by default CPU_SESSIONS whole sessions. A memory fraction's share beyond the
        sliding-window layers' own pool goes to the full-attention layers' pool."""
        import jax

        from model.backends import select

        if self.num_blocks is not None:
            return self.num_blocks
        cfg = dataclasses.replace(cfg, dtype=self.dtype or cfg.dtype)
        backend = select(sharded=self.tp * self.dp > 1, cfg=cfg)
        bytes_per_token = backend.kv_bytes_per_token(cfg, self.kv_cache_dtype)
        cpu = jax.devices()[0].platform == "cpu"
        if cpu:  # every replica's pool (and copies of KV heads tp does not split) in the host's memory
            per_token = bytes_per_token * self.dp * max(1, self.tp // cfg.num_kv_heads)
        else:  # one device's share of its replica's pool: the KV heads split over tp
            per_token = bytes_per_token / max(1, min(self.tp, cfg.num_kv_heads))
        count = self.cache_max_entry_count
        if count is not None and count > 1:
            tokens = int(count)
        else:
            available = available_memory()
            if count is None and cpu:
                tokens = min(CPU_SESSIONS * session_len, int(CPU_MAX_FRACTION * available / per_token))
            else:
                tokens = int((0.8 if count is None else count) * available / per_token)
                own = self.window_blocks(cfg, session_len) * self.block_size
                tokens = window_rest(cfg, tokens, own, self.slots // self.dp * session_len)
        blocks = tokens // self.block_size
        if blocks < 1:
            raise EngineConfigError(
                f"--cache-max-entry-count {count} leaves no room for one block of {self.block_size} tokens of KV "
                f"cache ({bytes_per_token * self.block_size / 2**20:.1f} MiB); raise --cache-max-entry-count or "
                "lower --block-size")
        if blocks * self.block_size < session_len:
            log.warning("the KV cache holds %d tokens, less than --session-len %d: no sequence grows past it",
                        blocks * self.block_size, session_len)
        return blocks


def window_pool_blocks(window: int | None, slots: int, block_size: int, session_len: int,
                       max_chunk: int = 512) -> int:
    """Blocks of one data replica's pool for the sliding-window layers (see
    ``service.engine.kv``): every slot's window and the block it writes, then a prefill
    step's chunks beyond their windows twice over, so prefixes and sessions stay cached a
    while. 0 when windows do not make the pool smaller than a session per slot."""
    if not window:
        return 0
    per_sequence = -(-(window - 1) // block_size) + 2
    chunks = -(-min(max_chunk, session_len) // block_size) + 1
    blocks = slots * per_sequence + 2 * chunks
    return blocks if blocks < slots * -(-session_len // block_size) else 0


def window_rest(cfg: ModelConfig, tokens: int, own: int, every_session: int) -> int:
    """Tokens the full-attention layers' pool holds when a budget of ``tokens`` positions of
    every layer is shared with the sliding-window layers' own pool of ``own`` positions
    (``tokens`` when there is none); ``every_session``: every slot's whole session, what the
    first pool holds when no layer reads it."""
    windowed = sum(map(cfg.is_sliding, range(cfg.num_layers)))
    if not windowed or not own or own >= tokens:
        return tokens
    if windowed == cfg.num_layers:  # no layer reads the first pool's KV: it only keeps account
        return every_session
    return tokens + (tokens - own) * windowed // (cfg.num_layers - windowed)


def available_memory() -> float:
    """Bytes free on the first device (an accelerator's statistics), else the host's."""
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    log.warning("could not read the free memory (no device statistics, no /proc/meminfo): sizing the KV "
                "cache as if 8 GiB were free; set --cache-max-entry-count to a token count to choose")
    return 8 * 2**30
