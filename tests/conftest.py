"""Test setup: an emulated 8-device CPU mesh (set before jax is imported), float32 matmuls at
full precision, and shared fixtures for the tiny HF checkpoints and the default model."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One compilation cache for the session's in-process programs: every runner's jitted steps are
# closures of their own, so without it each test recompiles programs an earlier test already
# compiled (the same tiny model's shapes, over and over).
import tempfile  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="xlaserve-test-jax-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json so tiny checkpoints are complete (conversion requires one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}))


# `make test` runs the suite on two workers, a file each at a time, in collection order: the
# longest files go first, so that neither worker is left running one of them at the end while
# the other has nothing to do. (Order of files only; within a file nothing moves.)
LONGEST_FIRST = ("test_paged.py", "test_cpu_kernels.py", "test_parity.py", "test_lora.py", "test_multiprocess.py",
                 "test_window_pool.py", "test_server.py", "test_proxy.py", "test_engine.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture(scope="session", autouse=True)
def cache_root(tmp_path_factory):
    # Every test process its own conversion cache, from its start: the suite runs on two
    # workers, which must never convert the same model into one directory at once.
    root = tmp_path_factory.mktemp("xlaserve-cache")
    os.environ["XLASERVE_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def default_checkpoint(cache_root):
    """The bundled default model, converted once for the whole session."""
    from service.models import resolve

    path, _ = resolve(None)
    return path


ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, *extra: str, log_level: str = "WARNING"):
    """Start `xlaserve serve api_server` on the default model (the shapes the shared server
    compiles, so its compilation cache serves) and wait until it is ready: (process, url)."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": ""}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "api_server", "--server-name", "127.0.0.1",
             "--server-port", str(port), "--session-len", "256", "--max-batch-size", "4",
             "--log-level", log_level, *extra], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, [proc], log)
    return proc, url


def wait_ready(url: str, procs: list, log: Path, timeout: float = 600) -> None:
    """Wait until ``url``'s /health answers 200; fail with ``log``'s tail when a process of
    ``procs`` exits first, or past ``timeout`` (then the processes are killed)."""
    deadline = time.monotonic() + timeout
    while True:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(log.read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(f"{url} did not become ready")
        time.sleep(1)


@pytest.fixture(scope="session")
def server(default_checkpoint, tmp_path_factory):
    """A live `xlaserve serve api_server` on the default model, shared by the HTTP, client
    and web UI tests. ``XLASERVE_TEST_SERVER=URL`` reuses one already running (started with
    start_server's flags) while iterating on tests."""
    if os.environ.get("XLASERVE_TEST_SERVER"):
        yield os.environ["XLASERVE_TEST_SERVER"]
        return
    proc, url = start_server(tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def tiny_engine(checkpoint, slots: int, max_queue: int = 256, warmup: bool = False):
    """A started engine over a tiny random model with the default model's tokenizer: the HTTP
    layer's tests get real engine behaviour at almost no compile cost (``warmup``: every step
    shape compiled before it starts, as a server's is, so no request waits for a compile)."""
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer
    from model.weights import init_params
    from service.engine import Engine
    from service.engine.runner import ModelRunner

    tokenizer = Tokenizer.from_dir(checkpoint)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    runner = ModelRunner(cfg, init_params(cfg, seed=0), max_batch_size=slots, session_len=128,
                         eos_ids=tokenizer.eos_ids, max_prefill_chunk=32)
    if warmup:
        runner.warmup()
    engine = Engine(runner, tokenizer, max_queue=max_queue)
    engine.start()
    return engine
