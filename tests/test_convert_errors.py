"""The converter fails closed: each bad input is one clear error, non-zero exit, no output."""

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from test_parity import BASE, make_hf_checkpoint
from model.convert import ConversionError, convert


@pytest.fixture()
def hf_dir(tmp_path):
    src = tmp_path / "hf"
    make_hf_checkpoint(src, transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2))
    return src


def _edit_weights(src, fn):
    path = src / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _assert_fails(src, dst, match):
    with pytest.raises(ConversionError, match=match):
        convert(src, dst, progress=False)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")], "temp dir left"


def test_extra_key_is_rejected(hf_dir, tmp_path):
    _edit_weights(hf_dir, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
    _assert_fails(hf_dir, tmp_path / "out", r"unexpected tensor 'model\.layers\.0\.mystery\.weight'")


def test_missing_key_is_rejected(hf_dir, tmp_path):
    _edit_weights(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _assert_fails(hf_dir, tmp_path / "out", r"missing params: layers\.1\.w_up")


def test_wrong_shape_is_rejected(hf_dir, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = np.zeros((BASE["hidden_size"], 7), np.float32)
    _edit_weights(hf_dir, shrink)
    _assert_fails(hf_dir, tmp_path / "out", r"model\.layers\.0\.mlp\.down_proj\.weight")


def test_unsupported_architecture_is_rejected(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt_neox", ["GPTNeoXForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _assert_fails(hf_dir, tmp_path / "out", "unsupported architecture: model_type='gpt_neox'")


def test_unsupported_attribute_is_rejected(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _assert_fails(hf_dir, tmp_path / "out", "hidden_act='gelu' is not supported")


def test_truncated_file_is_rejected(hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    _assert_fails(hf_dir, tmp_path / "out", "truncated")


def test_not_a_checkpoint_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_fails(tmp_path / "empty", tmp_path / "out", "no config.json")


def test_corrupt_gguf_is_rejected(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    _assert_fails(bad, tmp_path / "out", "not a valid GGUF file")


@pytest.mark.parametrize("args", [["/nonexistent/model", "OUT"], ["EMPTY", "OUT"]], ids=["missing", "empty_dir"])
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, args):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a in ("OUT", "EMPTY") else a for a in args]
    r = subprocess.run([sys.executable, "-m", "service.cli", "convert", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("xlaserve: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "OUT").exists()


def test_generation_config_gives_the_server_defaults(default_checkpoint, tmp_path):
    """--generation-config: ``auto`` reads the checkpoint's sampling fields (the bundled model
    carries its authors' temperature 0.2 and top_p 0.9), ``none`` keeps OpenAI's, a file gives
    its own; a request's value beats the server's, which beats OpenAI's."""
    import json

    from service.models import ModelSourceError, generation_defaults
    from service.protocol import ChatCompletionRequest
    from service.params import SamplingParams

    bundled = json.loads((default_checkpoint / "generation_config.json").read_text())
    assert bundled["temperature"] == 0.2 and bundled["top_p"] == 0.9 and bundled["eos_token_id"] is not None
    assert generation_defaults(default_checkpoint)[0] == SamplingParams(temperature=0.2, top_p=0.9)
    assert generation_defaults(default_checkpoint, "none") == (SamplingParams(), {})
    own = tmp_path / "gen.json"
    own.write_text(json.dumps({"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1, "do_sample": True,
                               "max_new_tokens": 50}))
    defaults, fields = generation_defaults(default_checkpoint, str(own))
    assert fields == {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1}
    params = ChatCompletionRequest(messages=[], top_k=3).to_sampling_params(defaults)
    assert (params.temperature, params.top_k, params.repetition_penalty, params.top_p) == (0.7, 3, 1.1, 1.0)
    own.write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ModelSourceError, match="temperature must be >= 0"):
        generation_defaults(default_checkpoint, str(own))
    with pytest.raises(ModelSourceError, match="cannot read"):
        generation_defaults(default_checkpoint, str(tmp_path / "missing.json"))
