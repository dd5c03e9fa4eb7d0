"""The scheduler's plans as plain data, without a device: packing, riders, cuts, copies."""

from service.engine.plan import Chunk, Copy, Decode, Prefill
from service.engine.request import Request, Sequence
from service.engine.scheduler import Scheduler
from service.engine.slots import SlotTable
from service.sampling import SamplingParams


def setup(slots=4, max_chunk=64, per_call=lambda n: max(1, n // 4)):
    table = SlotTable(slots)
    return table, Scheduler(table, max_chunk, session_len=256, prompts_per_call=per_call)


def admit(table, ids, arrival, generated=()):
    seq = Sequence(Request(f"r{arrival}", list(ids), SamplingParams(), lambda o: None, arrival=arrival),
                   seq=list(ids))
    slot, reuse = table.choose(seq)
    table.place(seq, slot, reuse)
    if generated:  # already prefilled and decoding
        seq.prefilled = len(seq.seq)
        seq.generated = list(generated)
    return seq


def test_prompts_arriving_together_share_one_call_with_the_decode_rows_riding():
    table, sched = setup()
    running = admit(table, range(100, 110), 0, generated=[7, 8])
    a, b = admit(table, range(10), 1), admit(table, range(20, 32), 2)
    plan = sched.schedule()
    assert plan.decode is None  # the decode row rode along
    (call,) = plan.ops
    assert isinstance(call, Prefill)
    assert [(c.slot, c.tokens, c.start, c.last, c.step) for c in call.chunks] == [
        (a.slot, tuple(range(10)), 0, True, 0), (b.slot, tuple(range(20, 32)), 0, True, 0),
        (running.slot, (8,), 11, True, 2)]
    assert call.riders == 1
    assert (a.prefilled, b.prefilled) == (10, 12)  # the plan's bookkeeping


def test_a_long_prompt_is_cut_and_leaves_room_for_the_decode_rows():
    table, sched = setup(max_chunk=64)
    decoding = [admit(table, [200 + i] * 3, i, generated=[1]) for i in range(2)]
    long = admit(table, range(1000, 1150), 5)
    plan = sched.schedule()
    (call,) = plan.ops
    assert [len(c.tokens) for c in call.chunks] == [62, 1, 1]  # 64 - 2 reserved
    assert not call.chunks[0].last and long.prefilled == 62
    assert [c.owner for c in call.chunks[1:]] == decoding


def test_a_prompt_sharing_a_prefix_copies_it_in_the_next_call():
    table, sched = setup(max_chunk=64)
    first = admit(table, range(30), 0)
    second = admit(table, list(range(30)) + [99, 98], 1)
    plan = sched.schedule()
    ops = list(plan.ops)
    # The second waits for the first's KV, then copies all 30 of its tokens and prefills its own.
    assert isinstance(ops[0], Prefill) and [c.owner for c in ops[0].chunks] == [first]
    assert ops[1] == Copy(first.slot, second.slot)
    assert isinstance(ops[2], Prefill) and ops[2].chunks[0] == Chunk(second.slot, (99, 98), 30, True)
    assert second.cached == 30
    # A prompt that is all prefix still computes its last token: its logits pick the first one.
    table, sched = setup(max_chunk=64)
    first = admit(table, range(30), 0)
    sched.schedule()
    same = admit(table, range(30), 1)
    plan = sched.schedule()
    assert plan.ops[0] == Copy(first.slot, same.slot) and plan.ops[1].chunks[0].tokens == (29,)


def test_an_unchanged_batch_chains_on_the_step_in_flight():
    table, sched = setup()
    live = [admit(table, [5] * 4, i, generated=[3]) for i in range(3)]
    assert sched.chains_on(live)
    plan = sched.schedule(live)
    assert plan.ops == () and plan.decode.chained
    assert plan.decode == Decode((0, 1, 2), None, (5, 5, 5), (2, 2, 2))
    admit(table, [9] * 4, 9)  # a waiting prompt: the step in flight is read first
    assert not sched.chains_on(live)
    assert not sched.chains_on(live[:2])


def test_one_prompt_per_call_where_the_backend_takes_one():
    table, sched = setup(per_call=lambda n: 1)
    decoding = admit(table, [4] * 3, 0, generated=[1])
    a, b = admit(table, range(5), 1), admit(table, range(50, 55), 2)
    plan = sched.schedule()
    calls = plan.prefills
    assert [[c.owner for c in call.chunks] for call in calls] == [[a], [b]]
    assert plan.decode.owners == (decoding,)  # no room to ride: a decode step of its own
