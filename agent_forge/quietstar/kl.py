"""KL divergences between two models' next-token distributions, with bounded memory.

Both Step 1 (prompt baking: KL(teacher-with-prompt || student)) and Step 2 (the KL leash to
the baked model) need per-token KL over the vocabulary. A full B*T*V tensor of
probabilities is the memory problem, so the exact version works through the tokens in
chunks, and a top-k version keeps only the teacher's k most likely tokens plus one "rest"
bucket (which makes it a lower bound on the exact KL, by the data-processing inequality).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               chunk: int = 1024) -> torch.Tensor:
    """KL(p_teacher || p_student) per row; inputs (N, V), output (N,). Exact, chunked over N."""
    out = []
    for t, s in zip(teacher_logits.split(chunk), student_logits.split(chunk)):
        log_p = F.log_softmax(t.float(), dim=-1)
        log_q = F.log_softmax(s.float(), dim=-1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(out) if out else teacher_logits.new_zeros(0)


def topk_forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int = 64) -> torch.Tensor:
    """KL over the teacher's top-k tokens plus a single bucket holding all the other mass."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    top_lp, idx = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    top_lq = log_q.gather(-1, idx)
    rest_p = _log1mexp(torch.logsumexp(top_lp, -1))
    rest_q = _log1mexp(torch.logsumexp(top_lq, -1))
    kl_top = (top_lp.exp() * (top_lp - top_lq)).sum(-1)
    return kl_top + rest_p.exp() * (rest_p - rest_q)


def _log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_x)) for log_x <= 0, clamped away from log(0)."""
    return torch.log1p(-log_x.exp().clamp(max=1 - 1e-7))


def sequence_kl(teacher_logits, student_logits, mask, top_k: int | None = None) -> torch.Tensor:
    """Mean per-token KL over positions where `mask` is true; logits (B, T, V), mask (B, T)."""
    sel = mask.bool()
    t, s = teacher_logits[sel], student_logits[sel]
    if t.numel() == 0:
        return student_logits.sum() * 0.0
    kl = topk_forward_kl(t, s, top_k) if top_k else forward_kl(t, s)
    return kl.mean()
