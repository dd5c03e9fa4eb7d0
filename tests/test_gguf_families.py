"""GGUF files of the qwen2 and qwen3 architectures, and Llama 3.1 files with ``rope_freqs``,
written from tiny random HF checkpoints in llama.cpp's layout with the gguf package's writer:
transformers' own GGUF loader reads back the source weights, and our conversion of the file
gives transformers' logits (of the source model) on both device paths."""

import numpy as np
import pytest

from model.backends import cpu as cpu_kernels
from model.checkpoint import load_config, load_params
from model.convert import convert
from model import transformer
from model.transformer import full_logits
from test_parity import BASE, CASES, hf_logits, make_hf_checkpoint

# HF name (after "model.layers.N.") -> llama.cpp's tensor name (after "blk.N.")
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def _byte_tokens(n):
    """n byte-level BPE symbols (GPT-2's byte -> character map), as a vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    k = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return [chr(c) for c in cs][:n]


def _permute(w, heads):
    """llama.cpp's q/k row order for the llama architecture (interleaved rope pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg, head_dim):
    """llama.cpp's converter's ``rope_freqs`` of a Llama 3.1 rope scaling, written out here
    from its formula (independently of our own llama3 scaling)."""
    import math

    rope = cfg.rope_parameters
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(model, arch, path):
    """What llama.cpp's converter writes for these architectures: q/k rows permuted for the
    llama architecture only (qwen's rope is rotate-half, as HF's), a Llama 3.1 rope scaling as
    the ``rope_freqs`` tensor."""
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(_byte_tokens(cfg.vocab_size))
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, tensor in model.state_dict().items():
        if name in TOP_NAMES:
            gname = TOP_NAMES[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{LAYER_NAMES[rest]}"
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        value = tensor.numpy().astype(np.float32)
        if arch == "llama" and gname.endswith("attn_q.weight"):
            value = _permute(value, cfg.num_attention_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            value = _permute(value, cfg.num_key_value_heads)
        w.add_tensor(gname, value)
    if (cfg.rope_parameters or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg, head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case,arch", [("qwen2_qkv_bias", "qwen2"), ("qwen3", "qwen3"), ("qwen3_tied", "qwen3"),
                                       ("llama3_rope_scaling", "llama")])
def test_gguf_converts_to_transformers_logits(tmp_path, case, arch):
    """qwen2/qwen3 files, and a Llama 3.1 file whose rope scaling is its ``rope_freqs``."""
    config_cls, overrides = CASES[case]
    model = make_hf_checkpoint(tmp_path / "hf", config_cls, overrides)
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    path = gguf_dir / f"tiny-{arch}.gguf"
    write_gguf(model, arch, path)

    # transformers' own GGUF loader reads the file's tensors back as the source model's (its
    # config reading takes Qwen3's head_dim from hidden / heads, so only the tensors are used)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    read = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    source = model.state_dict()
    read.pop("rope_freqs.weight", None)
    for name, value in read.items():
        np.testing.assert_array_equal(np.asarray(value, np.float32), source[name].numpy(), err_msg=name)
    assert set(read) >= set(source) - {"lm_head.weight"}
    tokens = np.random.default_rng(4).integers(0, BASE["vocab_size"], (2, 33))
    want = hf_logits(model, tokens)

    dst = tmp_path / "converted"
    convert(path, dst, progress=False)
    cfg = load_config(dst)
    assert cfg.family == arch
    assert (cfg.rope_scaling.kind == "factors") == (arch == "llama")
    assert cfg.head_dim == (getattr(model.config, "head_dim", None) or cfg.hidden_size // cfg.num_heads)
    for backend in [transformer.XLA] + ([cpu_kernels.CpuKernels()] if cpu_kernels.available() else []):
        params = backend.prepare(load_params(dst, cfg), cfg)
        got = np.asarray(full_logits(params, cfg, np.asarray(tokens), backend=backend))
        diff = np.abs(got - want).max()
        assert diff <= 1e-4, f"{case} on {backend.describe()}: max abs logit diff {diff}"
