"""Muon inside MuGrokfast against the papers' math (Keller Jordan's Muon; Moonshot's
RMS-matching learning-rate rule; Grokfast first), with a float64 reference that is itself
checked against the SVD."""

import math

import pytest
import torch
from torch import nn

from agent_forge.optim.mugrokfast import MuGrokfast, MuGrokfastConfig

A, B, C = 3.4445, -4.7750, 2.0315
# Learning-rate scale of each rule (research/optimizers-and-baking.md): Keller Jordan's
# Muon sqrt(max(1, rows/cols)); Moonshot's RMS match 0.2*sqrt(max(rows, cols)).
SCALES = {"original": lambda r, c: math.sqrt(max(1, r / c)),
          "match_rms_adamw": lambda r, c: 0.2 * math.sqrt(max(r, c))}


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


def _one_step_update(g: torch.Tensor, lr: float = 0.01, **overrides) -> torch.Tensor:
    """What one MuGrokfast step (no decay, no Grokfast) subtracts from a weight, over lr*scale."""
    rows, cols = g.shape
    layer = nn.Linear(cols, rows, bias=False)
    w0 = layer.weight.detach().clone()
    cfg = MuGrokfastConfig(muon_lr=lr, weight_decay=0.0, grokfast_enabled=False,
                           qk_clip_enabled=False, **overrides)
    opt = MuGrokfast(layer.named_parameters(), cfg)
    layer.weight.grad = g.clone()
    opt.step()
    return (w0 - layer.weight.detach()).double() / (lr * SCALES[cfg.adjust_lr_fn](rows, cols))


def _polar_check(ortho: torch.Tensor, g: torch.Tensor) -> None:
    """ortho = U S' V^T of g = U S V^T, with S' in the quintic's band (about [0.7, 1.2])."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    inner = u.T @ ortho @ vh.T  # diagonal if ortho shares g's singular vectors
    diag = torch.diagonal(inner)
    assert (ortho - u @ inner @ vh).norm() / ortho.norm() < 0.05  # nothing outside g's span
    assert (inner - torch.diag(diag)).norm() / diag.norm() < 0.05, "not g's singular vectors"
    assert diag.min() > 0.65 and diag.max() < 1.2, (diag.min(), diag.max())
    polar = u @ vh
    assert (ortho - polar).norm() / polar.norm() < 0.3


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_muon_update_is_near_the_polar_factor(shape):
    """Ours and the float64 reference both orthogonalise: the SVD of g is the independent truth."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen)
    _polar_check(_one_step_update(g), g)
    _polar_check(ns5_reference(g), g)
    # the plain normalised gradient (no orthogonalisation) fails the same check
    with pytest.raises(AssertionError):
        _polar_check(_one_step_update(g, ns_steps=0), g)


def _reference_steps(w0, grads, lr, wd, beta, alpha, lamb, scale):
    """Grokfast EMA -> momentum (lerp) -> Nesterov -> NS5 -> decoupled wd + lr * scale."""
    w, buf, ema = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64), None
    for g in grads:
        g = g.double()
        ema = g.clone() if ema is None else alpha * ema + (1 - alpha) * g
        g = g + lamb * ema
        buf = beta * buf + (1 - beta) * g
        update = (1 - beta) * g + beta * buf
        w = w * (1 - lr * wd) - lr * scale * ns5_reference(update)
    return w


@pytest.mark.parametrize("rule,other", [("match_rms_adamw", "original"), ("original", "match_rms_adamw")])
def test_muon_steps_match_reference_over_several_steps(rule, other):
    """At 16 x 100 the two lr rules differ 2x (0.2*sqrt(100) = 2 vs sqrt(max(1, 0.16)) = 1):
    ours follows the rule it is configured with (Moonshot's by default), not the other."""
    assert MuGrokfastConfig().adjust_lr_fn == "match_rms_adamw"
    torch.manual_seed(0)
    layer = nn.Linear(100, 16, bias=False)
    w0 = layer.weight.detach().clone()
    cfg = MuGrokfastConfig(muon_lr=0.02, weight_decay=0.1, momentum=0.9, grokfast_alpha=0.8,
                           grokfast_lambda=0.5, qk_clip_enabled=False, adjust_lr_fn=rule)
    opt = MuGrokfast(layer.named_parameters(), cfg)
    assert [g["kind"] for g in opt.param_groups] == ["muon"]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(16, 100, generator=gen) for _ in range(4)]
    for g in grads:
        layer.weight.grad = g.clone()
        opt.step()
    moved = layer.weight.detach().double() - w0.double()

    def moved_by(scale_rule):
        return _reference_steps(w0, grads, 0.02, 0.1, 0.9, 0.8, 0.5, SCALES[scale_rule](16, 100)) - w0.double()

    ref, other_ref = moved_by(rule), moved_by(other)
    assert (moved - ref).norm() / ref.norm() < 0.03
    assert (moved - other_ref).norm() / ref.norm() > 0.3
    # a wrong order (orthogonalise, then momentum) lands far away too
    wrong, buf = w0.double().clone(), torch.zeros_like(ref)
    for g in grads:
        buf = 0.9 * buf + 0.1 * ns5_reference(g)
        wrong = wrong * (1 - 0.002) - 0.02 * SCALES[rule](16, 100) * buf
    assert (wrong - w0.double() - ref).norm() / ref.norm() > 0.1


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
