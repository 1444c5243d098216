"""Token-level helpers every trainer shares: position ids for padded rows, the log-prob of
chosen tokens, a masked mean. One definition each, so Step 1, both RL modes and the
thought generator cannot drift apart."""

from __future__ import annotations

import torch


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position id of each token as generate() computes it: left padding does not shift the
    real tokens (padding positions are 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in fp32, without a full log-softmax copy
    (one vocabulary-sized tensor fewer: the difference on long RL batches)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Sum of x where mask, divided by the mask's count (or by `total`: the count over the
    whole batch when this is one micro-batch of it)."""
    m = mask.bool()
    denom = m.sum().clamp(min=1) if total is None else max(total, 1.0)
    return torch.where(m, x, torch.zeros_like(x)).sum() / denom
