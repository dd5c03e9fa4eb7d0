"""The ``xlaserve`` command line's parser: every command, its flags and their help (the
commands themselves are in ``service.cli``)."""

from __future__ import annotations

import argparse

from service.parsers import REASONING_PARSERS, TOOL_PARSERS


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
                        "on CPU 6 whole --session-len sessions, at most 0.1 of available memory)")
    p.add_argument("--block-size", type=int, default=32,
                   help="positions per KV cache block, a multiple of 16 (default 32): the unit of "
                        "allocation and of prefix-cache sharing")
    p.add_argument("--speculative-algorithm", choices=["ngram", "draft", "none"], default="ngram",
                   help="speculative decoding: ngram (the default) proposes what followed the latest "
                        "earlier occurrence of the last 1-4 tokens in the prompt and output, draft what a "
                        "smaller model writes, none turns it off; each step checks the proposals in one "
                        "call (outputs unchanged, greedy and seeded), each sequence's draft length "
                        "adapting to how its drafts fare")
    p.add_argument("--speculative-draft-model", default=None,
                   help="with --speculative-algorithm draft: the draft model (converted dir, HF dir or "
                        ".gguf, with the served model's tokenizer), or 'same' for the served model itself "
                        "(with --speculative-draft-quantize)")
    p.add_argument("--speculative-draft-quantize", choices=["int8", "w8a8"], default=None,
                   help="quantize the draft model's weights (CPU kernels)")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=8,
                   help="the most proposed tokens checked per step and sequence, 1 to 16 (default 8); "
                        "a sequence's drafts halve while rejected and double back while accepted")
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


def _mm_limit(text: str) -> int:
    """``--limit-mm-per-prompt``: a count, or vLLM's JSON ``{"image": N}``."""
    import argparse
    import json

    try:
        value = json.loads(text)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"image"})
            if unknown:
                raise argparse.ArgumentTypeError(f"only images are taken, not {', '.join(unknown)}")
            value = value.get("image", 4)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: a count of images, or {{\"image\": N}}")


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give an adapter as NAME=PATH")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlaserve", description="LLM serving on JAX/XLA")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face dir or GGUF file")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    c.set_defaults(run="convert", log_level="WARNING")

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="no chat template: complete the text as is")
    g.set_defaults(run="generate")

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
    a.add_argument("--adapters", "--lora-modules", nargs="+", action="extend", type=_adapter, default=[],
                   metavar="NAME=PATH", dest="adapters",
                   help="LoRA adapters (PEFT directories) served beside the base model; a request's "
                        "model field picks one by NAME")
    a.add_argument("--max-loras", type=int, default=None,
                   help="adapters on the device at once (default: as many as --adapters names; at least 4 "
                        "with --enable-runtime-lora)")
    a.add_argument("--max-lora-rank", type=int, default=None,
                   help="the largest adapter rank served (default: the largest of --adapters, else 16)")
    a.add_argument("--enable-runtime-lora", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they change what "
                        "the server serves)")
    a.add_argument("--enable-sleep-mode", action="store_true",
                   help="allow POST /sleep, /wakeup and GET /is_sleeping: free the KV cache and move the "
                        "weights off the device between a training loop's rollouts")
    a.add_argument("--enable-weight-updates", action="store_true",
                   help="allow POST /update_weights (new weights from files, between steps), /pause, "
                        "/resume and /abort_request")
    a.add_argument("--limit-mm-per-prompt", type=_mm_limit, default=4, metavar="N|JSON",
                   help="images one request may send (default 4); also vLLM's '{\"image\": N}'")
    a.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="serve image URLs naming local files (file:// or a path) under DIR only "
                        "(default: no local files)")
    a.add_argument("--allowed-media-domains", nargs="+", default=[], metavar="HOST",
                   help="fetch http(s) image URLs from these hosts only (default: any)")
    a.add_argument("--media-fetch-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="seconds to fetch one image URL (default 10)")
    a.add_argument("--max-image-bytes", type=int, default=20 << 20,
                   help="the largest encoded image a request may send or a URL may return (default 20 MiB)")
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
    a.set_defaults(run="api_server")
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
    ac.set_defaults(run="api_client", log_level="WARNING")
    gr = ssub.add_parser("gradio", help="web chat page for a running api_server")
    gr.add_argument("api_server_url", help="e.g. http://localhost:23333")
    gr.add_argument("--server-name", default="0.0.0.0", help="host to bind (default 0.0.0.0)")
    gr.add_argument("--server-port", type=int, default=6006, help="port (default 6006)")
    gr.add_argument("--api-key", default=None, help="Bearer key for the api_server")
    gr.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    gr.set_defaults(run="gradio")
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
    px.set_defaults(run="proxy")
    return parser


def proxy_policies() -> tuple[str, ...]:
    from service.proxy import POLICIES

    return POLICIES
