"""Difficulty-based thought injection: think only where the next token is hard to predict.

A thought costs K * (L + n_true - 1) passes for every position that gets one, so thinking
where the base model is already sure of the next token is mostly wasted compute. The
difficulty signal is the entropy (nats) of the base model's next-token distribution at
each position, read from logits the caller already has. Three rules:

- "all":           every real token (that has a next token to predict);
- "entropy":       positions whose entropy is above `threshold`;
- "top_fraction":  per sequence, the ceil(fraction * n) most uncertain of its n candidate
                   positions (at least one), so every row keeps a fixed share of thoughts.

The result is the boolean `selected` mask that `generate_thoughts` takes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("all", "entropy", "top_fraction")


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum p log p of softmax(logits) over the last axis, in fp32: (..., V) -> (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def candidate_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real tokens that are followed by another real token: only those have a target to score.

    The last real token of a row (and padding) would get a thought that no reward can judge.
    """
    real = attention_mask.bool()
    nxt = torch.zeros_like(real)
    nxt[:, :-1] = real[:, 1:]
    return real & nxt


def select_positions(logits: torch.Tensor | None, attention_mask: torch.Tensor, mode: str = "all",
                     threshold: float | None = None, fraction: float | None = None) -> torch.Tensor:
    """The (B, T) bool mask of positions that get thoughts. `logits` (B, T, V) may be None for "all"."""
    if mode not in MODES:
        raise ValueError(f"injection must be one of {MODES}, not {mode!r}")
    cand = candidate_positions(attention_mask)
    if mode == "all":
        return cand
    if logits is None:
        raise ValueError(f"injection {mode!r} needs the base logits")
    ent = next_token_entropy(logits)
    if mode == "entropy":
        if threshold is None:
            raise ValueError("injection 'entropy' needs a threshold (nats)")
        return cand & (ent > threshold)
    if fraction is None or not 0 < fraction <= 1:
        raise ValueError(f"injection 'top_fraction' needs 0 < fraction <= 1, got {fraction}")
    return _top_fraction(ent, cand, fraction)


def _top_fraction(ent: torch.Tensor, cand: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row, the ceil(fraction * n_candidates) highest-entropy candidates (ties: lower j)."""
    n = cand.sum(-1)
    keep = torch.where(n > 0, torch.ceil(n.double() * fraction).long().clamp_min(1), n)
    score = ent.masked_fill(~cand, float("-inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return cand & (rank < keep[:, None])


def slow_select_positions(logits, attention_mask, mode="all", threshold=None, fraction=None):
    """The same rule written as plain Python loops (for tests): entropy term by term."""
    B, T = attention_mask.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        cands = [j for j in range(T - 1) if attention_mask[b, j] and attention_mask[b, j + 1]]
        ents = {}
        for j in cands:
            if mode == "all":
                continue
            probs = torch.softmax(logits[b, j].double(), -1).tolist()
            ents[j] = -sum(p * math.log(p) for p in probs if p > 0)
        if mode == "all":
            chosen = cands
        elif mode == "entropy":
            chosen = [j for j in cands if ents[j] > threshold]
        else:
            k = max(1, math.ceil(len(cands) * fraction)) if cands else 0
            chosen = sorted(cands, key=lambda j: (-ents[j], j))[:k]
        for j in chosen:
            out[b, j] = True
    return out


def selected_fraction(selected: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Share of the real tokens that got a thought (the compute cut is roughly 1 - this)."""
    return float(selected.sum()) / max(1, int(attention_mask.sum()))
