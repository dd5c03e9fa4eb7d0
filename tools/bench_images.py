"""Image input's cost on a Gemma-3-shaped random model, against the same text-only workload, in
one sitting.

    python tools/bench_images.py [--vision-layers 2] [--streams 16] [--repeat 3]

The model: Gemma 3's vision tower at its real width (SigLIP 1152 wide, 16 heads, 896-pixel
images in 14-pixel patches, 256 tokens an image) with ``--vision-layers`` of its 27 layers, and a
small Gemma 3 language model (640 wide, 8 layers, sliding and global). Random weights, made with
transformers and converted as a user's checkpoint would be (transformers is a test dependency).

Reports, medians of ``--repeat``:
- the encoder alone: one image, and a batch of 8 (per image), with the per-layer time so the
  27-layer tower's cost can be read off;
- TTFT of one 448x448 image prompt (the image new to the encoder cache) against a text-only
  prompt of the same length, and of the same image again behind other text (encoder cache hit);
- N concurrent chats, each with its own image, against N text-only chats of the same lengths:
  output tokens/s and TTFT median;
- Pillow's preprocessing of a 448x448 image (host time, before the engine sees it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB, BOI, EOI, IMAGE = 4096, 4093, 4094, 4095


def make_checkpoint(root: Path, vision_layers: int) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    text = dict(vocab_size=VOCAB, hidden_size=640, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                sliding_window=512, sliding_window_pattern=6, max_position_embeddings=8192)
    cfg = transformers.Gemma3Config(
        text_config=text, vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers,
                                             num_attention_heads=16, image_size=896, patch_size=14),
        mm_tokens_per_image=256, image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    src = root / "hf"
    model.save_pretrained(src)
    vocab = {f"w{i}": i for i in range(BOI)}
    vocab.update({"<start_of_image>": BOI, "<end_of_image>": EOI, "<image_soft_token>": IMAGE})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}))
    from model.convert import convert

    return convert(src, root / "converted", progress=False)


def engine_for(converted: Path, streams: int):
    from service.engine.config import EngineConfig
    from service.models import build_engine

    config = EngineConfig(max_batch_size=streams, session_len=1024, max_prefill_chunk=512,
                          speculative_algorithm="none")
    return build_engine(converted, config)


async def one(engine, ids, images, max_tokens):
    from service.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    ttft, n = None, 0
    async for out in engine.generate(ids, params, images=images):
        if out.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        n += len(out.token_ids)
    return ttft, n, time.perf_counter() - t0


def prompt(rng, before: int, image: bool, after: int = 24) -> list[int]:
    """Words, then (an image's 258 tokens, or as many words), then words."""
    words = lambda k: [int(x) for x in rng.integers(3, BOI, k)]  # noqa: E731
    middle = [BOI] + [IMAGE] * 256 + [EOI] if image else words(258)
    return [1] + words(before) + middle + words(after)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32, help="output tokens a chat")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from PIL import Image

    from model import vision
    from model.checkpoint import load_vision
    from service.engine.images import image_of

    root = Path(tempfile.mkdtemp(prefix="bench-images-"))
    converted = make_checkpoint(root, args.vision_layers)
    engine = engine_for(converted, args.streams)
    pre = vision.Preprocessor.of(converted, load_vision(converted))
    rng = np.random.default_rng(0)
    seeds = iter(range(10**6))

    def picture():
        return Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))

    med = statistics.median
    report: dict[str, float] = {}
    try:
        pic = picture()
        t = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            pixels = pre(pic)
            t.append(time.perf_counter() - t0)
        report["preprocess_448_ms"] = med(t) * 1e3
        for b in (1, 8):
            t = []
            for _ in range(args.repeat):
                batch = [pre(picture()) for _ in range(b)]
                t0 = time.perf_counter()
                engine.runner.encode_images(batch)
                t.append((time.perf_counter() - t0) / b)
            report[f"encoder_ms_per_image_batch{b}"] = med(t) * 1e3
        report["encoder_ms_per_layer"] = report["encoder_ms_per_image_batch1"] / args.vision_layers

        async def ttfts():
            new, text, cached = [], [], []
            for _ in range(args.repeat):
                r = np.random.default_rng(next(seeds))
                im = image_of(pre(picture()))
                new.append((await one(engine, prompt(r, 40, True), [im], 1))[0])
                text.append((await one(engine, prompt(r, 40, False), [], 1))[0])
                cached.append((await one(engine, prompt(r, 41, True), [im], 1))[0])  # other text before it
            return med(new), med(text), med(cached)

        new, text, cached = asyncio.run(ttfts())
        report.update(ttft_image_ms=new * 1e3, ttft_text_ms=text * 1e3, ttft_image_cached_encoder_ms=cached * 1e3,
                      ttft_image_over_text=new / text, ttft_cached_over_text=cached / text)

        async def concurrent(image: bool):
            r = np.random.default_rng(next(seeds))
            jobs = [(prompt(r, 40 + i, image), [image_of(pre(picture()))] if image else []) for i in range(args.streams)]
            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(engine, ids, ims, args.tokens) for ids, ims in jobs))
            wall = time.perf_counter() - t0
            return sum(n for _, n, _ in res) / wall, med(t for t, _, _ in res)

        runs = {True: [], False: []}
        for _ in range(args.repeat):
            for image in (True, False):  # alternating, so drift hits both alike
                runs[image].append(asyncio.run(concurrent(image)))
        for image, name in ((True, "image"), (False, "text")):
            tps = [x[0] for x in runs[image]]
            pick = runs[image][tps.index(med(tps))] if args.repeat % 2 else (med(tps), med(x[1] for x in runs[image]))
            report[f"{args.streams}_streams_{name}_tok_s"] = pick[0]
            report[f"{args.streams}_streams_{name}_ttft_ms"] = pick[1] * 1e3
        report["streams_image_over_text_tok_s"] = (report[f"{args.streams}_streams_image_tok_s"]
                                                   / report[f"{args.streams}_streams_text_tok_s"])
        report["images_encoded"] = engine.encoder_cache.encoded
    finally:
        engine.stop()
    for k, v in report.items():
        print(f"{k:40s} {v:10.2f}")


if __name__ == "__main__":
    main()
