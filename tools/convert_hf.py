"""Convert a Hugging Face checkpoint directory or a GGUF file into an xlaserve checkpoint.

    python tools/convert_hf.py SRC DST [--dtype bfloat16]      (also: xlaserve convert SRC DST)

The output directory holds ``xlaserve.json`` (format version + model config), ``params/``
(an orbax checkpoint of the param tree in ``model.weights``) and the tokenizer files.

The conversion is a table: source key pattern -> our param path + transform. It fails closed:
an unmapped key, a missing or duplicate param, a shape that does not match the weight spec, or
a config attribute we do not implement is an error that names the key. Tensors are read one at
a time (memory-mapped safetensors, or dequantized GGUF tensor by tensor), so peak memory is one
copy of the converted params plus one source tensor. Output is written to a temporary sibling
directory and renamed into place only when complete: a failure leaves no half-written output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import FORMAT_VERSION  # noqa: E402  (the reader's; one number for both)
from model.config import ModelConfig, UnsupportedConfigError, from_hf_config  # noqa: E402
from model.weights import WeightSpec, is_spec, param_specs  # noqa: E402
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message names the cause."""


# --------------------------------------------------------------------------------------------
# Transforms: HF tensors are torch Linear weights (out, in); ours are (in, out) with heads split.

Out = list[tuple[tuple, np.ndarray]]  # (param path, array)


def _same(path):
    return lambda w, cfg, m: [(path(m), w)]


def _linear(path):  # (out, in) -> (in, out)
    return lambda w, cfg, m: [(path(m), w.T)]


def _q(w, cfg, m):  # (N*H, D) -> (D, N, H)
    return [(("layers", int(m[1]), "wq"), w.T.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim))]


def _kv(name):
    def f(w, cfg, m):  # (K*H, D) -> (D, K, H)
        return [(("layers", int(m[1]), name), w.T.reshape(cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim))]
    return f


def _o(w, cfg, m):  # (D, N*H) -> (N, H, D)
    return [(("layers", int(m[1]), "wo"), w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size))]


def _bias(name, heads_attr):
    def f(w, cfg, m):  # (heads*H,) -> (heads, H)
        return [(("layers", int(m[1]), name), w.reshape(getattr(cfg, heads_attr), cfg.head_dim))]
    return f


def _wqkv(w, cfg, m):
    """InternLM2's packed wqkv: rows grouped per KV head as [G query heads, k, v]."""
    k, g, h, d = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.hidden_size
    if w.shape != ((g + 2) * k * h, d):
        raise ConversionError(f"{m[0]}: shape {w.shape}, expected {((g + 2) * k * h, d)}")
    w = w.reshape(k, g + 2, h, d)  # (K, G+2, H, D)
    q = w[:, :g].reshape(k * g, h, d).transpose(2, 0, 1)  # (D, N, H)
    layer = int(m[1])
    return [(("layers", layer, "wq"), q),
            (("layers", layer, "wk"), w[:, g].transpose(2, 0, 1)),  # (D, K, H)
            (("layers", layer, "wv"), w[:, g + 1].transpose(2, 0, 1))]


def _layer(name):
    return lambda m: ("layers", int(m[1]), name)


def _top(name):
    return lambda m: (name,)


LAYER = r"model\.layers\.(\d+)\."
LLAMA_TABLE: list[tuple[str, Callable]] = [
    (r"model\.embed_tokens\.weight", _same(_top("embed"))),
    (r"model\.norm\.weight", _same(_top("final_norm"))),
    (r"lm_head\.weight", _linear(_top("lm_head"))),
    (LAYER + r"input_layernorm\.weight", _same(_layer("attn_norm"))),
    (LAYER + r"post_attention_layernorm\.weight", _same(_layer("mlp_norm"))),
    (LAYER + r"self_attn\.q_proj\.weight", _q),
    (LAYER + r"self_attn\.k_proj\.weight", _kv("wk")),
    (LAYER + r"self_attn\.v_proj\.weight", _kv("wv")),
    (LAYER + r"self_attn\.o_proj\.weight", _o),
    (LAYER + r"self_attn\.q_proj\.bias", _bias("bq", "num_heads")),
    (LAYER + r"self_attn\.k_proj\.bias", _bias("bk", "num_kv_heads")),
    (LAYER + r"self_attn\.v_proj\.bias", _bias("bv", "num_kv_heads")),
    (LAYER + r"mlp\.gate_proj\.weight", _linear(_layer("w_gate"))),
    (LAYER + r"mlp\.up_proj\.weight", _linear(_layer("w_up"))),
    (LAYER + r"mlp\.down_proj\.weight", _linear(_layer("w_down"))),
]
INTERNLM2_TABLE: list[tuple[str, Callable]] = [
    (r"model\.tok_embeddings\.weight", _same(_top("embed"))),
    (r"model\.norm\.weight", _same(_top("final_norm"))),
    (r"output\.weight", _linear(_top("lm_head"))),
    (LAYER + r"attention_norm\.weight", _same(_layer("attn_norm"))),
    (LAYER + r"ffn_norm\.weight", _same(_layer("mlp_norm"))),
    (LAYER + r"attention\.wqkv\.weight", _wqkv),
    (LAYER + r"attention\.wo\.weight", _o),
    (LAYER + r"feed_forward\.w1\.weight", _linear(_layer("w_gate"))),
    (LAYER + r"feed_forward\.w3\.weight", _linear(_layer("w_up"))),
    (LAYER + r"feed_forward\.w2\.weight", _linear(_layer("w_down"))),
]
TABLES = {"llama": LLAMA_TABLE, "qwen2": LLAMA_TABLE, "internlm2": INTERNLM2_TABLE}
# Keys that carry no weights we need (derived buffers of old checkpoints).
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")

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
]


