"""The KV block manager as plain data: allocation, appends, sharing by hash, LRU eviction,
sessions' detached blocks and dp replicas. No device."""

import pytest

from service.engine.blocks import NO_BLOCK, BlockManager, chain_hash


def manager(blocks=8, size=4, slots=4, max_blocks=6, replicas=1):
    return BlockManager(blocks, size, slots, max_blocks, replicas)


def test_allocate_grows_the_table_and_refuses_what_the_pool_lacks():
    m = manager()
    assert m.allocate(0, 5)  # 2 blocks
    assert list(m.tables[0, :3]) == [m.held[0].blocks[0], m.held[0].blocks[1], NO_BLOCK]
    assert m.used_blocks() == 2 and m.num_free(0) == 6
    assert m.allocate(0, 8) and m.used_blocks() == 2  # still 2 blocks
    assert m.may_append(0, 9) and m.allocate(0, 9) and m.used_blocks() == 3
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
    assert m.used_blocks() == 0 and m.pools[0].cached_free == 2
    # Free blocks without a hash are taken first: both cached prefixes survive two new blocks.
    m.allocate(2, 8)
    assert m.pools[0].cached_free == 2
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
