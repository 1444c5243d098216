"""Token-level helpers every trainer and evaluation shares: position ids for padded rows, the
log-prob of chosen tokens, the logits of a sequence's last tokens, the log-likelihood of a
continuation, a masked mean. One definition each, so Step 1, both RL modes, the thought
generator and the log-likelihood evaluations cannot drift apart."""

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


def sample_logits(model, sequences: torch.Tensor, mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """Logits predicting the last `n_new` tokens of `sequences`: (B, n_new, V)."""
    kwargs = dict(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask))
    try:
        logits = model(**kwargs, logits_to_keep=n_new + 1).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(**kwargs).logits
    return logits[:, -(n_new + 1):-1]


def continuation_logprob(model, contexts: list[list[int]], continuations: list[list[int]],
                         pad_id: int, batch_size: int = 32) -> list[float]:
    """sum_t log p(continuation_t | context, continuation_<t) for each pair (token ids).

    Rows are LEFT-padded so every continuation ends in the last column; then only the
    last (longest continuation + 1) positions need logits (the LM head is skipped elsewhere).
    """
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(contexts), batch_size):
        conts = continuations[i:i + batch_size]
        seqs = [c + a for c, a in zip(contexts[i:i + batch_size], conts)]
        width, n_cont = max(len(s) for s in seqs), max(len(a) for a in conts)
        ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        logits = sample_logits(model, ids, mask, n_cont)
        logp = token_logprobs(logits, ids[:, -n_cont:])
        out += [float(logp[row, n_cont - len(a):].sum()) for row, a in enumerate(conts)]
    return out
