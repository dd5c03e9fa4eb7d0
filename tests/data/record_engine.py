"""Record the engine's greedy and seeded tokens for a mixed workload on the bundled model, so
later changes to the engine's internals (the KV layout, the scheduler) can be checked against
what it gave before them (tests/test_paged.py replays the same workload).

    python tests/data/record_engine.py tests/data/engine_recorded.json

Run once with the native kernels and once with XLASERVE_CPU_KERNELS=0: each path's entry is
kept under its backend's name.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SYSTEM = ("<|im_start|>system\nYou are a careful assistant. Answer in one short paragraph, plainly, "
          "without lists. If you do not know, say so.<|im_end|>\n")


def user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [
    SYSTEM + user("What is the capital of France?"),
    SYSTEM + user("Name three colours of the rainbow."),
    user("Write a haiku about the sea."),
    SYSTEM + user("What is the capital of France?"),  # the same prompt again: a full prefix hit
    user("Count from one to ten."),
    SYSTEM + user("Why is the sky blue? Explain it to a child who has just asked."),
]
MAX_TOKENS = [24, 16, 20, 24, 30, 28]
SESSION_TURNS = ["Hello! Who are you?", "Tell me one fact about the moon.", "And one about the sun."]


def workload():
    """[(prompt text, SamplingParams kwargs)] for the batch part: each prompt greedy, then
    seeded."""
    out = []
    for i, (text, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        out.append((text, dict(temperature=0.0, max_tokens=n, ignore_eos=True)))
        out.append((text, dict(temperature=0.9, top_p=0.95, seed=1000 + i, max_tokens=n, ignore_eos=True)))
    return out


async def run_workload(engine, tokenizer):
    from service.params import SamplingParams

    async def one(text, kw):
        toks = []
        async for out in engine.generate(tokenizer.encode(text), SamplingParams(**kw)):
            toks += out.token_ids
        return toks

    batch = await asyncio.gather(*(one(text, kw) for text, kw in workload()))
    session = []
    for turn in SESSION_TURNS:
        toks = []
        async for out in engine.generate(tokenizer.encode(user(turn)), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                                         session_id=7):
            toks += out.token_ids
        session.append(toks)
    engine.end_session(7)
    return {"batch": batch, "session": session}


def main(path: str) -> None:
    from service.engine.config import EngineConfig
    from service.models import build_engine, resolve

    checkpoint, _ = resolve(None)
    engine = build_engine(checkpoint, EngineConfig(max_batch_size=4, session_len=512), warmup=False)
    try:
        result = asyncio.run(run_workload(engine, engine.tokenizer))
    finally:
        engine.stop()
    name = engine.runner.backend.name
    data = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    data[name] = result
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    print(f"recorded {name} in {path}")


if __name__ == "__main__":
    main(sys.argv[1])