# --------------------------------------------------------------------------------------------
# Sources: each yields (key, numpy array) one tensor at a time.

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


def _read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Memory-mapped reader (numpy has no bfloat16, which the ``safetensors`` numpy API needs)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    except (OSError, ValueError, struct.error) as e:
        raise ConversionError(f"{path.name}: not a valid safetensors file ({e})") from None
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path.name}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.size:
            raise ConversionError(f"{path.name}: tensor {key} runs past the end of the file (truncated?)")
        yield key, data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path.name}: reading .bin checkpoints needs torch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ConversionError(f"{path.name}: not a readable PyTorch checkpoint ({e})") from None
    for key, t in state.items():
        yield key, t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def hf_tensors(src: Path) -> Iterator[tuple[str, np.ndarray]]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
    if files:
        for name in files:
            if not (src / name).exists():
                raise ConversionError(f"{name} is listed in the index but missing from {src}")
            yield from _read_safetensors(src / name)
        return
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weights found")
    for p in bins:
        yield from _read_torch_bin(p)


# --------------------------------------------------------------------------------------------
# GGUF


def _gguf_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/... on corrupt input
        raise ConversionError(f"{path.name}: not a valid GGUF file ({e})") from None


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_config(reader) -> dict[str, Any]:
    """An HF-style config.json built from GGUF metadata (llama architecture only)."""
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedConfigError(f"unsupported GGUF architecture {arch!r} (supported: llama)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedConfigError("GGUF rope_freqs (Llama 3.1 rope scaling) is not supported yet")

    def get(key: str, default: Any = None) -> Any:
        value = _gguf_field(reader, f"llama.{key}", default)
        if value is None:
            raise ConversionError(f"GGUF metadata is missing llama.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = _gguf_field(reader, "llama.vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens", []))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
    }


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader, hf_cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    supported = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}
    for t in reader.tensors:
        qtype = GGMLQuantizationType(t.tensor_type).name
        if qtype not in supported:
            raise ConversionError(f"GGUF tensor {t.name} has type {qtype}; supported: {', '.join(sorted(supported))}")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        for pattern, hf_name in GGUF_NAMES:
            m = re.fullmatch(pattern, t.name)
            if m:
                name = hf_name.format(*m.groups())
                break
        else:
            raise ConversionError(f"unexpected GGUF tensor {t.name!r}")
        if ".attn_q." in t.name:
            w = _unpermute(w, hf_cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = _unpermute(w, hf_cfg["num_key_value_heads"])
        yield name, w


def gguf_tokenizer_files(reader, dst: Path) -> None:
    """Rebuild a byte-level BPE ``tokenizer.json`` (+ config files) from GGUF vocab/merges."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedConfigError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2)")
    tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    types = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges", [])]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 fuse_unk=False, ignore_merges=False))
    # The split regex the merges were learned with. For SmolLM-style vocabularies digits are
    # split one by one first, as llama.cpp's "smollm" pre-tokenizer does.
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    steps = []
    if pre in ("smollm", "starcoder", "refact"):
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"):
        split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
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

    def token(key):
        i = _gguf_field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
              "add_bos_token": bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False))}
    template = _gguf_field(reader, "tokenizer.chat_template")
    if template:
        (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    gen = {"bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
           "eos_token_id": eos}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))


# --------------------------------------------------------------------------------------------
# The conversion itself


def _np_dtype(name: str):
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def _empty_tree(cfg: ModelConfig) -> dict[str, Any]:
    specs = param_specs(cfg)
    return {k: ([dict() for _ in v] if k == "layers" else None) for k, v in specs.items()}


def build_params(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], progress: bool = True) -> dict:
    """Consume (key, tensor) pairs through the family's table into a checked param tree."""
    table = [(re.compile(p), fn) for p, fn in TABLES[cfg.family]]
    specs = param_specs(cfg)
    out = _empty_tree(cfg)
    dtype = _np_dtype(cfg.dtype)
    total = sum(1 for _ in _iter_paths(specs))
    bar = _progress(total, progress)
    for key, tensor in tensors:
        if IGNORED.fullmatch(key):
            continue
        for pattern, fn in table:
            m = pattern.fullmatch(key)
            if m:
                break
        else:
            raise ConversionError(f"unexpected tensor {key!r}: no rule maps it for family {cfg.family}")
        if cfg.tie_word_embeddings and key in ("lm_head.weight", "output.weight"):
            continue  # tied: the head is the embedding; some checkpoints store a copy
        for path, value in fn(np.asarray(tensor, dtype=np.float32), cfg, m):
            try:
                spec = _lookup(specs, path)
            except (KeyError, IndexError):
                raise ConversionError(f"tensor {key!r} maps to {'.'.join(map(str, path))}, "
                                      "which this model config does not have") from None
            if tuple(value.shape) != spec.shape:
                raise ConversionError(f"tensor {key!r}: shape {tuple(tensor.shape)} does not fit "
                                      f"{'.'.join(map(str, path))} {spec.shape}")
            if _lookup(out, path, missing_ok=True) is not None:
                raise ConversionError(f"tensor {key!r}: duplicate value for {'.'.join(map(str, path))}")
            _assign(out, path, np.ascontiguousarray(value.astype(dtype)))
            bar.update(1)
    bar.close()
    missing = [".".join(map(str, p)) for p in _iter_paths(specs) if _lookup(out, p, missing_ok=True) is None]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"checkpoint is missing params: {', '.join(missing[:5])}{more}")
    return out


