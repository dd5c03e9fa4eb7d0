"""The ``xlaserve`` command: convert, generate, serve api_server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time

from service.parsers import REASONING_PARSERS, TOOL_PARSERS

log = logging.getLogger("xlaserve")


class CLIError(Exception):
    """Printed as one line, exit status 1."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _enable_compile_cache() -> None:
    import jax

    from model.checkpoint import cache_dir, host_id

    # Per CPU: XLA's CPU programs use this machine's instructions (see host_id).
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax" / host_id()))
    # Every program, even a quick one: a warm start (a container's first) then compiles nothing.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _check_parallel(args) -> bool:
    """Join the multi-process job when --nnodes > 1, then fail before loading anything when the
    devices cannot hold --tp x --dp. Returns True on process 0 (the one that serves)."""
    from sharding import MeshError, make_mesh

    if args.nnodes > 1:
        from sharding.distributed import initialize

        try:
            initialize(args.coordinator_address, args.nnodes, args.node_rank)
        except ValueError as e:
            raise CLIError(str(e)) from None
        except Exception as e:  # the coordinator is unreachable, a port is taken, ...
            raise CLIError(f"could not join the job at {args.coordinator_address}: {e}") from None
    try:
        make_mesh(args.tp, args.dp)
    except MeshError as e:
        raise CLIError(str(e)) from None
    return args.node_rank == 0


def _follow(args, max_batch_size: int) -> None:
    """A process other than 0: hold its shards and run the steps process 0 announces."""
    from service.models import build_runner

    checkpoint, _, (slots, blocks) = _model_and_slots(args, max_batch_size)
    runner, _ = build_runner(checkpoint, slots, args.session_len, dtype=args.dtype, tp=args.tp, dp=args.dp,
                             kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size, num_blocks=blocks)
    log.info("process %d following process 0's steps", args.node_rank)
    runner.follow()


# On CPU the KV pool shares the host's memory with the weights and everything else, so by
# default it holds this many whole sessions (and many more short ones), never more than
# CPU_MAX_FRACTION of the memory available.
CPU_SESSIONS, CPU_MAX_FRACTION = 6, 0.1


