"""Difficulty-based thought injection against a plain per-position entropy loop."""

from __future__ import annotations

import math

import pytest
import torch

from agent_forge.quietstar.injector import (candidate_positions, next_token_entropy, select_positions,
                                            selected_fraction, slow_select_positions)


def logits_and_mask(seed=0, B=3, T=11, V=17):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(B, T, 1, generator=gen) * 6  # from flat to sharp distributions
    logits = torch.randn(B, T, V, generator=gen) * scale
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0   # right padding
    mask[2, :3] = 0   # left padding
    return logits, mask


def test_entropy_matches_definition():
    logits, _ = logits_and_mask()
    got = next_token_entropy(logits)
    for b, j in [(0, 0), (1, 5), (2, 10)]:
        p = torch.softmax(logits[b, j].double(), -1).tolist()
        assert got[b, j].item() == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-5)


@pytest.mark.parametrize("mode,kw", [("all", {}), ("entropy", {"threshold": 1.5}),
                                     ("entropy", {"threshold": 2.5}),
                                     ("top_fraction", {"fraction": 0.25}),
                                     ("top_fraction", {"fraction": 0.5}), ("top_fraction", {"fraction": 1.0})])
@pytest.mark.parametrize("seed", [0, 1])
def test_select_equals_slow_loop(mode, kw, seed):
    logits, mask = logits_and_mask(seed)
    got = select_positions(logits, mask, mode, **kw)
    want = slow_select_positions(logits, mask, mode, **kw)
    assert torch.equal(got, want)
    assert not (got & ~candidate_positions(mask)).any()


def test_top_fraction_counts_and_fraction():
    logits, mask = logits_and_mask()
    sel = select_positions(logits, mask, "top_fraction", fraction=0.25)
    n_cand = candidate_positions(mask).sum(-1)
    assert sel.sum(-1).tolist() == [math.ceil(n * 0.25) for n in n_cand.tolist()]
    assert selected_fraction(sel, mask) == pytest.approx(sel.sum().item() / mask.sum().item())


def test_bad_arguments():
    logits, mask = logits_and_mask()
    with pytest.raises(ValueError):
        select_positions(logits, mask, "sometimes")
    with pytest.raises(ValueError):
        select_positions(None, mask, "entropy", threshold=1.0)
    with pytest.raises(ValueError):
        select_positions(logits, mask, "top_fraction", fraction=0.0)
