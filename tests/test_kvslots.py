"""The slot pool's layout: a session running alone is read in place, interleaved sessions gathered."""

from __future__ import annotations

import torch

from lambda_split._kvslots import PoolBatch, SlotPool, SlotState

HEADS, DIM = 2, 4


def _step(pool: SlotPool, states: list[SlotState], tokens: int) -> PoolBatch:
    batch = PoolBatch(pool, 0, [(state, torch.ones(1, tokens, dtype=torch.long)) for state in states])
    key = torch.randn(len(states), HEADS, tokens, DIM)
    keys, _ = batch.update(key, key, 0)
    assert keys.shape == (len(states), HEADS, batch.length, DIM)
    assert torch.equal(keys[:, :, -tokens:], key)  # every row's newest keys come back last
    batch.commit()
    return batch


def test_a_lone_session_is_read_in_place_and_keeps_its_keys() -> None:
    pool, state = SlotPool(1), SlotState()
    with torch.inference_mode():
        seen = [_step(pool, [state], 5)]
        for _ in range(70):  # past the pool's first growth (64 slots)
            seen.append(_step(pool, [state], 1))
        assert all(batch.span is not None for batch in seen)
        everything = PoolBatch(pool, 0, [(state, torch.ones(1, 1, dtype=torch.long))])
        key = torch.zeros(1, HEADS, 1, DIM)
        keys, _ = everything.update(key, key, 0)
        assert everything.span is not None and keys.shape[2] == 76
        assert keys.data_ptr() == pool.keys[0][:, everything.span[0]].data_ptr()  # a view, no copy


def test_interleaved_sessions_are_gathered_and_each_keeps_its_own_keys() -> None:
    pool, a, b = SlotPool(1), SlotState(), SlotState()
    written: dict[int, list[torch.Tensor]] = {id(a): [], id(b): []}
    with torch.inference_mode():
        for _ in range(4):
            for state in (a, b):
                batch = PoolBatch(pool, 0, [(state, torch.ones(1, 1, dtype=torch.long))])
                key = torch.randn(1, HEADS, 1, DIM)
                batch.update(key, key, 0)
                batch.commit()
                written[id(state)].append(key)
        both = PoolBatch(
            pool, 0, [(a, torch.ones(1, 1, dtype=torch.long)), (b, torch.ones(1, 1, dtype=torch.long))]
        )
        assert both.span is None
        new = torch.zeros(2, HEADS, 1, DIM)
        keys, _ = both.update(new, new, 0)
        for row, state in enumerate((a, b)):
            assert torch.equal(keys[row, :, :4], torch.cat(written[id(state)], dim=2)[0])
        alone = PoolBatch(pool, 0, [(a, torch.ones(1, 1, dtype=torch.long))])
        assert alone.span is None  # a's slots are not consecutive any more: gathered
        last = torch.randn(1, HEADS, 1, DIM)
        keys, _ = alone.update(last, last, 0)
        assert torch.equal(keys[0], torch.cat([*written[id(a)], last], dim=2)[0])
        both.abort()
        alone.abort()
