"""The KV block manager as plain data: allocation, appends, sharing by hash, LRU eviction,
sessions' detached blocks and dp replicas. No device."""

import pytest

from service.engine.blocks import NO_BLOCK, BlockManager, chain_hash


def cached_free(pool):
    """Free blocks that still hold a cached prefix."""
    return sum(1 for b in pool.free if pool.hash_of[b] is not None)


def manager(blocks=8, size=4, slots=4, max_blocks=6, replicas=1):
    return BlockManager(blocks, size, slots, max_blocks, replicas)


def test_allocate_grows_the_table_and_refuses_what_the_pool_lacks():
    m = manager()
    assert m.allocate(0, 5)  # 2 blocks
    assert list(m.tables[0, :3]) == [m.held[0].blocks[0], m.held[0].blocks[1], NO_BLOCK]
    assert m.used_blocks() == 2 and m.pools[0].num_free == 6
    assert m.allocate(0, 8) and m.used_blocks() == 2  # still 2 blocks
    assert m.can_allocate(0, 9) and m.allocate(0, 9) and m.used_blocks() == 3
    assert not m.can_allocate(1, 4 * 6)  # 6 blocks wanted, 5 free
    assert not m.allocate(1, 4 * 6) and m.used_blocks() == 3 and not m.held[1].blocks  # nothing taken
    m.free(0)
    assert m.used_blocks() == 0 and (m.tables[0] == NO_BLOCK).all()


def test_full_blocks_are_shared_by_hash_without_copying():
    m = manager()
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks and a partial one
    m.allocate(0, len(prompt))
    m.commit(0, prompt, len(prompt))
    assert len(m.held[0].hashes) == 2  # the partial block is not registered
    hit = m.match_prefix(1, prompt, limit=len(prompt) - 1)
    assert hit == 8
    assert list(m.tables[1, :2]) == list(m.tables[0, :2])  # the same blocks, by reference
    assert m.used_blocks() == 3  # nothing new taken for the shared prefix
    assert m.pools[0].refs[m.tables[0, 0]] == 2
    # The chain: a block's hash depends on every token before it.
    other = [7] + prompt[1:]
    assert m.match_prefix(2, other, limit=10) == 0
    assert chain_hash(b"", prompt[:4]) != chain_hash(chain_hash(b"", other[:4]), prompt[4:8])


def test_prefix_limit_keeps_the_last_prompt_token_computed():
    m = manager()
    prompt = list(range(8))  # exactly two blocks
    m.allocate(0, 8)
    m.commit(0, prompt, 8)
    # The last token must be computed (its logits pick the first new token): one block, not two.
    assert m.match_prefix(1, prompt, limit=len(prompt) - 1) == 4


def test_freed_cached_blocks_stay_hittable_until_evicted_lru():
    m = manager(blocks=4, size=4)
    a, b = list(range(4)), list(range(10, 14))
    for slot, toks in ((0, a), (1, b)):
        m.allocate(slot, 5)  # a full block and a partial one
        m.commit(slot, toks + [99], 5)
    m.free(0)
    m.free(1)
    assert m.used_blocks() == 0 and cached_free(m.pools[0]) == 2
    # Free blocks without a hash are taken first: both cached prefixes survive two new blocks.
    m.allocate(2, 8)
    assert cached_free(m.pools[0]) == 2
    m.free(2)
    # The next takes evict the least recently used cached block (a's) before b's.
    m.allocate(3, 12)
    assert m.match_prefix(0, a + [1], limit=4) == 0
    assert m.match_prefix(1, b + [1], limit=4) == 4


def test_extend_prefix_picks_up_blocks_registered_after_admission():
    m = manager()
    shared = list(range(50, 58))  # 2 blocks
    m.allocate(0, 4)
    m.commit(0, shared, 4)
    assert m.match_prefix(1, shared + [1, 2], limit=9) == 4
    m.allocate(0, 8)
    m.commit(0, shared, 8)  # the first sequence computed its second block meanwhile
    assert m.extend_prefix(1, shared + [1, 2], 4, limit=9) == 8
    assert list(m.tables[1, :2]) == list(m.tables[0, :2])


def test_session_blocks_are_held_between_turns_and_released_at_the_end():
    m = manager()
    m.allocate(0, 6)
    m.commit(0, list(range(6)), 6)
    held = m.detach(0)
    assert m.used_blocks() == 2 and (m.tables[0] == NO_BLOCK).all()
    assert m.attach(2, held, 6) == 6  # next turn, another slot: the partial block comes along
    assert m.used_blocks() == 2 and list(m.tables[2, :2]) == held.blocks
    m.release(m.detach(2))
    assert m.used_blocks() == 0


def test_replicas_have_their_own_pools_and_block_ids():
    m = manager(blocks=2, slots=4, replicas=2)
    assert m.allocate(0, 8) and not m.can_allocate(1, 1)  # slots 0, 1: replica 0, now full
    assert m.allocate(2, 8)  # replica 1 has its own two blocks
    assert sorted(m.tables[0, :2]) == sorted(m.tables[2, :2]) == [0, 1]
    with pytest.raises(ValueError):
        m.attach(3, m.detach(0), 8)  # blocks never move between replicas


