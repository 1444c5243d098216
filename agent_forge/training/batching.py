"""Which examples a step reads: a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted run would. Every trainer reads its data in order
through per-epoch seeded permutations."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch


@lru_cache(maxsize=8)
def _permutation(seed: int, n: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist())


def epoch_permutation(seed: int, epoch: int, n: int, offset: int = 0) -> tuple[int, ...]:
    """range(n) shuffled by the generator seeded seed * 1000 + offset + epoch."""
    return _permutation(seed * 1000 + offset + epoch, n)


def read_positions(start: int, count: int, n: int, order: Callable[[int], Sequence]) -> list[int]:
    """Items at stream positions start .. start+count-1, where epoch e of the stream is order(e)."""
    out = []
    for pos in range(start, start + count):
        epoch, offset = divmod(pos, n)
        out.append(int(order(epoch)[offset]))
    return out


def step_indices(step: int, per_step: int, n: int, seed: int, offset: int = 0) -> list[int]:
    """The `per_step` items of step `step` (questions, crops), read through epoch_permutation."""
    return read_positions(step * per_step, per_step, n, lambda e: epoch_permutation(seed, e, n, offset))
