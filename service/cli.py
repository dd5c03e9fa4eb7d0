"""The ``xlaserve`` command: convert, generate, serve api_server."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time

from service.cli_parser import build_parser

log = logging.getLogger("xlaserve")
_LAUNCHED = time.monotonic()  # the command's start, for the time-to-ready line


class CLIError(Exception):
    """Printed as one line, exit status 1."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _enable_compile_cache() -> None:
    from model.checkpoint import cache_dir, host_id
    from service.engine import programs

    # The step programs whole, keyed without tracing them, so a restart loads them as they are
    # (see programs); per CPU, as XLA's CPU programs use this machine's instructions (see
    # host_id).
    programs.enable(cache_dir() / "programs" / host_id())


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

    checkpoint, _, config = _model_and_config(args, max_batch_size)
    try:
        runner, _ = build_runner(checkpoint, config)
    except ValueError as e:
        raise CLIError(str(e)) from None
    log.info("process %d following process 0's steps", args.node_rank)
    runner.follow()


# -- commands ----------------------------------------------------------------------------------


def cmd_convert(args) -> None:
    from model.convert import ConversionError, convert

    try:
        convert(args.src, args.dst, args.dtype)
    except ConversionError as e:
        raise CLIError(str(e)) from None
    print(f"converted {args.src} -> {args.dst}")


def _engine_config(args, max_batch_size: int):
    """The engine settings the flags give (checked: a bad one is a CLIError)."""
    from service.engine.config import EngineConfig, EngineConfigError

    try:
        return EngineConfig(
            max_batch_size=max_batch_size, session_len=args.session_len, block_size=args.block_size,
            cache_max_entry_count=args.cache_max_entry_count, max_queue=getattr(args, "max_queue", 256),
            dtype=args.dtype, quantize=getattr(args, "quantize", None), kv_cache_dtype=args.kv_cache_dtype,
            tp=args.tp, dp=args.dp, speculative_algorithm=args.speculative_algorithm,
            speculative_num_draft_tokens=args.speculative_num_draft_tokens,
            speculative_max_batch=args.speculative_max_batch, speculative_draft_model=args.speculative_draft_model,
            speculative_draft_quantize=args.speculative_draft_quantize,
            adapters=tuple(getattr(args, "adapters", ())), max_loras=getattr(args, "max_loras", None),
            max_lora_rank=getattr(args, "max_lora_rank", None),
            runtime_lora=getattr(args, "enable_runtime_lora", False))
    except EngineConfigError as e:
        raise CLIError(str(e)) from None


def _model_and_config(args, max_batch_size: int):
    """(checkpoint, name, EngineConfig) for the model and settings the flags name. Every
    process of a multi-process job calls this alike."""
    from model.checkpoint import CheckpointError, load_config
    from service.models import ModelSourceError, resolve

    config = _engine_config(args, max_batch_size)
    if config.speculative_algorithm == "draft" and args.nnodes > 1:
        raise CLIError("--speculative-algorithm draft runs on one process (--nnodes 1)")
    try:
        checkpoint, name = resolve(args.model, args.dtype)
        load_config(checkpoint)
    except (ModelSourceError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    return checkpoint, name, config


def _load_engine(args, max_batch_size: int, warmup: bool):
    from service.models import build_engine

    checkpoint, name, config = _model_and_config(args, max_batch_size)
    try:
        engine = build_engine(checkpoint, config, warmup=warmup)
    except ValueError as e:  # EngineConfigError, DraftError
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
    from service.media import MediaSettings
    from service.models import DEFAULT_MODEL_NAME

    settings = ServerSettings(
        model_name=args.model_name or "", api_keys=tuple(args.api_keys or ()),
        chat_template=chat_template, meta_instruction=args.meta_instruction,
        allow_origins=tuple(args.allow_origins or ()), allow_credentials=args.allow_credentials,
        allow_methods=tuple(args.allow_methods or ("*",)), allow_headers=tuple(args.allow_headers or ("*",)),
        stall_timeout=args.stall_timeout, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser, responses_store=args.responses_store,
        runtime_lora=args.enable_runtime_lora, sleep_mode=args.enable_sleep_mode,
        weight_updates=args.enable_weight_updates,
        media=MediaSettings(limit_per_prompt=args.limit_mm_per_prompt, allowed_local_path=args.allowed_local_media_path,
                            allowed_domains=tuple(h.lower() for h in args.allowed_media_domains),
                            fetch_timeout=args.media_fetch_timeout, max_bytes=args.max_image_bytes))
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
            runner = state.engine.runner
            loaded, compiled = runner.program_counts()
            log.info("ready %.1f s after launch (%s start: %d step programs compiled, %d loaded)",
                     time.monotonic() - _LAUNCHED, "a warm" if not compiled else "a cold", compiled, loaded)
            mem = runner.memory()
            if mem["resident"]:
                log.info("resident memory %.0f MiB: weights %.0f, KV cache %.0f, the rest %.0f (the runtime, "
                         "compiled programs, tokenizer, Python)", mem["resident"], mem["weights"], mem["kv_cache"],
                         mem["resident"] - mem["weights"] - mem["kv_cache"])
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


COMMANDS = {"convert": cmd_convert, "generate": cmd_generate, "api_server": cmd_api_server,
            "api_client": cmd_api_client, "gradio": cmd_gradio, "proxy": cmd_proxy}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return COMMANDS[args.run](args) or 0
    except CLIError as e:
        print(f"xlaserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
