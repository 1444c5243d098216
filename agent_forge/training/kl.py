"""KL divergences between two models' next-token distributions, with bounded memory, and
the estimators the trainers use, each named for its direction.

- Step 1's prompt baking and token-level RL use KL(reference || policy) over the vocabulary
  (`kl_ref_to_policy`; in baking the reference is the prompted teacher);
- answer-level RL uses KL(policy || reference) on tokens sampled from the policy
  (`kl_policy_to_ref`: Schulman's k3 estimate, or exact over the vocabulary).

A full B*T*V tensor of probabilities is the memory problem, so the exact version works
through the tokens in chunks, and a top-k version keeps only the first distribution's k most
likely tokens plus one "rest" bucket (a lower bound on the exact KL, by the data-processing
inequality).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agent_forge.training.logprobs import masked_mean


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


def kl_ref_to_policy(ref_logits, policy_logits, mask, top_k: int | None = None) -> torch.Tensor:
    """Mean over positions where `mask` is true of KL(ref || policy) over the vocabulary;
    logits (B, T, V), mask (B, T). top_k: the top-k bound (bounded memory); None = exact."""
    sel = mask.bool()
    t, s = ref_logits[sel], policy_logits[sel]
    if t.numel() == 0:
        return policy_logits.sum() * 0.0
    kl = topk_forward_kl(t, s, top_k) if top_k else forward_kl(t, s)
    return kl.mean()


def kl_policy_to_ref_k3(logp_policy: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref), unbiased for tokens sampled from the policy."""
    r = logp_ref - logp_policy
    return torch.exp(r) - r - 1.0


def kl_policy_to_ref(policy_logits, ref_logits, logp_policy, logp_ref, mask, estimator: str,
                     total: float | None = None) -> torch.Tensor:
    """Mean over sampled tokens of KL(policy || ref): "k3" (from the sampled tokens' log-probs)
    or "full" (exact over the vocabulary). `total`: the normaliser over the whole batch when
    this is one micro-batch (as masked_mean)."""
    if estimator == "k3":
        return masked_mean(kl_policy_to_ref_k3(logp_policy, logp_ref), mask, total)
    if estimator == "full":
        sel = mask.bool()
        if not sel.any():
            return policy_logits.sum() * 0.0
        kl = forward_kl(policy_logits[sel], ref_logits[sel])
        return kl.sum() / (kl.numel() if total is None else max(total, 1.0))
    raise ValueError(f"kl_estimator must be 'k3' or 'full', not {estimator!r}")
