"""Speculative decoding: n-gram proposals and verify calls give exactly the tokens plain
decoding gives (greedy and seeded, alone and in mixed batches, on both device paths), with
proposals that are always right, always wrong, or the n-gram lookup's own."""

import asyncio
import dataclasses

import numpy as np
import pytest

from model.weights import init_params
from service.engine import Engine
from service.engine.runner import ModelRunner, compile_count
from service.engine.speculate import Speculation, propose_ngram
from service.params import SamplingParams
# The engine tests' tiny model and the real tokenizer (their module fixtures, shared).
from test_engine import tiny, tokenizer  # noqa: F401


def test_ngram_proposes_what_followed_the_longest_latest_match():
    #          0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7]
    # "6 7" occurs at 1 and 5: the latest (5) wins, and what followed it is 1 2 6 7.
    assert propose_ngram(tokens, 3) == [1, 2, 6]
    # The longest match beats the latest: "1 2 3" (n = 3) occurred at 0, followed by 9 2; the
    # later "2 3" at 4 (followed by 4 1) is only n = 2.
    assert propose_ngram([1, 2, 3, 9, 2, 3, 4, 1, 2, 3], 2) == [9, 2]
    assert propose_ngram([4, 5, 6], 2) == []  # no earlier occurrence of anything
    assert propose_ngram(tokens, 0) == []


_runners: dict = {}


def generate(tiny, tokenizer, jobs, speculation=None, backend=None):
    """Each job's (tokens, streamed texts, finish) with all jobs sent together, and the engine.
    Engines of one backend share a runner (compiled once; each engine places its own blocks
    and sampling rows)."""
    cfg, params = tiny
    key = (id(params), type(backend).__name__)
    if key not in _runners:
        _runners[key] = ModelRunner(cfg, params, max_batch_size=4, session_len=128, eos_ids=tokenizer.eos_ids,
                                    max_prefill_chunk=32, block_size=16, backend=backend)
    engine = Engine(_runners[key], tokenizer, speculation=speculation)

    async def one(ids, p):
        toks, text, finish = [], [], None
        async for out in engine.generate(ids, p):
            toks += out.token_ids
            text.append(out.text)
            finish = out.finish_reason or finish
        return toks, text, finish

    async def together():
        return await asyncio.gather(*[one(ids, p) for ids, p in jobs])

    engine.start()
    try:
        return asyncio.run(together()), engine
    finally:
        engine.stop()


GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, seed=11, max_tokens=30, ignore_eos=True)


def prompt(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(100, 30000, n)]


def oracle_for(reference, jobs):
    """A proposer that knows each job's plain output: always right."""
    full = [list(ids) + toks for (ids, _), (toks, _, _) in zip(jobs, reference)]

    def propose(tokens, k):
        for f in full:
            if f[:len(tokens)] == tokens and len(f) > len(tokens):
                return f[len(tokens):len(tokens) + k]
        return []

    return propose


def always_wrong(tokens, k):
    return [(tokens[-1] + 13 * (i + 1)) % 30000 for i in range(k)]


@pytest.mark.parametrize("backend", ["default", "xla"])
def test_speculation_never_changes_tokens(tiny, tokenizer, backend):
    """Greedy and seeded requests in one batch give plain decoding's tokens with n-gram
    proposals, with proposals that are always accepted (the continuation itself) and with
    proposals that are always rejected; each alone gives them too."""
    from model.backends.xla import Xla

    make = (lambda: Xla()) if backend == "xla" else (lambda: None)
    base = prompt(9, 1)
    jobs = [(base + base[:5], GREEDY), (prompt(5, 2), SEEDED), (base, dataclasses.replace(SEEDED, seed=3)),
            (prompt(12, 4), dataclasses.replace(GREEDY, max_tokens=7))]
    plain, _ = generate(tiny, tokenizer, jobs, backend=make())
    for name, propose in (("ngram", None), ("right", oracle_for(plain, jobs)), ("wrong", always_wrong)):
        got, engine = generate(tiny, tokenizer, jobs, Speculation(k=4, propose=propose), backend=make())
        assert [g[0] for g in got] == [p[0] for p in plain], name
        assert [g[2] for g in got] == [p[2] for p in plain], name
        st = engine.stats
        if name == "right":
            assert st.spec_accepted == st.spec_drafted > 0
            assert st.spec_rows < st.generation_tokens - len(jobs)  # several tokens per verified row
        if name == "wrong":
            assert st.spec_drafted > 0 and st.spec_accepted == 0
    alone, _ = generate(tiny, tokenizer, jobs[1:2], Speculation(k=3, propose=oracle_for(plain[1:2], jobs[1:2])),
                        backend=make())
    assert alone[0][0] == plain[1][0]


