"""TRM-style recursion halted per token by ACT: the "think longer on hard tokens" part.

TRM (Jolicoeur-Martineau 2025) applies one small network recursively: a latent z is refined
from (x, y, z) a few times, then the current answer y from (y, z), and the pair is fed back.
Here x is a token's residual-stream state after `recursion_after_layer` MAG layers, y starts
at x and z at a learned vector; one recursion step is

    z <- z + f(x + y + z)   (latent_steps times)
    y <- y + f(y + z)

with f a shared RMSNorm + SwiGLU block. The recursion is per token (no mixing across
positions), so it needs no cache: the layers after it see the refined states through
their attention and memory.

ACT (Graves 2016) decides how many steps each token gets. After step n a halting unit gives
h_n = sigmoid(w . y_n + b). The token runs N = min{n : h_1 + ... + h_n >= threshold} steps
(at most max_steps; the last allowed step halts whatever h says), its output is
sum_{n<N} h_n y_n + R y_N with the remainder R = 1 - sum_{n<N} h_n, and its ponder cost
is N + R (only R carries a gradient). With b initialised at -3 (h ~ 0.05) early steps do not
halt, so training starts from "think to the cap" and learns to stop, instead of collapsing
to one step (the trap the design notes warn about).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, size: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(size, inner, bias=False)
        self.up_proj = nn.Linear(size, inner, bias=False)
        self.down_proj = nn.Linear(inner, size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def act_weights(halt_probs: torch.Tensor, threshold: float):
    """ACT over the last dimension (steps) of halting probabilities h (..., N_max).

    Returns (weights of each step's state (..., N_max), steps run N (...), ponder cost N + R (...)).
    Step n runs when the summed h before it is below `threshold`; the last step that runs takes
    the remainder R = 1 - (sum of h before it); step N_max always halts."""
    cum = halt_probs.cumsum(-1)
    before = cum - halt_probs
    runs = before < threshold
    runs[..., 0] = True
    last_allowed = torch.zeros_like(runs)
    last_allowed[..., -1] = True
    halts_here = runs & ((cum >= threshold) | last_allowed)
    remainder = 1.0 - before
    weights = torch.where(halts_here, remainder, torch.where(runs, halt_probs, torch.zeros_like(halt_probs)))
    steps = runs.sum(-1)
    ponder = steps.to(halt_probs.dtype) + (remainder * halts_here).sum(-1)
    return weights, steps, ponder


class TRMRecursion(nn.Module):
    """The shared recursion block, the latent's start vector and the halting unit."""

    def __init__(self, config):
        super().__init__()
        size = config.hidden_size
        self.norm = RMSNorm(size, config.rms_norm_eps)
        self.block = SwiGLU(size, config.recursion_intermediate_size)
        self.z_init = nn.Parameter(torch.zeros(size))
        self.halt_norm = RMSNorm(size, config.rms_norm_eps)
        self.halt = nn.Linear(size, 1)
        self.latent_steps, self.max_steps = config.latent_steps, config.max_recursion_steps
        self.threshold = config.act_threshold

    def refine(self, state: torch.Tensor) -> torch.Tensor:
        return self.block(self.norm(state))

    def forward(self, x: torch.Tensor):
        """(ACT-weighted answer state (B, T, size), steps run (B, T), ponder cost (B, T),
        halting probabilities (B, T, max_steps))."""
        y, z = x, self.z_init.to(x.dtype).expand_as(x)
        answers, halts = [], []
        for _ in range(self.max_steps):
            for _ in range(self.latent_steps):
                z = z + self.refine(x + y + z)
            y = y + self.refine(y + z)
            answers.append(y)
            halts.append(torch.sigmoid(self.halt(self.halt_norm(y)).float()).squeeze(-1))
        halt_probs = torch.stack(halts, dim=-1)
        weights, steps, ponder = act_weights(halt_probs, self.threshold)
        out = (torch.stack(answers, dim=-2) * weights.unsqueeze(-1).to(x.dtype)).sum(-2)
        return out, steps, ponder, halt_probs
