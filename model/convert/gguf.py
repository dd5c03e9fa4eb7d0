"""GGUF (llama.cpp) input: metadata as an HF-style config, tensors dequantized one at a time
under their HF names (so GGUF input reuses the Llama key table), and the tokenizer rebuilt."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from model.config import UnsupportedConfigError
from model.convert.transforms import ConversionError

# GGUF (llama.cpp) tensor names -> HF names, so GGUF input reuses the Llama table.
GGUF_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", "model.layers.{}.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", "model.layers.{}.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", "model.layers.{}.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{}.mlp.down_proj.weight"),
    (r"blk\.(\d+)\.attn_q\.bias", "model.layers.{}.self_attn.q_proj.bias"),  # qwen2
    (r"blk\.(\d+)\.attn_k\.bias", "model.layers.{}.self_attn.k_proj.bias"),
    (r"blk\.(\d+)\.attn_v\.bias", "model.layers.{}.self_attn.v_proj.bias"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", "model.layers.{}.self_attn.q_norm.weight"),  # qwen3
    (r"blk\.(\d+)\.attn_k_norm\.weight", "model.layers.{}.self_attn.k_norm.weight"),
]

# Gemma's layers name their norms apart from Llama's: llama.cpp's ffn_norm is the norm before
# the MLP (HF's pre_feedforward_layernorm), and a norm follows attention and the MLP each.
GEMMA_NAMES = [
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{}.pre_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.post_attention_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.post_ffw_norm\.weight", "model.layers.{}.post_feedforward_layernorm.weight"),
]

# GGUF architectures -> (HF model_type, architecture). llama.cpp permutes the q/k rows of the
# llama architecture only (its rope there is interleaved); qwen's and gemma's are rotate-half.
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}


def gguf_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/... on corrupt input
        raise ConversionError(f"{path.name}: not a valid GGUF file ({e})") from None


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_config(reader) -> dict[str, Any]:
    """An HF-style config.json built from GGUF metadata (the ``ARCHITECTURES``)."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedConfigError(f"unsupported GGUF architecture {arch!r} (supported: "
                                     f"{', '.join(ARCHITECTURES)})")
    names = {t.name for t in reader.tensors}

    def get(key: str, default: Any = None) -> Any:
        value = _gguf_field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ConversionError(f"GGUF metadata is missing {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = _gguf_field(reader, f"{arch}.vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens", []))
    # head_dim: the key length where the file says it (Qwen3's differs from hidden / heads)
    head_dim = _gguf_field(reader, f"{arch}.attention.key_length") or get("rope.dimension_count", hidden // heads)
    model_type, architecture = ARCHITECTURES[arch]
    cfg = {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
    }
    if arch.startswith("gemma"):
        cfg.update(_gemma_config(reader, arch, cfg))
    return cfg


def _gemma_config(reader, arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """What a Gemma file leaves to llama.cpp's own rules, written out as HF config fields."""
    field = lambda key, default=None: _gguf_field(reader, f"{arch}.{key}", default)  # noqa: E731
    layers, heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    # llama.cpp's scale: 1/sqrt(hidden / heads) for the 27B models (46 layers of Gemma 2, 62 of
    # Gemma 3), 1/sqrt(head_dim) for the others, as their HF configs' query_pre_attn_scalar say.
    big = layers == (46 if arch == "gemma2" else 62)
    extra: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": hidden // heads if big else cfg["head_dim"],
        "attn_logit_softcapping": field("attn_logit_softcapping"),
        "final_logit_softcapping": field("final_logit_softcapping"),
        "sliding_window": field("attention.sliding_window"),
        "tie_word_embeddings": cfg["tie_word_embeddings"],
    }
    if extra["sliding_window"] is None:
        raise ConversionError(f"GGUF metadata is missing {arch}.attention.sliding_window")
    pattern = field("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, int):  # one global layer in every `pattern`
        sliding = [(i + 1) % pattern != 0 for i in range(layers)]
    else:  # per layer, true where it slides
        sliding = [bool(x) for x in pattern]
    extra["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    if arch == "gemma3":
        # The local base is llama.cpp's fixed 10000 (the file stores the global one); a linear
        # scaling applies to the global layers only.
        extra["rope_local_base_freq"] = 10000.0
        kind = field("rope.scaling.type")
        if kind not in (None, "none"):
            if kind != "linear":
                raise UnsupportedConfigError(f"GGUF rope scaling type {kind!r} is not supported for gemma3")
            extra["rope_scaling"] = {"rope_type": "linear", "factor": float(field("rope.scaling.factor"))}
    return extra


def gguf_rope_factors(reader, head_dim: int) -> tuple[float, ...] | None:
    """The per-frequency RoPE divisors of ``rope_freqs`` (Llama 3.x files carry their rope
    scaling so), or None without one."""
    from gguf.quants import dequantize

    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    factors = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,) or not np.all(factors > 0):
        raise ConversionError(f"GGUF rope_freqs has shape {factors.shape}; expected ({head_dim // 2},) positive factors")
    return tuple(float(x) for x in factors)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The tensor types downloaded files commonly hold, dequantized to float32 at conversion by the
# gguf package's codecs: a Q4_K_M file mixes Q4_K and Q6_K with Q5_0/Q8_0 (and, where a row does
# not divide into 256-wide blocks, legacy types) tensor by tensor.
SUPPORTED_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                             "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"})


def gguf_tensors(reader, hf_cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    supported = SUPPORTED_TYPES
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # not a weight: the config's rope scaling
            continue
        qtype = GGMLQuantizationType(t.tensor_type).name
        if qtype not in supported:
            raise ConversionError(f"GGUF tensor {t.name} has type {qtype}; supported: {', '.join(sorted(supported))}")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        gemma = hf_cfg["model_type"].startswith("gemma")
        if gemma and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's norms as the scale 1 + w; HF's weight is w
        for pattern, hf_name in (GEMMA_NAMES if gemma else []) + GGUF_NAMES:
            m = re.fullmatch(pattern, t.name)
            if m:
                name = hf_name.format(*m.groups())
                break
        else:
            raise ConversionError(f"unexpected GGUF tensor {t.name!r}")
        if hf_cfg["model_type"] == "llama" and t.name.endswith(".attn_q.weight"):
            w = _unpermute(w, hf_cfg["num_attention_heads"])
        elif hf_cfg["model_type"] == "llama" and t.name.endswith(".attn_k.weight"):
            w = _unpermute(w, hf_cfg["num_key_value_heads"])
        yield name, w


def _spm_tokenizer(reader, tokens: list[str], types: list[int]):
    """A sentencepiece-type (``llama``) vocabulary as a ``tokenizers`` BPE over its pieces, as
    llama.cpp tokenizes it: symbols are merged into the piece of highest score first (the merges
    are every split of a piece into two pieces, ranked by the piece's score), characters outside
    the vocabulary fall back to their UTF-8 byte pieces (<0xNN>), and with add_space_prefix the
    text starts with the word boundary mark."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    scores = [float(s) for s in _gguf_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))]
    normal = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    ranked = []
    for piece, i in normal.items():
        splits = [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in normal and piece[j:] in normal]
        # between two splits of one piece, the one whose parts score higher comes first
        splits.sort(key=lambda m: (scores[normal[m[0]]], scores[normal[m[1]]]), reverse=True)
        ranked += [(scores[i], m) for m in splits]
    ranked.sort(key=lambda x: x[0], reverse=True)  # stable: ties keep the order above
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[m for _, m in ranked],
                                 unk_token=unk, fuse_unk=True, byte_fallback=True))
    # Spaces are the word mark; with add_space_prefix one more starts the text and follows
    # each special token, as llama.cpp adds it (even before a space already there).
    prefix = bool(_gguf_field(reader, "tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    if _gguf_field(reader, "tokenizer.ggml.add_bos_token", True) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok


def gguf_tokenizer_files(reader, dst: Path) -> None:
    """Rebuild a ``tokenizer.json`` (+ config files) from the GGUF vocabulary: byte-level BPE
    (``gpt2``: its merges) or sentencepiece-type (``llama``: its pieces and scores)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise UnsupportedConfigError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    types = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if kind == "llama":
        _spm_tokenizer(reader, tokens, types).save(str(dst / "tokenizer.json"))
        _tokenizer_config(reader, dst, tokens, default_bos=True)
        return
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges", [])]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 fuse_unk=False, ignore_merges=False))
    # The split regex the merges were learned with. For SmolLM-style vocabularies digits are
    # split one by one first, as llama.cpp's "smollm" pre-tokenizer does.
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    steps = []
    if pre in ("smollm", "starcoder", "refact"):
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "qwen2"):
        # Qwen2/3 split digits one by one, Llama 3 in groups of up to three.
        digits = r"\p{N}" if pre == "qwen2" else r"\p{N}{1,3}"
        split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits +
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(control)
    tok.save(str(dst / "tokenizer.json"))
    _tokenizer_config(reader, dst, tokens, default_bos=False)


def _tokenizer_config(reader, dst: Path, tokens: list[str], default_bos: bool) -> None:
    def token(key):
        i = _gguf_field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
              "add_bos_token": bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", default_bos))}
    template = _gguf_field(reader, "tokenizer.chat_template")
    if template:
        (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    gen = {"bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
           "eos_token_id": eos}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))