def test_a_stop_string_inside_an_accepted_draft_ends_the_output_there(tiny, tokenizer):
    """The stop string falls in the middle of what one verify call accepts: the text ends
    before it, as without speculation, and no streamed piece carries anything after it."""
    plain, _ = generate(tiny, tokenizer, [(prompt(6, 7), GREEDY)])
    text = "".join(plain[0][1])
    stop = text[len(text) // 2:len(text) // 2 + 3]
    jobs = [(prompt(6, 7), dataclasses.replace(GREEDY, stop=(stop,)))]
    want, _ = generate(tiny, tokenizer, jobs)
    got, engine = generate(tiny, tokenizer, jobs, Speculation(k=8, propose=oracle_for(plain, jobs)))
    assert "".join(got[0][1]) == "".join(want[0][1]) == text[:text.index(stop)]
    assert got[0][2] == want[0][2] == "stop"
    assert engine.stats.spec_accepted > 0


def test_speculation_metrics_count_drafted_and_accepted_tokens(tiny, tokenizer):
    jobs = [(prompt(6, 8), GREEDY)]
    plain, _ = generate(tiny, tokenizer, jobs)
    _, engine = generate(tiny, tokenizer, jobs, Speculation(k=4, propose=oracle_for(plain, jobs)))
    m, st = engine.metrics, engine.stats
    assert m.spec_drafted._value.get() == st.spec_drafted > 0
    assert m.spec_accepted._value.get() == st.spec_accepted == st.spec_drafted
    assert m.spec_rows._value.get() == st.spec_rows
    # Every verified row advanced its accepted drafts + 1: 30 tokens, the first from the prompt.
    assert m.spec_length._value.get() == pytest.approx((st.spec_accepted + st.spec_rows) / st.spec_rows)
    assert st.spec_accepted + st.spec_rows == 29


def test_requests_that_opt_out_or_have_penalties_are_not_speculated(tiny, tokenizer):
    jobs = [(prompt(6, 9), dataclasses.replace(GREEDY, speculative=False)),
            (prompt(6, 10), dataclasses.replace(GREEDY, repetition_penalty=1.3))]
    plain, _ = generate(tiny, tokenizer, jobs)
    got, engine = generate(tiny, tokenizer, jobs, Speculation(k=4, propose=always_wrong))
    assert [g[0] for g in got] == [p[0] for p in plain]
    assert engine.stats.spec_rows == 0


def test_steps_above_the_batch_threshold_do_not_speculate(tiny, tokenizer):
    """With a threshold of 2, no verify call is planned while more than 2 rows decode (they
    decode as usual), and the tokens are plain decoding's."""
    jobs = [(prompt(6, 20 + i), dataclasses.replace(GREEDY, max_tokens=8 + 6 * i)) for i in range(4)]
    plain, _ = generate(tiny, tokenizer, jobs)
    sizes = []
    spec = Speculation(k=4, max_batch=2, propose=always_wrong)
    from service.engine.scheduler import Scheduler

    plan_verify = Scheduler._plan_verify

    def watched(self, live):
        sizes.append(len(live))
        return plan_verify(self, live)

    Scheduler._plan_verify = watched
    try:
        got, engine = generate(tiny, tokenizer, jobs, spec)
    finally:
        Scheduler._plan_verify = plan_verify
    assert [g[0] for g in got] == [p[0] for p in plain]
    assert sizes and max(sizes) <= 2  # rows speculated once two of the four had finished
    assert engine.stats.decode_steps > 0 and engine.stats.spec_rows > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_no_compiles_after_warm_up_with_speculation(tiny, tokenizer, method):
    from service.engine.draft import DraftModel

    cfg, params = tiny
    runner = ModelRunner(cfg, params, max_batch_size=2, session_len=128, eos_ids=tokenizer.eos_ids,
                         max_prefill_chunk=32, block_size=16)
    if method == "draft":
        draft = ModelRunner(cfg, init_params(cfg, seed=9, scale=0.5), max_batch_size=2, session_len=128,
                            eos_ids=tokenizer.eos_ids, max_prefill_chunk=32, block_size=16)
        draft.warmup()
        spec = Speculation("draft", k=4, max_batch=2, draft=DraftModel(draft, "random"))
    else:
        spec = Speculation(k=4, max_batch=2, propose=always_wrong)
    runner.warmup(verify_tokens=2 * (spec.k + 1))
    engine = Engine(runner, tokenizer, speculation=spec)
    before = compile_count()

    async def go():
        async def one(ids):
            return [t async for out in engine.generate(ids, GREEDY) for t in out.token_ids]
        return await asyncio.gather(one(prompt(6, 30)), one(prompt(20, 31)))

    engine.start()
    try:
        asyncio.run(go())
    finally:
        engine.stop()
    assert engine.stats.spec_rows > 0
    assert compile_count() == before


def test_bad_speculation_settings_are_refused():
    with pytest.raises(ValueError, match="num-draft-tokens"):
        Speculation(k=0)
    with pytest.raises(ValueError, match="ngram or draft"):
        Speculation(method="eagle")
    with pytest.raises(ValueError, match="needs --speculative-draft-model"):
        Speculation(method="draft")


# -- Predicted Outputs -------------------------------------------------------------------------


def test_a_prediction_is_checked_as_drafts_without_changing_the_answer(tiny, tokenizer):
    """With no speculation configured, a request's prediction alone proposes drafts: the answer
    is plain decoding's, all of a right prediction is accepted, none of a wrong one."""
    from service.engine.speculate import propose_from_prediction

    assert propose_from_prediction([7, 8], (1, 7, 8, 9, 10, 7, 8, 11), 2) == [9, 10]  # nearest the output's length
    jobs = [(prompt(6, 40), GREEDY)]
    plain, _ = generate(tiny, tokenizer, jobs)
    right = tuple(plain[0][0])
    # Wrong after its first token: that token aligns it, so what follows is proposed, and rejected.
    wrong = right[:1] + tuple((t + 5) % 30000 for t in right[1:])
    for prediction, accepted in ((right, True), (wrong, False)):
        job = [(jobs[0][0], dataclasses.replace(GREEDY, prediction=prediction))]
        got, engine = generate(tiny, tokenizer, job)
        assert got[0][0] == plain[0][0]
        st = engine.stats
        assert st.spec_drafted > 0
        assert (st.spec_accepted == st.spec_drafted) if accepted else (st.spec_accepted == 0)


def test_chat_prediction_over_http_reports_accepted_and_rejected_tokens(default_checkpoint):
    from litestar.testing import TestClient

    from conftest import tiny_engine
    from service.app import ServerSettings, State, create_app

    engine = tiny_engine(default_checkpoint, slots=2)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    try:
        with TestClient(create_app(State(ServerSettings(model_name="tiny"), engine))) as c:
            plain = c.post("/v1/chat/completions", json=body).json()
            assert "completion_tokens_details" not in plain["usage"]
            text = plain["choices"][0]["message"]["content"]
            for prediction in (text, [{"type": "text", "text": text}]):
                r = c.post("/v1/chat/completions", json={**body, "prediction": {"type": "content", "content": prediction}})
                assert r.status_code == 200, r.text
                out = r.json()
                assert out["choices"][0]["message"]["content"] == text
                details = out["usage"]["completion_tokens_details"]
                assert details["accepted_prediction_tokens"] > 0
            r = c.post("/v1/chat/completions", json={**body, "prediction": {"type": "file", "content": "x"}})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prediction"
    finally:
        engine.stop()


# -- a draft model -----------------------------------------------------------------------------


def draft_for(tiny, tokenizer, params=None, backend=None):
    from service.engine.draft import DraftModel

    cfg, target_params = tiny
    runner = ModelRunner(cfg, params if params is not None else target_params, max_batch_size=4, session_len=128,
                         eos_ids=tokenizer.eos_ids, max_prefill_chunk=32, block_size=16, backend=backend)
    return DraftModel(runner, "test")


@pytest.mark.parametrize("backend", ["default", "xla"])
def test_a_draft_model_never_changes_tokens(tiny, tokenizer, backend):
    """The target as its own draft (every greedy draft accepted), and a random draft model (its
    drafts all but never accepted): greedy and seeded tokens in one batch are plain decoding's."""
    from model.backends.xla import Xla

    make = (lambda: Xla()) if backend == "xla" else (lambda: None)
    cfg, _ = tiny
    base = prompt(9, 50)
    jobs = [(base + base[:4], GREEDY), (prompt(7, 51), SEEDED), (prompt(40, 52), dataclasses.replace(GREEDY, max_tokens=9))]
    plain, _ = generate(tiny, tokenizer, jobs, backend=make())
    same = draft_for(tiny, tokenizer, backend=make())
    got, engine = generate(tiny, tokenizer, jobs, Speculation("draft", k=4, draft=same), backend=make())
    assert [g[0] for g in got] == [p[0] for p in plain]
    st = engine.stats
    assert st.spec_drafted > 0 and st.spec_rows < st.generation_tokens - len(jobs)
    greedy_only, _ = generate(tiny, tokenizer, jobs[:1] + jobs[2:], Speculation("draft", k=4, draft=same),
                              backend=make())
    assert [g[0] for g in greedy_only] == [plain[0][0], plain[2][0]]
    other = draft_for(tiny, tokenizer, init_params(cfg, seed=9, scale=0.5), backend=make())
    got, engine = generate(tiny, tokenizer, jobs, Speculation("draft", k=4, draft=other), backend=make())
    assert [g[0] for g in got] == [p[0] for p in plain]
    assert engine.stats.spec_drafted > 0 and engine.stats.spec_accepted <= engine.stats.spec_drafted // 10


def test_the_target_as_its_own_draft_has_every_greedy_draft_accepted(tiny, tokenizer):
    jobs = [(prompt(11, 53), GREEDY)]
    _, engine = generate(tiny, tokenizer, jobs, Speculation("draft", k=4, draft=draft_for(tiny, tokenizer)))
    assert engine.stats.spec_accepted == engine.stats.spec_drafted > 0


def test_cli_draft_settings_that_cannot_serve_are_one_line_errors(default_checkpoint, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    cases = ((["--speculative-algorithm", "draft"], "--speculative-algorithm draft and --speculative-draft-model go together"),
             (["--speculative-algorithm", "draft", "--speculative-draft-model", str(tmp_path / "none")],
              "no such file or directory"))
    for extra, message in cases:
        p = subprocess.run([sys.executable, "-m", "service.cli", "generate", "--prompt", "x", *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("xlaserve: error: ") and message in last, last
        assert "Traceback" not in p.stderr


def test_joins_and_leaves_with_speculation_equal_one_at_a_time(tiny, tokenizer):
    """The engine's batch-invariance check with speculation on: requests arriving one after
    another into fewer slots than requests (some wait, rows join and leave verify calls) give
    the tokens each gives alone without speculation."""
    reqs = [(prompt(5, 61), 20), (prompt(40, 62), 6), (prompt(17, 63), 30), (prompt(3, 64), 12), (prompt(9, 65), 8)]
    greedy = lambda n: dataclasses.replace(GREEDY, max_tokens=n)  # noqa: E731
    solo = [generate(tiny, tokenizer, [(ids, greedy(n))])[0][0][0] for ids, n in reqs]
    cfg, params = tiny
    runner = _runners[(id(params), "NoneType")]
    jobs = [(ids, greedy(n)) for ids, n in reqs]
    half_right = oracle_for([(t, None, None) for t in solo], jobs)

    def propose(tokens, k):  # right for some rows, wrong for the others
        return half_right(tokens, k) if len(tokens) % 2 else always_wrong(tokens, k)

    engine = Engine(runner, tokenizer, speculation=Speculation(k=4, propose=propose))

    async def staggered():
        async def one(ids, p):
            return [t async for out in engine.generate(ids, p) for t in out.token_ids]
        tasks = []
        for ids, p in jobs:
            tasks.append(asyncio.create_task(one(ids, p)))
            await asyncio.sleep(0.05)
        return [await t for t in tasks]

    engine.start()
    try:
        assert asyncio.run(staggered()) == solo
    finally:
        engine.stop()
    assert engine.stats.spec_accepted > 0 and engine.stats.spec_drafted > engine.stats.spec_accepted


def test_draft_length_grows_while_accepted_and_shrinks_while_rejected():
    """``adapt``: all accepted doubles the next limit (up to K), all rejected halves it (down
    to 1), a partial run keeps it."""
    from service.engine import Request, Sequence
    from service.engine.speculate import adapt

    spec = Speculation(k=8)
    seq = Sequence(Request("r", [1, 2, 3], GREEDY, lambda out: None), seq=[1, 2, 3])
    seq.max_tokens = 1000
    assert spec.limit(seq, 100) == 8  # the start: K
    assert spec.limit(seq, 5) == 5  # capped by the room left
    adapt(seq, 8, 0)
    assert spec.limit(seq, 100) == 4
    adapt(seq, 4, 2)
    assert spec.limit(seq, 100) == 4
    for _ in range(4):
        adapt(seq, spec.limit(seq, 100), 0)
    assert spec.limit(seq, 100) == 1
    adapt(seq, 1, 1)
    adapt(seq, 2, 2)
    assert spec.limit(seq, 100) == 4
    adapt(seq, 2, 2)  # a proposer's short run, all accepted, does not shrink it
    assert spec.limit(seq, 100) == 4
    adapt(seq, 4, 4)
    adapt(seq, 8, 8)
    assert spec.limit(seq, 100) == 8  # K caps the growth
    seq.draft_len = 1
    assert dataclasses.replace(spec, adaptive=False).limit(seq, 100) == 8


def test_adaptive_drafts_check_fewer_tokens_that_fail(tiny, tokenizer):
    """In an engine: always-wrong drafts are checked one at a time once they have failed, far
    fewer than at a fixed K; right ones keep K; the tokens are plain decoding's either way."""
    jobs = [(prompt(6, 21), dataclasses.replace(GREEDY, max_tokens=60))]
    plain, _ = generate(tiny, tokenizer, jobs)
    got, engine = generate(tiny, tokenizer, jobs, Speculation(k=8, propose=oracle_for(plain, jobs)))
    st = engine.stats
    assert got[0][0] == plain[0][0] and (st.spec_accepted + st.spec_rows) / st.spec_rows > 5
    got, adaptive = generate(tiny, tokenizer, jobs, Speculation(k=8, propose=always_wrong))
    _, fixed = generate(tiny, tokenizer, jobs, Speculation(k=8, propose=always_wrong, adaptive=False))
    assert got[0][0] == plain[0][0]
    assert 0 < adaptive.stats.spec_drafted * 4 < fixed.stats.spec_drafted