# -- the sliding-window layers' group ----------------------------------------------------------


def windowed(blocks=16, size=4, slots=4, max_blocks=12, window=6, window_blocks=8):
    return BlockManager(blocks, size, slots, max_blocks, window=window, window_blocks=window_blocks)


def live(m, slot):
    """The window group's blocks a slot's table names."""
    return [int(b) for b in m.groups[1].tables[slot] if b != NO_BLOCK]


def test_window_blocks_before_the_next_querys_window_go_back_to_the_pool():
    m = windowed()  # window 6, blocks of 4: a query at p reads p-5 .. p
    assert m.allocate(0, 40) is False  # 10 blocks of each group wanted, the window pool has 8
    for length in range(1, 41):  # decoding one position at a time
        m.slide(0, length - 1)
        assert m.allocate(0, length)
        held = live(m, 0)
        # At most the blocks a window of 6 can touch (3 of 4, as 3..8 does), whatever the
        # length; the first group keeps every position.
        assert len(held) <= -(-(6 - 1) // 4) + 1, (length, held)
        assert m.held[0].ids[1][:m.groups[1].front(length - 1)] == [NO_BLOCK] * m.groups[1].front(length - 1)
        assert len(m.held[0].blocks) == -(-length // 4)
    assert m.groups[1].used() == len(live(m, 0)) and m.used_blocks() == 10
    m.free(0)
    assert m.groups[1].used() == 0 and m.used_blocks() == 0 and (m.groups[1].tables[0] == NO_BLOCK).all()


def test_a_dry_window_pool_refuses_growth_though_the_first_pool_has_room():
    m = windowed(blocks=16, window_blocks=3)
    assert m.allocate(0, 12) and not m.can_allocate(1, 1) and not m.allocate(1, 1)
    assert m.used_blocks() == 3 and m.room(1, 0) == 0
    m.slide(0, 11)  # a query at 11 reads 6..11: block 0 goes back
    assert m.can_allocate(1, 4) and m.room(1, 0) == 4


def test_a_prefix_hit_takes_the_window_blocks_its_next_query_reads_and_stops_where_they_are_gone():
    m = windowed(window_blocks=12)
    prompt = list(range(20, 41))  # 21 tokens: 5 full blocks
    m.allocate(0, 21)
    m.commit(0, prompt, 21)
    # A second sequence hits 5 blocks (20 positions): its next query at 20 reads 15..20, so of
    # the window group only blocks 3 and 4, shared; blocks 0-2 of that group are not taken.
    assert m.match_prefix(1, prompt + [1], limit=21) == 20
    assert list(m.tables[1, :5]) == list(m.tables[0, :5])
    assert m.held[1].ids[1][:3] == [NO_BLOCK] * 3 and m.held[1].ids[1][3:] == m.held[0].ids[1][3:5]
    # Both finish; new KV then evicts the window group's block 4 (the least recently used of
    # the cached ones: freed last first) but not the first group's. A third sequence's hit
    # stops at 16 positions, whose next query reads blocks 2 and 3 of the window group.
    m.free(1)
    m.free(0)
    hashes = [b""]
    for i in range(5):
        hashes.append(chain_hash(hashes[-1], prompt[4 * i:4 * i + 4]))
    assert m.allocate(2, 4 * 8)
    assert m.groups[1].pools[0].lookup(hashes[5]) is None and m.pools[0].lookup(hashes[5]) is not None
    m.free(2)
    assert m.match_prefix(3, prompt + [1], limit=21) == 16
    assert m.held[3].ids[1][:2] == [NO_BLOCK] * 2 and NO_BLOCK not in m.held[3].ids[1][2:4]
    assert len(m.held[3].blocks) == 4


def test_a_session_keeps_its_window_blocks_or_recomputes_when_they_are_gone():
    m = windowed()
    tokens = list(range(30))
    m.allocate(0, 30)
    m.commit(0, tokens, 30)
    m.slide(0, 30)
    held = m.detach(0)
    assert m.attach(1, held, 30) == 30  # the next turn starts at 30: its window is held
    assert list(m.groups[1].tables[1, :8]) == held.ids[1][:8]
    # An edit earlier in the history: a query at 8 would read blocks given back already.
    again = m.detach(1)
    assert m.attach(2, again, 8) == 0
    assert m.used_blocks() == 0 and m.groups[1].used() == 0


def test_trimmed_drafts_give_back_both_groups_blocks():
    m = windowed()
    m.allocate(0, 9)
    m.commit(0, list(range(9)), 9)
    m.allocate(0, 17)  # drafts' positions
    m.trim(0, 10)
    assert len(m.held[0].blocks) == len(m.held[0].ids[1]) == 3
    assert m.used_blocks() == 3 and m.groups[1].used() == 3
