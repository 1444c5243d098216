"""REINFORCE losses, group baselines and sample diversity shared by the two RL modes.

The two policy losses differ in what one "action" is: answer-level RL weighs every sampled
token's log-prob by its sample's advantage (`reinforce_per_token`, token- or
sequence-normalised); token-level RL weighs each thought's summed log-prob by that
thought's advantage (`reinforce_per_thought`).
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch


def group_advantages(rewards: torch.Tensor, k: int, normalize_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Rows are question-major groups of k; advantage = r - group mean (/ (std + eps))."""
    g = rewards.float().view(-1, k)
    adv = g - g.mean(1, keepdim=True)
    if normalize_std:
        adv = adv / (g.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


def reinforce_per_token(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, norm: str = "token",
                        total: float | None = None) -> torch.Tensor:
    """-A * log p of each sampled token; logp/mask (B, T), adv (B,).

    "token": summed over tokens / the number of sampled tokens (DAPO); "sequence": mean over
    samples of A * mean_t log p (GRPO). `total` is the normaliser when the batch is split
    into micro-batches: tokens ("token") or samples ("sequence") in the whole batch.
    """
    m = mask.float()
    weighted = torch.where(mask.bool(), logp, torch.zeros_like(logp)) * adv[:, None]
    if norm == "token":
        return -weighted.sum() / (m.sum().clamp(min=1.0) if total is None else max(total, 1.0))
    if norm == "sequence":
        per_seq = weighted.sum(1) / m.sum(1).clamp(min=1.0)
        return -per_seq.sum() / (per_seq.shape[0] if total is None else max(total, 1.0))
    raise ValueError(f"loss_norm must be 'token' or 'sequence', not {norm!r}")


def reinforce_per_thought(adv: torch.Tensor, logprob_sum: torch.Tensor) -> torch.Tensor:
    """-(A * log p(thought)) averaged over positions and thoughts; A is held constant."""
    if adv.numel() == 0:
        return logprob_sum.sum() * 0.0
    return -(adv.detach() * logprob_sum).mean()


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int = 2, empty: float = 0.0) -> float:
    """Distinct n-grams / all n-grams over a group of sequences (words or token ids), each
    sequence's n-grams taken inside it; `empty` when the group has none. 1 = no repeats."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else empty