def _size_cache(args, cfg, slots: int) -> int:
    """Blocks of one data replica's KV pool: --cache-max-entry-count of free memory (a
    fraction up to 1) or tokens (above 1); on CPU by default CPU_SESSIONS whole sessions.
    A model with sliding-window layers gives them a pool of their own, sized for ``slots``
    sequences' windows (``window_pool_blocks``); a memory fraction's rest goes to the
    full-attention layers' pool, which then holds more tokens."""
    import dataclasses

    import jax

    from model.backends import select

    cfg = dataclasses.replace(cfg, dtype=args.dtype or cfg.dtype)
    backend = select(sharded=args.tp * args.dp > 1, cfg=cfg)
    bytes_per_token = backend.kv_bytes_per_token(cfg, args.kv_cache_dtype)
    cpu = jax.devices()[0].platform == "cpu"
    if cpu:  # every replica's pool (and copies of KV heads tp does not split) in the host's memory
        per_token = bytes_per_token * args.dp * max(1, args.tp // cfg.num_kv_heads)
    else:  # one device's share of its replica's pool: the KV heads split over tp
        per_token = bytes_per_token / max(1, min(args.tp, cfg.num_kv_heads))
    count = args.cache_max_entry_count
    if count is not None and count <= 0:
        raise CLIError(f"--cache-max-entry-count {count}: a fraction of free memory in (0, 1], or tokens above 1")
    if count is not None and count > 1:
        tokens = int(count)
    else:
        available = _available_memory()
        if count is None and cpu:
            tokens = min(CPU_SESSIONS * args.session_len, int(CPU_MAX_FRACTION * available / per_token))
        else:
            tokens = int((0.8 if count is None else count) * available / per_token)
            tokens = _window_rest(cfg, tokens, slots, args)
    blocks = tokens // args.block_size
    if blocks < 1:
        raise CLIError(f"--cache-max-entry-count {count} leaves no room for one block of "
                       f"{args.block_size} tokens of KV cache ({bytes_per_token * args.block_size / 2**20:.1f} MiB); "
                       "raise --cache-max-entry-count or lower --block-size")
    if blocks * args.block_size < args.session_len:
        log.warning("the KV cache holds %d tokens, less than --session-len %d: no sequence grows past it",
                    blocks * args.block_size, args.session_len)
    return blocks


def _window_rest(cfg, tokens: int, slots: int, args) -> int:
    """Tokens the full-attention layers' pool holds when a budget of ``tokens`` positions of
    every layer is shared with the sliding-window layers' own pool (``tokens`` when there is
    none)."""
    from service.engine.runner import window_pool_blocks

    windowed = sum(map(cfg.is_sliding, range(cfg.num_layers)))
    own = window_pool_blocks(cfg.sliding_window, slots, args.block_size, args.session_len) * args.block_size
    if not windowed or own >= tokens:
        return tokens
    if windowed == cfg.num_layers:  # no layer reads the first pool's KV: it only keeps account
        return slots * args.session_len
    return tokens + (tokens - own) * windowed // (cfg.num_layers - windowed)


def _available_memory() -> float:
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


# -- commands ----------------------------------------------------------------------------------


def cmd_convert(args) -> None:
    from model.convert import ConversionError, convert

    try:
        convert(args.src, args.dst, args.dtype)
    except ConversionError as e:
        raise CLIError(str(e)) from None
    print(f"converted {args.src} -> {args.dst}")


def _slots(args, cfg) -> tuple[int, int]:
    """(decode slots, KV blocks per data replica)."""
    import jax

    if args.block_size < 16 or args.block_size % 16:
        raise CLIError(f"--block-size {args.block_size}: a multiple of 16 positions")
    if args.max_batch_size < 1:
        raise CLIError(f"--max-batch-size {args.max_batch_size}: at least 1")
    slots = args.max_batch_size
    if slots % args.dp:  # each data replica holds the same number of slots
        slots = max(args.dp, slots - slots % args.dp)
        log.warning("using %d decode slots, a multiple of --dp %d", slots, args.dp)
    blocks = _size_cache(args, cfg, slots // args.dp)
    if jax.process_count() > 1:  # every process must size its state alike: process 0 decides
        import numpy as np
        from jax.experimental import multihost_utils

        slots, blocks = (int(x) for x in multihost_utils.broadcast_one_to_all(np.asarray([slots, blocks], np.int32)))
    return slots, blocks


def _model_and_slots(args, max_batch_size: int):
    """(checkpoint, name, (decode slots, KV blocks)) for the model the flags name; fills in
    --session-len.
    Every process of a multi-process job calls this alike."""
    from model.checkpoint import CheckpointError, load_config
    from service.models import ModelSourceError, resolve

    try:
        checkpoint, name = resolve(args.model, args.dtype)
        cfg = load_config(checkpoint)
    except (ModelSourceError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    if args.session_len is None:
        args.session_len = min(cfg.max_context, 4096)
    if cfg.uses_long_rope(args.session_len):
        log.info("longrope: --session-len %d is past the model's original %d positions, so its long factors "
                 "apply at every position", args.session_len, cfg.rope_scaling.original_max_position_embeddings)
    args.max_batch_size = max_batch_size
    return checkpoint, name, _slots(args, cfg)


def _load_engine(args, max_batch_size: int, warmup: bool):
    from service.models import build_engine

    quantize = getattr(args, "quantize", None)
    kernel_only = ([f"--quantize {quantize}"] if quantize is not None else []) + (
        ["--kv-cache-dtype int8"] if getattr(args, "kv_cache_dtype", None) == "int8" else [])
    if kernel_only:
        from model.backends import select

        try:
            select(sharded=args.tp * args.dp > 1).check(quantize, args.kv_cache_dtype)
        except ValueError:
            verb = "runs" if len(kernel_only) == 1 else "run"
            raise CLIError(f"{' and '.join(kernel_only)} {verb} on the native CPU kernels only: one CPU "
                           "device, no --tp/--dp, a C++ compiler, XLASERVE_CPU_KERNELS not 0") from None
    speculation = draft = None
    algorithm = getattr(args, "speculative_algorithm", None)
    if (algorithm == "draft") != bool(getattr(args, "speculative_draft_model", None)):
        raise CLIError("--speculative-algorithm draft and --speculative-draft-model go together")
    if algorithm == "draft":
        if args.nnodes > 1:
            raise CLIError("--speculative-algorithm draft runs on one process (--nnodes 1)")
        draft = (args.speculative_draft_model, args.speculative_draft_quantize)
    if algorithm:
        from service.engine.speculate import Speculation

        try:  # checked now, before the model loads (a draft's own check comes with its runner)
            speculation = Speculation("ngram", args.speculative_num_draft_tokens, args.speculative_max_batch)
        except ValueError as e:
            raise CLIError(str(e)) from None
    checkpoint, name, (slots, blocks) = _model_and_slots(args, max_batch_size)
    from service.models import DraftError

    try:
        engine = build_engine(checkpoint, slots, args.session_len, dtype=args.dtype, warmup=warmup,
                              max_queue=getattr(args, "max_queue", 256), tp=args.tp, dp=args.dp,
                              quantize=quantize, kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                              num_blocks=blocks, speculation=speculation, draft=draft)
    except DraftError as e:
        raise CLIError(str(e)) from None
    return engine, name


def cmd_generate(args) -> None:
    from model.chat_template import render
    from service.params import InvalidSamplingParam, SamplingParams

    leader = _check_parallel(args)
    _enable_compile_cache()
    if not leader:
        return _follow(args, 1)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed)
    except InvalidSamplingParam as e:
        raise CLIError(str(e)) from None
    engine, _ = _load_engine(args, 1, warmup=False)
    tok = engine.tokenizer
    if args.raw:
        ids = tok.encode(args.prompt)
    else:
        text = render(tok.chat_template, [{"role": "user", "content": args.prompt}],
                      bos_token=tok.bos_token, eos_token=tok.eos_token)
        ids = tok.encode(text, add_special_tokens=False)

    async def run():
        t0 = time.perf_counter()
        first, n, last = None, 0, None
        async for out in engine.generate(ids, params):
            if first is None:
                first = time.perf_counter()
            n += len(out.token_ids)
            sys.stdout.write(out.text)
            sys.stdout.flush()
            last = out
        end = time.perf_counter()
        sys.stdout.write("\n")
        decode_rate = (n - 1) / (end - first) if n > 1 else 0.0
        print(f"[{n} tokens, finish_reason={last.finish_reason}, TTFT {1000 * (first - t0):.0f} ms "
              f"(incl. compile on first use), decode {decode_rate:.1f} tokens/s]", file=sys.stderr)

    try:
        asyncio.run(run())
    finally:
        engine.stop()


def _embedding_task(args, checkpoint) -> tuple[str, bool] | None:
    """(pooling, normalize) when the server is for embeddings: ``--task embed``, or ``auto``
    on an embedding checkpoint. Pooling: ``--pooling``, else the checkpoint's
    sentence-transformers configuration, else last-token for Qwen3 (as Qwen3-Embedding) and
    mean for the others; vectors are normalised unless that configuration says otherwise."""
    from model.checkpoint import load_config, load_embedding

    spec = load_embedding(checkpoint)
    task = args.task if args.task != "auto" else ("embed" if spec is not None else "generate")
    if task == "generate":
        if args.pooling:
            raise CLIError("--pooling applies to --task embed")
        return None
    family = load_config(checkpoint).family
    pooling = args.pooling or (spec or {}).get("pooling") or ("last" if family.startswith("qwen3") else "mean")
    normalize = (spec or {}).get("normalize", True)
    log.info("serving embeddings: %s pooling%s; the generation routes are off", pooling,
             ", normalised" if normalize else "")
    return pooling, normalize


def cmd_api_server(args) -> None:
    import uvicorn

    from service.app import ServerSettings, State, create_app
    from service.server import DrainingServer

    leader = _check_parallel(args)
    _enable_compile_cache()
    if not leader:
        return _follow(args, args.max_batch_size)
    chat_template = None
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        except OSError as e:
            raise CLIError(f"--chat-template: {e}") from None
    from service.models import DEFAULT_MODEL_NAME

    settings = ServerSettings(
        model_name=args.model_name or "", api_keys=tuple(args.api_keys or ()),
        chat_template=chat_template, meta_instruction=args.meta_instruction,
        allow_origins=tuple(args.allow_origins or ()), allow_credentials=args.allow_credentials,
        allow_methods=tuple(args.allow_methods or ("*",)), allow_headers=tuple(args.allow_headers or ("*",)),
        stall_timeout=args.stall_timeout, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser, responses_store=args.responses_store)
    state = State(settings=settings)
    if not settings.model_name:
        settings.model_name = DEFAULT_MODEL_NAME if args.model is None else \
            os.path.basename(os.path.normpath(args.model)).removesuffix(".gguf")
    # Resolve and convert before listening, so a bad MODEL is one error line, not a server.
    from model.checkpoint import CheckpointError, load_config
    from service.models import ModelSourceError, generation_defaults, resolve

    try:
        checkpoint, _ = resolve(args.model, args.dtype)
        load_config(checkpoint)
        settings.defaults, fields = generation_defaults(checkpoint, args.generation_config)
        settings.default_fields = frozenset(fields)
        settings.embedding = _embedding_task(args, checkpoint)
    except (ModelSourceError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    # Precedence: the request's value, then these, then OpenAI's defaults.
    log.info("sampling defaults (--generation-config %s): %s", args.generation_config,
             ", ".join(f"{k}={v}" for k, v in fields.items()) or "OpenAI's (temperature=1.0, top_p=1.0)")
    args.model = str(checkpoint)
    if args.warmup_only:  # a container image's build: fill the caches this command would use
        engine, _ = _load_engine(args, args.max_batch_size, warmup=True)
        engine.stop()
        print(f"xlaserve: {settings.model_name} converted and compiled into {os.environ.get('XLASERVE_CACHE') or '~/.cache/xlaserve'}",
              flush=True)
        return
    url = f"http://{args.server_name}:{args.server_port}"
    failure: list[BaseException] = []
    registrar = None
    if args.proxy_url:
        from service.registration import Registrar, advertised_host

        if not args.proxy_url.startswith(("http://", "https://")):
            raise CLIError(f"--proxy-url {args.proxy_url}: the proxy's http(s) URL")
        node = f"http://{advertised_host(args.server_name, args.proxy_url)}:{args.server_port}"
        registrar = Registrar(args.proxy_url, node, settings.model_name,
                              api_key=settings.api_keys[0] if settings.api_keys else None)

    def load():
        try:
            state.engine, _ = _load_engine(args, args.max_batch_size, warmup=True)
            print(f"xlaserve: serving {settings.model_name} at {url} (Swagger UI: {url}/)", flush=True)
            if registrar is not None:  # /health answers 200 from here on
                registrar.start()
                server.before_drain = registrar.deregister
        except BaseException as e:  # reported by the main thread
            failure.append(e)
            server.should_exit = True

    app = create_app(state)
    config = uvicorn.Config(app, host=args.server_name, port=args.server_port,
                            log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    server = DrainingServer(config, state, args.drain_timeout)
    threading.Thread(target=load, name="xlaserve-load", daemon=True).start()
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.stop()
    if failure:
        e = failure[0]
        raise CLIError(str(e)) if isinstance(e, CLIError) else e


def cmd_proxy(args) -> int:
    import shlex

    from service import proxy

    binary = proxy.gateway_binary()
    if binary is None:
        raise CLIError(f"the proxy runs the SMG gateway, which is not installed: {proxy.INSTALL_HINT}")
    policy = proxy.LMDEPLOY_STRATEGIES.get(args.routing_strategy, args.routing_strategy)
    if policy != args.routing_strategy:
        log.info("--routing-strategy %s: the gateway's %s", args.routing_strategy, policy)
    for url in args.worker_urls or ():
        if not url.startswith(("http://", "https://")):
            raise CLIError(f"--worker-urls {url}: an http(s) URL of an api_server")
    try:
        extra = shlex.split(args.gateway_args or "")
    except ValueError as e:
        raise CLIError(f"--gateway-args: {e}") from None
    keys = tuple(args.api_keys or ())
    port, metrics_port = _free_local_port(), _free_local_port()
    gateway = proxy.Gateway(proxy.gateway_argv(binary, port, metrics_port, policy, args.log_level,
                                               args.worker_urls or [], keys[0] if keys else None,
                                               args.drain_timeout, extra))
    gateway.start()
    upstream = f"http://127.0.0.1:{port}"
    try:
        proxy.wait_listening(upstream, gateway)
    except RuntimeError as e:
        gateway.stop(5)
        raise CLIError(str(e)) from None
    print(f"xlaserve: proxy ({policy}) at http://{args.server_name}:{args.server_port}", flush=True)
    return proxy.run(args.server_name, args.server_port, gateway, upstream, f"http://127.0.0.1:{metrics_port}",
                     keys, args.log_level, args.drain_timeout)


def _free_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _json_file(path: str, flag: str):
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CLIError(f"{flag}: {e}") from None


def cmd_api_client(args) -> None:
    from service.client import APIError, chat_terminal, chat_terminal_structured, json_schema_format

    try:
        if args.json_schema or args.tools:
            tools = _json_file(args.tools, "--tools") if args.tools else None
            if tools is not None and not isinstance(tools, list):
                raise CLIError("--tools: the file must hold a JSON list of OpenAI tool specs")
            schema = _json_file(args.json_schema, "--json-schema") if args.json_schema else None
            choice = args.tool_choice
            if choice not in (None, "auto", "none", "required"):
                choice = {"type": "function", "function": {"name": choice}}
            chat_terminal_structured(args.api_server_url, api_key=args.api_key, tools=tools, tool_choice=choice,
                                     response_format=json_schema_format(schema) if schema is not None else None)
        else:
            chat_terminal(args.api_server_url, api_key=args.api_key, session_id=args.session_id)
    except APIError as e:
        raise CLIError(e.message) from None


def cmd_gradio(args) -> None:
    from service.webui import serve

    serve(args.api_server_url, args.server_name, args.server_port, api_key=args.api_key,
          log_level=args.log_level)


# -- parser ------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="converted dir, Hugging Face dir or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's; on a GPU bfloat16 for a float32 checkpoint)")
    p.add_argument("--quantize", choices=["int8", "w8a8"], default=None,
                   help="on the CPU kernels: int8 weights with a scale per output column, float32 "
                        "compute (int8: a quarter of float32's bytes per token), or with int8 "
                        "activations too (w8a8: int8 dot products, about twice the multiply-adds)")
    p.add_argument("--kv-cache-dtype", choices=["float32", "bfloat16", "int8"], default=None,
                   help="KV cache dtype (default: float32 on the CPU kernels, else the compute "
                        "dtype); bfloat16 halves the cache's memory and the bytes attention reads, "
                        "int8 (CPU kernels; a scale per position and head) takes about a quarter")
    p.add_argument("--session-len", type=int, default=None,
                   help="max tokens of one sequence, prompt + output (default: min(model max, 4096))")
    p.add_argument("--cache-max-entry-count", type=float, default=None,
                   help="the KV cache's block pool: a fraction of free memory (up to 1), or tokens "
                        "(above 1), per data replica (default: 0.8 of an accelerator's free memory; "
                        f"on CPU {CPU_SESSIONS} whole --session-len sessions, at most "
                        f"{CPU_MAX_FRACTION:g} of available memory)")
    p.add_argument("--block-size", type=int, default=32,
                   help="positions per KV cache block, a multiple of 16 (default 32): the unit of "
                        "allocation and of prefix-cache sharing")
    p.add_argument("--speculative-algorithm", choices=["ngram", "draft"], default=None,
                   help="speculative decoding: ngram proposes what followed the latest earlier "
                        "occurrence of the last 1-4 tokens in the prompt and output, draft what a "
                        "smaller model writes; each step checks the proposals in one call (outputs "
                        "unchanged, greedy and seeded)")
    p.add_argument("--speculative-draft-model", default=None,
                   help="with --speculative-algorithm draft: the draft model (converted dir, HF dir or "
                        ".gguf, with the served model's tokenizer), or 'same' for the served model itself "
                        "(with --speculative-draft-quantize)")
    p.add_argument("--speculative-draft-quantize", choices=["int8", "w8a8"], default=None,
                   help="quantize the draft model's weights (CPU kernels)")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=4,
                   help="proposed tokens checked per step and sequence, 1 to 16 (default 4)")
    p.add_argument("--speculative-max-batch", type=int, default=4,
                   help="steps with more decode rows than this do not speculate (default 4: past "
                        "it a CPU step is no longer bound by reading the weights)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor parallel degree: weights split over this many devices")
    p.add_argument("--dp", type=int, default=1,
                   help="data parallel degree: decode slots split over this many replicas "
                        "(tp x dp devices in all; on CPU set "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N to emulate N devices)")
    p.add_argument("--nnodes", type=int, default=1,
                   help="processes (machines) one mesh spans; process 0 serves, the others follow")
    p.add_argument("--node-rank", type=int, default=0, help="this process's rank in [0, --nnodes)")
    p.add_argument("--coordinator-address", default=None,
                   help="HOST:PORT of process 0's coordinator (with --nnodes > 1)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlaserve", description="LLM serving on JAX/XLA")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face dir or GGUF file")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    c.set_defaults(func=cmd_convert, log_level="WARNING")

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="no chat template: complete the text as is")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve a model")
    ssub = s.add_subparsers(dest="serve_command", required=True)
    a = ssub.add_parser("api_server", help="OpenAI-compatible HTTP server")
    _add_model_args(a)
    a.add_argument("--server-name", default="0.0.0.0", help="host to bind (default 0.0.0.0)")
    a.add_argument("--server-port", type=int, default=23333, help="port (default 23333)")
    a.add_argument("--max-batch-size", type=int, default=64,
                   help="sequences in one step, at most (default 64); the KV pool, not this, "
                        "bounds how many long ones run at once")
    a.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    a.add_argument("--model-name", default=None, help="served model name (default from the checkpoint)")
    a.add_argument("--api-keys", nargs="*", default=None, help="accepted Bearer keys")
    a.add_argument("--chat-template", default=None, help="jinja2 chat template file")
    a.add_argument("--meta-instruction", default=None, help="default system prompt")
    a.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="the tool-call format of the model's answers (default: the one its chat "
                        "template teaches; hermes for templates without tool support)")
    a.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                   help="split <think>...</think> out of answers into reasoning_content")
    a.add_argument("--task", default="auto", choices=("auto", "generate", "embed"),
                   help="generate (the chat and completion routes) or embed (/v1/embeddings only); auto: "
                        "embed for an embedding checkpoint (one with sentence-transformers pooling)")
    a.add_argument("--pooling", default=None, choices=("last", "mean", "cls"),
                   help="how --task embed pools a prompt's hidden states (default: the checkpoint's "
                        "sentence-transformers pooling, else last for Qwen3 and mean for the others)")
    a.add_argument("--responses-store", type=int, default=1024, metavar="N",
                   help="finished /v1/responses kept in memory for previous_response_id and GET "
                        "(least recently used dropped; 0 stores none)")
    a.add_argument("--allow-origins", nargs="*", default=None, help="CORS allowed origins")
    a.add_argument("--allow-credentials", action="store_true", help="CORS allow credentials")
    a.add_argument("--allow-methods", nargs="*", default=None, help="CORS allowed methods")
    a.add_argument("--allow-headers", nargs="*", default=None, help="CORS allowed headers")
    a.add_argument("--generation-config", default="auto",
                   help="server sampling defaults for fields a request leaves out: 'auto' (the "
                        "checkpoint's generation_config.json: temperature, top_p, top_k, min_p, "
                        "repetition_penalty), 'none' (OpenAI's), or a JSON file of them")
    a.add_argument("--warmup-only", action="store_true",
                   help="convert the model and compile every step shape into the cache, then exit "
                        "without serving (a container image's build runs this)")
    a.add_argument("--proxy-url", default=None, metavar="URL",
                   help="register with this proxy (xlaserve or LMDeploy serve proxy) once ready, "
                        "again if it forgets us, and leave it first on SIGTERM")
    a.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds the running requests may take to finish before "
                        "they are aborted (default 30)")
    a.add_argument("--stall-timeout", type=float, default=120.0,
                   help="/health answers 503 when pending work made no progress for this many "
                        "seconds (default 120)")
    a.set_defaults(func=cmd_api_server)
    ac = ssub.add_parser("api_client", help="terminal chat with a running api_server")
    ac.add_argument("api_server_url", help="e.g. http://localhost:23333")
    ac.add_argument("--api-key", default=None, help="Bearer key, if the server wants one")
    ac.add_argument("--session-id", type=int, default=1, help="server-side session to use (default 1)")
    ac.add_argument("--json-schema", default=None, metavar="FILE",
                    help="answers are JSON valid under this JSON Schema (over /v1/chat/completions)")
    ac.add_argument("--tools", default=None, metavar="FILE",
                    help="a JSON list of OpenAI tool specs the model may call; you type each call's result")
    ac.add_argument("--tool-choice", default=None, metavar="CHOICE",
                    help="with --tools: auto (default), required, none, or a function's name")
    ac.set_defaults(func=cmd_api_client, log_level="WARNING")
    gr = ssub.add_parser("gradio", help="web chat page for a running api_server")
    gr.add_argument("api_server_url", help="e.g. http://localhost:23333")
    gr.add_argument("--server-name", default="0.0.0.0", help="host to bind (default 0.0.0.0)")
    gr.add_argument("--server-port", type=int, default=6006, help="port (default 6006)")
    gr.add_argument("--api-key", default=None, help="Bearer key for the api_server")
    gr.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    gr.set_defaults(func=cmd_gradio)
    px = ssub.add_parser("proxy", help="one address for several api_servers (the SMG gateway, cache-aware)")
    px.add_argument("--server-name", default="0.0.0.0", help="host to bind (default 0.0.0.0)")
    px.add_argument("--server-port", type=int, default=8000, help="port (default 8000)")
    px.add_argument("--routing-strategy", default="cache_aware",
                    choices=[*proxy_policies(), "min_expected_latency", "min_observed_latency"],
                    help="how a request picks a replica (default cache_aware: the replica that already "
                         "holds the longest prefix of its text, unless that one is much busier); "
                         "LMDeploy's min_expected_latency and min_observed_latency map to least_load "
                         "and power_of_two")
    px.add_argument("--worker-urls", nargs="*", default=None, metavar="URL",
                    help="api_servers to serve from the start (more join with POST /nodes/add or "
                         "api_server --proxy-url)")
    px.add_argument("--api-keys", nargs="*", default=None,
                    help="accepted Bearer keys; requests go on with the first, so give the replicas "
                         "the same --api-keys")
    px.add_argument("--drain-timeout", type=float, default=30.0,
                    help="on SIGTERM/SIGINT, seconds the running requests may take (default 30)")
    px.add_argument("--gateway-args", default=None, metavar="ARGS",
                    help="more flags for the gateway (`smg launch --help`), as one quoted string")
    px.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    px.set_defaults(func=cmd_proxy)
    return parser


def proxy_policies() -> tuple[str, ...]:
    from service.proxy import POLICIES

    return POLICIES


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.func(args) or 0
    except CLIError as e:
        print(f"xlaserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
