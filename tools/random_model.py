"""A Hugging Face directory of random weights at a realistic small size, for benchmarks of
families the bundled model does not cover (needs transformers and torch, the test extras):

    python tools/random_model.py qwen3 /tmp/qwen3-173m
    python tools/random_model.py qwen3_moe /tmp/qwen3-moe
    python tools/bench_engine.py /tmp/qwen3-moe --streams 1 16

The shapes share SmolLM2's vocabulary (its tokenizer files are copied in) and one attention
shape, so a dense and an MoE model compare at the same active parameters per token:

- qwen3: hidden 768, 16 layers, 12 query heads of 128 over 4 KV heads, q/k norms, MLP 2304,
  tied 49152 vocab: 173M parameters.
- qwen3_moe: the same with 8 experts of hidden 1152 in every layer, 2 per token (renormalised),
  so a token's MLP has the dense model's 2 x 1152 = 2304 hidden units: 173M active, 428M in all.
- gemma3: the qwen3 attention and MLP sizes with Gemma 3's layers (5 sliding of 512 to one global).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ATTENTION = dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
                 head_dim=128, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True,
                 rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
SHAPES = {
    "qwen3": ("Qwen3Config", dict(intermediate_size=2304)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=2304, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=1152, norm_topk_prob=True, decoder_sparse_step=1,
                                         mlp_only_layers=[])),
    "gemma3": ("Gemma3TextConfig", dict(intermediate_size=2304, sliding_window=512, query_pre_attn_scalar=128)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import transformers

    from model.convert.build import TOKENIZER_FILES
    from service.models import resolve

    name, extra = SHAPES[args.shape]
    cfg = getattr(transformers, name)(**ATTENTION, **extra)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(args.out)
    bundled, _ = resolve(None)  # the bundled model, converted: its tokenizer files
    for f in TOKENIZER_FILES:
        if (bundled / f).exists() and f != "generation_config.json":
            shutil.copy(bundled / f, args.out / f)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {name}, {total / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