def _iter_paths(specs) -> Iterator[tuple]:
    for k, v in specs.items():
        if k == "layers":
            for i, layer in enumerate(v):
                for name in layer:
                    yield ("layers", i, name)
        else:
            yield (k,)


def _lookup(tree, path, missing_ok=False):
    node = tree
    for p in path:
        if missing_ok and isinstance(node, dict) and p not in node:
            return None
        node = node[p]
    return node


def _assign(tree, path, value):
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="converting", unit="tensor", file=sys.stderr)


def save_checkpoint(dst: Path, cfg: ModelConfig, params: dict, source: str) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((dst / "params").absolute(), params)
    meta = {"format_version": FORMAT_VERSION, "config": cfg.to_json(), "source": source}
    (dst / "xlaserve.json").write_text(json.dumps(meta, indent=2))


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
            progress: bool = True) -> Path:
    """Convert ``src`` (HF dir or .gguf file) into ``dst``; returns ``dst``. Atomic."""
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    if dst.exists():
        raise ConversionError(f"{dst} already exists; remove it or choose another output path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        if src.is_file():
            _convert_gguf(src, tmp, dtype, progress)
        else:
            _convert_hf_dir(src, tmp, dtype, progress)
        os.replace(tmp, dst)
    except UnsupportedConfigError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(str(e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _convert_hf_dir(src: Path, tmp: Path, dtype: str | None, progress: bool) -> None:
    config_path = src / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{src}: not a Hugging Face checkpoint (no config.json)")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_path}: invalid JSON ({e})") from None
    cfg = from_hf_config(hf_cfg, dtype)
    if not any((src / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConversionError(f"{src}: no tokenizer.json or tokenizer.model")
    params = build_params(cfg, hf_tensors(src), progress)
    save_checkpoint(tmp, cfg, params, source=str(src))
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    # Generation defaults (EOS ids) may live only in config.json.
    if not (tmp / "generation_config.json").exists():
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id") if k in hf_cfg}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _convert_gguf(src: Path, tmp: Path, dtype: str | None, progress: bool) -> None:
    if src.suffix != ".gguf":
        raise ConversionError(f"{src}: expected a Hugging Face directory or a .gguf file")
    reader = _gguf_reader(src)
    hf_cfg = gguf_hf_config(reader)
    cfg = from_hf_config(hf_cfg, dtype or "float32")
    gguf_tokenizer_files(reader, tmp)
    params = build_params(cfg, gguf_tensors(reader, hf_cfg), progress)
    save_checkpoint(tmp, cfg, params, source=str(src))
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlaserve convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Hugging Face checkpoint directory or .gguf file")
    parser.add_argument("dst", help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="param dtype (default: the checkpoint's; float32 for GGUF)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.dtype)
    except ConversionError as e:
        print(f"xlaserve convert: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
