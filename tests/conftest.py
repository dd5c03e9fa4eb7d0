"""Test setup: an emulated 8-device CPU mesh (set before jax is imported), float32 matmuls at
full precision, and shared fixtures for the tiny HF checkpoints and the default model."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json so tiny checkpoints are complete (conversion requires one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}))


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("xlaserve-cache")
    os.environ["XLASERVE_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def default_checkpoint(cache_root):
    """The bundled default model, converted once for the whole session."""
    from service.models import resolve

    path, _ = resolve(None)
    return path
