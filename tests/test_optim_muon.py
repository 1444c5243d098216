"""Muon inside MuGrokfast against the papers' math (Keller Jordan's Muon; Moonshot's
RMS-matching learning-rate rule; Grokfast first), with a float64 reference."""

import math

import torch
from torch import nn

from agent_forge.optim.mugrokfast import MuGrokfast, MuGrokfastConfig

A, B, C = 3.4445, -4.7750, 2.0315


def ns5_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz in float64: X <- aX + (bXX^T + c(XX^T)^2) X."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if tall else x


def test_newton_schulz_is_nearly_orthogonal():
    gen = torch.Generator().manual_seed(0)
    for shape in [(16, 48), (48, 16), (32, 32)]:
        g = torch.randn(shape, generator=gen)
        ours = ns5_reference(g)
        sv = torch.linalg.svdvals(ours)
        # the quintic deliberately overshoots: singular values land in a band around 1
        assert sv.min() > 0.65 and sv.max() < 1.2, (shape, sv.min(), sv.max())
        # and torch's (bf16) implementation agrees with the float64 reference
        from torch.optim._muon import _zeropower_via_newtonschulz
        theirs = _zeropower_via_newtonschulz(g, (A, B, C), 5, 1e-7).double()
        assert (theirs - ours).norm() / ours.norm() < 0.03
    # the shape-invariant input (singular values far from 1) really changed
    assert torch.linalg.svdvals(g / g.norm()).max() < 0.5


def _reference_steps(w0, grads, lr, wd, beta, alpha, lamb):
    """Grokfast EMA -> momentum (lerp) -> Nesterov -> NS5 -> decoupled wd + adjusted lr."""
    w, buf, ema = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64), None
    adjusted = lr * 0.2 * math.sqrt(max(w0.shape))
    for g in grads:
        g = g.double()
        ema = g.clone() if ema is None else alpha * ema + (1 - alpha) * g
        g = g + lamb * ema
        buf = beta * buf + (1 - beta) * g
        update = (1 - beta) * g + beta * buf
        w = w * (1 - lr * wd) - adjusted * ns5_reference(update)
    return w


def test_muon_steps_match_reference_over_several_steps():
    torch.manual_seed(0)
    layer = nn.Linear(24, 16, bias=False)
    w0 = layer.weight.detach().clone()
    cfg = MuGrokfastConfig(muon_lr=0.02, weight_decay=0.1, momentum=0.9,
                           grokfast_alpha=0.8, grokfast_lambda=0.5, qk_clip_enabled=False)
    opt = MuGrokfast(layer.named_parameters(), cfg)
    assert [g["kind"] for g in opt.param_groups] == ["muon"]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(16, 24, generator=gen) for _ in range(4)]
    for g in grads:
        layer.weight.grad = g.clone()
        opt.step()
    ref = _reference_steps(w0, grads, 0.02, 0.1, 0.9, 0.8, 0.5)
    moved_ref = ref - w0.double()
    moved = layer.weight.detach().double() - w0.double()
    assert (moved - moved_ref).norm() / moved_ref.norm() < 0.03
    # a wrong order (orthogonalise, then momentum) lands far away: the test can tell
    wrong = w0.double().clone()
    buf = torch.zeros_like(wrong)
    for g in grads:
        buf = 0.9 * buf + 0.1 * ns5_reference(g)
        wrong = wrong * (1 - 0.002) - 0.02 * 0.2 * math.sqrt(24) * buf
    assert (wrong - ref).norm() / moved_ref.norm() > 0.1


def test_weight_decay_is_decoupled():
    layer = nn.Linear(8, 8, bias=False)
    w0 = layer.weight.detach().clone()
    cfg = MuGrokfastConfig(muon_lr=0.05, weight_decay=0.2, qk_clip_enabled=False)
    opt = MuGrokfast(layer.named_parameters(), cfg)
    layer.weight.grad = torch.zeros_like(w0)
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), w0 * (1 - 0.05 * 0.2))


def test_adamw_side_sees_grokfast_filtered_gradients():
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(5))
    twin = nn.Parameter(bias.detach().clone())
    cfg = MuGrokfastConfig(muon_lr=1e-2, grokfast_alpha=0.9, grokfast_lambda=1.0,
                           qk_clip_enabled=False)
    opt = MuGrokfast([("bias", bias)], cfg)
    assert [g["kind"] for g in opt.param_groups] == ["adamw_no_decay"]
    ref = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.0, betas=cfg.betas, eps=cfg.eps)
    ema = None
    for g in [torch.randn(5) for _ in range(3)]:
        ema = g.clone() if ema is None else 0.9 * ema + 0.1 * g
        bias.grad, twin.grad = g.clone(), g + 1.0 * ema
        opt.step()
        ref.step()
        torch.testing.assert_close(bias.detach(), twin.detach(), rtol=1e-6, atol=1e-7)
