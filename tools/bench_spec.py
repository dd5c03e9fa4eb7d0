"""Speculative decoding: tokens/s and TTFT with and without it, on a workload whose answers
repeat the prompt (hits: copy a passage, edit code) and one whose answers do not (misses: a
story), with the acceptance rate.

    python tools/bench_spec.py [MODEL] [--quantize w8a8] [--k 4] [--repeat 3] [--streams 1] [--fixed 4 8]
    python tools/bench_spec.py --draft same --draft-quantize w8a8    # a draft model instead of ngram

One runner serves every mode in turn (the same compiled steps): plain, each --fixed draft
length, then the adaptive length up to --k; greedy, each prompt --repeat times; medians are
reported. With --streams N each prompt runs as N concurrent copies (the
rate is then all streams' tokens over the wall time): where speculation stops paying, which
--speculative-max-batch should be.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time

PASSAGE = ("The river rose slowly through the night, and by morning the low fields east of the village "
           "were under a foot of brown water. The farmers moved their animals to the churchyard, which "
           "stood on the only hill for miles, and the priest opened the doors of the church so that the "
           "old and the sick could sleep on the pews.")
CODE = '''def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total += (v - m) ** 2
    return total / len(values)
'''
WORKLOADS = {
    "hits": [f"Copy this text exactly, word for word:\n\n{PASSAGE}",
             f"Rename the variable `total` to `acc` in this code and return the whole code:\n\n{CODE}"],
    "misses": ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
               "Write a poem about the first snow of winter."],
}


async def one(engine, ids, params):
    t0 = time.perf_counter()
    first, n = None, 0
    async for out in engine.generate(ids, params):
        if out.token_ids and first is None:
            first = time.perf_counter()
        n += len(out.token_ids)
    end = time.perf_counter()
    return n, first - t0, (n - 1) / (end - first) if n > 1 else 0.0


async def many(engine, ids, params, streams):
    return await asyncio.gather(*[one(engine, ids, params) for _ in range(streams)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--quantize", choices=["int8", "w8a8"], default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--draft", default=None, help="a draft model (MODEL argument, or same) instead of ngram")
    ap.add_argument("--draft-quantize", choices=["int8", "w8a8"], default=None)
    ap.add_argument("--fixed", type=int, nargs="*", default=[], metavar="K",
                    help="also run with the draft length fixed at each K (no adapting), in the same sitting")
    args = ap.parse_args(argv)

    from model.chat_template import render
    from service.engine import Engine
    from service.engine.config import EngineConfig
    from service.models import build_draft, build_runner, resolve
    from service.params import SamplingParams

    checkpoint, name = resolve(args.model)
    # The server's own wiring and checks: the config builds the speculation and the draft model.
    config = EngineConfig(max_batch_size=args.streams, session_len=1024, quantize=args.quantize,
                          speculative_algorithm="draft" if args.draft else "ngram",
                          speculative_num_draft_tokens=args.k, speculative_max_batch=args.streams,
                          speculative_draft_model=args.draft, speculative_draft_quantize=args.draft_quantize)
    runner, tokenizer = build_runner(checkpoint, config)
    runner.warmup(verify_tokens=config.verify_tokens())
    draft = None
    if args.draft:
        draft = build_draft(config, checkpoint, runner)
        draft.runner.warmup()
    spec = config.speculation(draft)
    mode = spec.method
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    print(f"{name}, {args.quantize or runner.cfg.dtype}, {args.streams} stream(s), greedy, up to {args.max_tokens} tokens, "
          f"{spec.describe()}, {args.repeat} runs each")
    plain = {}
    modes = [("plain", None)] + [(f"K={k}", dataclasses.replace(spec, k=k, adaptive=False)) for k in args.fixed
                                 if k <= args.k] + [(f"{mode}<={args.k}", spec)]
    for mode, speculation in modes:
        engine = Engine(runner, tokenizer, speculation=speculation)
        engine.start()
        try:
            for workload, prompts in WORKLOADS.items():
                rates, ttfts, tokens = [], [], 0
                for text in prompts:
                    ids = tokenizer.encode(render(tokenizer.chat_template, [{"role": "user", "content": text}],
                                                  add_generation_prompt=True), add_special_tokens=False)
                    for _ in range(args.repeat):
                        t0 = time.perf_counter()
                        runs = asyncio.run(many(engine, ids, params, args.streams))
                        wall = time.perf_counter() - t0
                        n = sum(r[0] for r in runs)
                        rates.append(runs[0][2] if args.streams == 1 else n / wall)
                        ttfts.append(statistics.median(r[1] for r in runs))
                        tokens += n
                rate, ttft = statistics.median(rates), statistics.median(ttfts)
                st = engine.stats
                extra = ""
                if speculation is not None:
                    acc = st.spec_accepted / st.spec_drafted if st.spec_drafted else 0.0
                    extra = (f", drafts accepted {acc:.0%} ({st.spec_accepted}/{st.spec_drafted}), "
                             f"{(st.spec_accepted + st.spec_rows) / max(st.spec_rows, 1):.2f} tokens per verified step, "
                             f"{rate / plain[workload]:.2f}x plain")
                    st.spec_accepted = st.spec_drafted = st.spec_rows = 0
                else:
                    plain[workload] = rate
                what = "after the first" if args.streams == 1 else "all streams, over the wall time"
                print(f"{mode:9s} {workload:6s}: {rate:6.1f} tok/s {what}, TTFT {1000 * ttft:5.0f} ms "
                      f"(median of {len(rates)}){extra}", flush=True)
        finally:
            engine.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
