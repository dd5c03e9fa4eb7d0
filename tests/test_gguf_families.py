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
# Gemma's norms: the one before the MLP is llama.cpp's ffn_norm, and one follows each block.
GEMMA_NAMES = {**LAYER_NAMES, "post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
# Gemma files as llama.cpp's rules read them: the query scale is 1/sqrt(head_dim) below 27B,
# and Gemma 3's local rope base is its fixed 10000.
GGUF_CASES = {
    "gemma2": (CASES["gemma2"][0], {**CASES["gemma2"][1], "query_pre_attn_scalar": 24}),
    "gemma3": (CASES["gemma3"][0], {**CASES["gemma3"][1], "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
}


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
    if "rope_theta" in cfg.rope_parameters:
        w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(_byte_tokens(cfg.vocab_size))
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    gemma = arch.startswith("gemma")
    if gemma:  # what llama.cpp's converter writes of a Gemma config
        w.add_sliding_window(cfg.sliding_window)
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if arch == "gemma3":
            w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
            w.add_rope_freq_base(float(cfg.rope_parameters["full_attention"]["rope_theta"]))
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(cfg.rope_parameters["full_attention"]["factor"])
    for name, tensor in model.state_dict().items():
        if name in TOP_NAMES:
            gname = TOP_NAMES[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{(GEMMA_NAMES if gemma else LAYER_NAMES)[rest]}"
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        value = tensor.numpy().astype(np.float32)
        if gemma and name.endswith("norm.weight"):
            value = value + 1.0  # llama.cpp stores Gemma's norm scale 1 + w
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
                                       ("llama3_rope_scaling", "llama"), ("gemma2", "gemma2"), ("gemma3", "gemma3")])
def test_gguf_converts_to_transformers_logits(tmp_path, case, arch):
    """qwen2/qwen3 and gemma2/gemma3 files (Gemma's windows, soft-caps and rope bases from the
    file's metadata and llama.cpp's rules), and a Llama 3.1 file whose rope scaling is its
    ``rope_freqs``."""
    config_cls, overrides = GGUF_CASES.get(case, CASES[case])
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
    for name, value in read.items():  # exact, but Gemma's norms went through 1 + w and back
        atol = 1e-6 if arch.startswith("gemma") and name.endswith("norm.weight") else 0
        np.testing.assert_allclose(np.asarray(value, np.float32), source[name].numpy(), rtol=0, atol=atol, err_msg=name)
    assert set(read) >= set(source) - {"lm_head.weight"}
    tokens = np.random.default_rng(4).integers(0, BASE["vocab_size"], (2, 33))
    want = hf_logits(model, tokens)

    dst = tmp_path / "converted"
    convert(path, dst, progress=False)
    cfg = load_config(dst)
    assert cfg.family == ("gemma" if arch.startswith("gemma") else arch)
    assert (cfg.rope_scaling.kind == "factors") == (arch == "llama")
    assert cfg.head_dim == (getattr(model.config, "head_dim", None) or cfg.hidden_size // cfg.num_heads)
    for backend in [transformer.XLA] + ([cpu_kernels.CpuKernels()] if cpu_kernels.available() else []):
        params = backend.prepare(load_params(dst, cfg), cfg)
        got = np.asarray(full_logits(params, cfg, np.asarray(tokens), backend=backend))
        diff = np.abs(got - want).max()
        assert diff <= 1e-4, f"{case} on {backend.describe()}: max abs logit diff {diff}"
    if not cpu_kernels.available():  # the XLA half passed; say the other was not run
        pytest.skip("the CPU kernels do not build here: their half of this check did not run")


CORPUS = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine!",
          "Hello, world: hello again, worlds.", "numbers 12345 and 678 go here", "  two spaces  here",
          "tabs\tand\nnew lines", "the theory of the thing is the thing itself"] * 20


def _spm_model(add_prefix: bool):
    """A small sentencepiece BPE model with byte fallback, trained here."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=add_prefix,
                                   character_coverage=1.0, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=out.getvalue())


@pytest.mark.parametrize("add_prefix", [True, False])
def test_sentencepiece_gguf_vocabulary_tokenizes_like_sentencepiece(tmp_path, add_prefix):
    """A ``llama``-type GGUF vocabulary (pieces, scores, types, as llama.cpp's converter writes a
    sentencepiece model: Llama 2, Mistral, Gemma) rebuilt as tokenizer.json encodes and decodes
    as sentencepiece itself, characters it never saw falling back to bytes; BOS comes first
    when the file says to add it, and the start-of-text space mark follows add_space_prefix."""
    import gguf

    from model.convert.gguf import gguf_reader, gguf_tokenizer_files
    from model.tokenizer import Tokenizer

    sp = _spm_model(add_prefix)
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(kinds)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(add_prefix)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((n, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dst = tmp_path / "tok"
    dst.mkdir()
    gguf_tokenizer_files(gguf_reader(path), dst)
    tok = Tokenizer.from_dir(dst)
    texts = ["The quick brown fox", "hello worlds, the theory", " leading space", "two  spaces and\ttabs\nlines",
             "unseen: café ñ 東京 🙂", "numbers 9876543210", "thethethe itself."]
    for text in texts:
        want = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == want, text
        assert tok.encode(text) == [1] + want
        assert tok.decode(want) == sp.decode(want)
    assert any(sp.is_byte(i) for i in sp.encode(texts[4]))  # the byte fallback was exercised
    assert tok.bos_id == 1 and 2 in tok.eos_ids


# Bytes per block of each quantized type and where its float16 scales sit: random bytes make
# valid blocks once those scales are finite and small.
QUANT_BLOCKS = {  # type: (values per block, bytes per block, offsets of float16 fields)
    "Q5_0": (32, 22, (0,)), "Q5_1": (32, 24, (0, 2)), "IQ4_NL": (32, 18, (0,)),
    "Q2_K": (256, 84, (80, 82)), "Q3_K": (256, 110, (108,)), "Q4_K": (256, 144, (0, 2)),
    "Q5_K": (256, 176, (0, 2)), "Q6_K": (256, 210, (208,)), "IQ4_XS": (256, 136, (0,)),
}


def _quantized(rows, cols, kind, rng):
    """A (rows, cols) tensor of ``kind`` as llama.cpp lays it out: each row's blocks in order."""
    per, size, scales = QUANT_BLOCKS[kind]
    blocks = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    for at in scales:
        d = rng.uniform(2e-4, 6e-4, blocks.shape[:2]).astype(np.float16)
        blocks[:, :, at:at + 2] = d.view(np.uint8).reshape(*d.shape, 2)
    return blocks.reshape(rows, -1)


def test_k_quant_and_legacy_types_convert_to_transformers_gguf_logits(tmp_path):
    """A file mixing the types a downloaded Q4_K_M (and its neighbours) holds: Q2_K..Q6_K,
    IQ4_XS in 256-wide blocks, and Q5_0, Q5_1, IQ4_NL in 32-wide ones, tensor by tensor.
    Our converted weights are the gguf package's dequantization of each tensor, and the model
    gives the logits of transformers' own GGUF loader's reading of the same file."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from model.convert.gguf import gguf_reader, gguf_tensors
    import torch
    import transformers

    overrides = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64, tie_word_embeddings=False)
    model = make_hf_checkpoint(tmp_path / "hf", transformers.Qwen3Config, overrides)
    path = tmp_path / "mixed.gguf"
    write_gguf(model, "qwen3", path)  # float32 everywhere; then the matrices are replaced below
    kinds = list(QUANT_BLOCKS)
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "mixed-q.gguf"), "qwen3")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        w.add_key_value(field.name, field.contents(), field.types[0],
                        sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(7)
    chosen = {}
    for i, t in enumerate(reader.tensors):
        rows, cols = (int(d) for d in reversed(t.shape)) if len(t.shape) == 2 else (None, None)
        if rows is None or t.name == "token_embd.weight":
            w.add_tensor(t.name, np.asarray(t.data))
            continue
        kind = kinds[len(chosen) % len(kinds)]
        chosen[t.name] = kind
        w.add_tensor(t.name, _quantized(rows, cols, kind, rng), raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert set(chosen.values()) == set(kinds)  # every type, in one file
    path = tmp_path / "mixed-q.gguf"

    # Ours against the gguf package's own dequantization, tensor by tensor (names mapped back).
    qreader = gguf_reader(path)
    ours_by_name = dict(gguf_tensors(qreader, {"model_type": "qwen3"}))
    for t in qreader.tensors:
        if t.name in chosen:
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
            got = next(v for k, v in ours_by_name.items() if k.endswith(_hf_suffix(t.name)))
            np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=t.name)
            assert np.isfinite(want).all() and np.abs(want).max() > 0

    # transformers' GGUF loader reads the same file: its model is the reference.
    read = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.as_tensor(np.asarray(read[name], np.float32)))
    tokens = np.random.default_rng(4).integers(0, BASE["vocab_size"], (2, 33))
    want = hf_logits(model, tokens)
    dst = tmp_path / "converted"
    convert(path, dst, progress=False)
    cfg = load_config(dst)
    params = transformer.XLA.prepare(load_params(dst, cfg), cfg)
    got = np.asarray(full_logits(params, cfg, np.asarray(tokens), backend=transformer.XLA))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def _hf_suffix(gguf_name: str) -> str:
    top = {v: k for k, v in TOP_NAMES.items()}
    if gguf_name in top:
        return top[gguf_name]
    _, i, rest = gguf_name.split(".", 2)
    hf = {v: k for k, v in LAYER_NAMES.items()}[rest]
    return f"layers.{i}.{hf}"
