"""The scheduler's plans as plain data, without a device: packing, riders, cuts, prefix blocks
shared by reference, preemption when the pool runs dry, and the recompute that follows."""

import numpy as np

from service.engine.blocks import BlockManager
from service.engine.plan import Chunk, Decode, Prefill
from service.engine.request import Request, Sequence
from service.engine.scheduler import Scheduler
from service.engine.slots import SlotTable
from service.params import SamplingParams


def setup(slots=4, max_chunk=64, per_call=lambda n, reach=0: max(1, n // 4), blocks=64, block_size=16):
    table = SlotTable(slots, BlockManager(blocks, block_size, slots, 256 // block_size))
    return table, Scheduler(table, max_chunk, max_length=256, prompts_per_call=per_call)


def admit(table, ids, arrival, generated=()):
    seq = Sequence(Request(f"r{arrival}", list(ids), SamplingParams(), lambda o: None, arrival=arrival),
                   seq=list(ids))
    table.place(seq, table.choose(seq))
    if generated:  # already prefilled and decoding: KV of all but its last sampled token
        seq.generated = list(generated)
        seq.prefilled = seq.target
        assert table.blocks.allocate(seq.slot, seq.prefilled)
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
    assert (a.prefilled, b.prefilled, running.prefilled) == (10, 12, 12)  # the plan's bookkeeping
    # Each got the blocks its positions need, and the plan carries the tables as they are now.
    assert [len(table.blocks.held[s.slot].blocks) for s in (a, b, running)] == [1, 1, 1]
    assert (plan.tables[0] == table.blocks.tables).all() and plan.tables.base is not table.blocks.tables


def test_a_long_prompt_is_cut_and_leaves_room_for_the_decode_rows():
    table, sched = setup(max_chunk=64)
    decoding = [admit(table, [200 + i] * 3, i, generated=[1]) for i in range(2)]
    long = admit(table, range(1000, 1150), 5)
    plan = sched.schedule()
    (call,) = plan.ops
    assert [len(c.tokens) for c in call.chunks] == [62, 1, 1]  # 64 - 2 reserved
    assert not call.chunks[0].last and long.prefilled == 62
    assert [c.owner for c in call.chunks[1:]] == decoding


def test_a_shared_prefix_is_taken_by_reference_in_the_same_call():
    table, sched = setup(max_chunk=64, block_size=4)
    first = admit(table, range(30), 0)
    second = admit(table, list(range(30)) + [99, 98], 1)
    (call,) = sched.schedule().ops
    # The first's chunk registers its 7 full blocks as it is planned; the second takes them
    # and computes only its own tokens, in the same call (every chunk's KV is written before
    # any chunk attends).
    assert call.chunks[0] == Chunk(slot=first.slot, tokens=tuple(range(30)), start=0, last=True)
    assert call.chunks[1] == Chunk(slot=second.slot, tokens=(28, 29, 99, 98), start=28, last=True)
    assert second.cached == 28
    t = table.blocks.tables
    assert (t[second.slot, :7] == t[first.slot, :7]).all() and t[second.slot, 7] != t[first.slot, 7]
    # A prompt that is all prefix still computes its last token: its logits pick the first one.
    same = admit(table, range(30), 2)
    assert same.cached == 28
    (call,) = sched.schedule().ops
    assert [c.tokens for c in call.chunks if c.owner is same] == [(28, 29)]


def test_a_long_shared_prefix_is_computed_once():
    table, sched = setup(max_chunk=64, block_size=4)
    system = list(range(500, 600))  # 100 tokens: two chunks of the first prompt
    first = admit(table, system + [1], 0)
    second = admit(table, system + [2, 3], 1)
    (call,) = sched.schedule().ops
    assert [c.owner for c in call.chunks] == [first] and first.prefilled == 64
    (call,) = sched.schedule().ops
    assert [(c.owner, c.start, len(c.tokens)) for c in call.chunks] == [(first, 64, 37), (second, 100, 2)]
    assert second.cached == 100
    assert table.blocks.used_blocks() == 26 + 1  # 25 shared full blocks, each one's partial last block


def test_an_unchanged_batch_chains_on_the_step_in_flight():
    table, sched = setup()
    live = [admit(table, [5] * 4, i, generated=[3]) for i in range(3)]
    for s in live:  # as if the step in flight decoded them
        s.prefilled += 1
    assert sched.chains_on(live)
    plan = sched.schedule(live)
    assert plan.ops == () and plan.decode.chained
    assert plan.decode == Decode((0, 1, 2), None, (5, 5, 5), (2, 2, 2))
    admit(table, [9] * 4, 9)  # a waiting prompt: the step in flight is read first
    assert not sched.chains_on(live)
    assert not sched.chains_on(live[:2])


def test_no_chaining_when_a_row_would_need_a_block_the_pool_lacks():
    table, sched = setup(blocks=2, block_size=16)
    live = [admit(table, [5] * 15, i, generated=[3]) for i in range(2)]
    for s in live:
        s.prefilled += 1  # position 15 written: the next write (16) needs a second block each
    assert not sched.chains_on(live)


def test_one_prompt_per_call_where_the_backend_takes_one():
    table, sched = setup(per_call=lambda n, reach=0: 1)
    decoding = admit(table, [4] * 3, 0, generated=[1])
    a, b = admit(table, range(5), 1), admit(table, range(50, 55), 2)
    plan = sched.schedule()
    calls = plan.ops
    assert [[c.owner for c in call.chunks] for call in calls] == [[a], [b]]
    assert plan.decode.owners == (decoding,)  # no room to ride: a decode step of its own


def test_a_dry_pool_preempts_the_most_recently_admitted_sequence():
    table, sched = setup(blocks=6, block_size=4, per_call=lambda n, reach=0: 1)
    a = admit(table, range(8), 0, generated=[1, 2])  # positions 0..8 computed: 3 blocks
    b = admit(table, range(10, 17), 1, generated=[5])  # 0..6: 2 blocks
    c = admit(table, range(30, 34), 2)  # a prompt: 1 block, the last one
    plan = sched.schedule()
    assert table.blocks.used_blocks() == 6 and plan.decode.owners == (a, b)
    for s, tok in ((a, 3), (b, 6), (c, 9)):
        s.generated.append(tok)
    # Next, a writes position 10 (its third block) and b position 8: b needs a fourth block of
    # a full pool, and the most recently admitted sequence, c, gives its one back.
    plan = sched.schedule()
    assert c.preempted == 1 and c.prefilled == 0 and sched.preemptions == 1
    assert plan.decode.owners == (a, b) and c.slot in table.running  # c keeps its slot and tokens
    assert c.generated == [9] and c.pending


def test_a_preempted_sequence_is_recomputed_from_its_prompt_and_output_then_decodes():
    table, sched = setup(blocks=4, block_size=4)
    a = admit(table, range(7), 0, generated=[1])
    table.preempt(a)
    assert a.pending and not a.decodable and table.blocks.used_blocks() == 0
    (call,) = sched.schedule().ops
    # The prompt's KV again, with no token drawn (the output so far is kept as it is).
    # Its first block is still cached (freed, not yet taken): only positions 4..6 are computed.
    assert call.chunks == (Chunk(slot=a.slot, tokens=(4, 5, 6), start=4, last=False),)
    assert a.decodable and a.generated == [1]
    plan = sched.schedule()  # now a decode row: its last token at its position
    assert plan.decode == Decode((a.slot,), (1,), (7,), (1,))


def test_released_blocks_stay_cached_and_session_blocks_are_held():
    table, sched = setup(block_size=4)
    a = admit(table, range(10), 0, generated=[1])
    table.release(a, keep_session=False)
    # Its two full blocks are free but still cached: the same prefix hits them.
    b = admit(table, list(range(10)) + [3], 1)
    assert b.cached == 8 and table.blocks.used_blocks() == 2
    s = Sequence(Request("s", [1, 2, 3, 4, 5], SamplingParams(), lambda o: None, session_id=9), seq=[1, 2, 3, 4, 5])
    table.place(s, table.choose(s))
    s.prefilled, s.generated = 5, [6, 7]
    s.prefilled = 6
    table.blocks.allocate(s.slot, 6)
    table.release(s, keep_session=True)
    assert table.sessions[9].held is not None and table.sessions[9].valid == 6
    used = table.blocks.used_blocks()
    turn = Sequence(Request("t", [8], SamplingParams(), lambda o: None, session_id=9),
                    seq=table.history(9) + [8], history=7)
    table.place(turn, table.choose(turn))
    assert turn.prefilled == 6 and table.blocks.used_blocks() == used  # no block copied or recomputed
    table.release(turn, keep_session=True)
    table.end_session(9)
    assert table.blocks.used_blocks() == used - 2
    assert np.all(table.blocks.tables[turn.slot] == -1)


def test_a_chained_decode_row_without_a_block_raises_instead_of_dropping_its_kv():
    table, sched = setup(slots=2, blocks=2, block_size=16)
    seq = admit(table, range(10), 0, generated=list(range(6)))  # 16 positions: its one block is full
    seq.prefilled = seq.target + 1  # as after the decode step in flight was planned
    table.blocks.pools[0].take()  # the pool's last block goes elsewhere, against chains_on's check
    assert not sched.chains_on([seq])
    try:
        sched.schedule(inflight=[seq])
    except RuntimeError as e:
        assert f"slot {seq.slot}" in str(e)
    else:
        raise AssertionError("a chained row without a block was planned")
