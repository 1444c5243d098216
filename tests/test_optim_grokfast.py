"""Grokfast filters against the paper's recursions, written out by hand."""

import io

import torch

from agent_forge.optim.grokfast import GrokfastEMA, GrokfastMA


def _param(shape=(3, 4), dtype=torch.float32):
    return torch.nn.Parameter(torch.zeros(shape, dtype=dtype))


def _grads(n, shape=(3, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_ema_matches_hand_rolled_recursion():
    alpha, lamb = 0.9, 2.0
    p = _param()
    filt = GrokfastEMA([p], alpha=alpha, lamb=lamb)
    ema = None
    for g in _grads(5):
        p.grad = g.clone()
        filt.apply()
        ema = g.clone() if ema is None else alpha * ema + (1 - alpha) * g
        expected = g + lamb * ema
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-6)


def test_first_step_clones_gradient_instead_of_aliasing():
    p = _param()
    g = _grads(1)[0]
    p.grad = g.clone()
    filt = GrokfastEMA([p], alpha=0.98, lamb=2.0)
    filt.apply()
    # the EMA must hold the raw first gradient, not the amplified p.grad it was edited into
    torch.testing.assert_close(filt.ema[0], g)
    assert filt.ema[0].data_ptr() != p.grad.data_ptr()
    p.grad.mul_(100.0)
    torch.testing.assert_close(filt.ema[0], g)


def test_parameters_without_grad_are_skipped():
    a, b = _param(), _param()
    a.grad = torch.ones(3, 4)
    filt = GrokfastEMA([a, b], lamb=1.0)
    filt.apply()
    assert b.grad is None and filt.ema[1] is None
    torch.testing.assert_close(a.grad, torch.full((3, 4), 2.0))


def test_low_precision_grads_keep_float32_state():
    p = _param(dtype=torch.bfloat16)
    p.grad = torch.ones(3, 4, dtype=torch.bfloat16)
    filt = GrokfastEMA([p], alpha=0.98, lamb=0.5)
    filt.apply()
    assert filt.ema[0].dtype == torch.float32 and p.grad.dtype == torch.bfloat16


def test_state_dict_round_trip_with_weights_only_load():
    grads = _grads(6, seed=1)
    p1, p2 = _param(), _param()
    f1 = GrokfastEMA([p1], alpha=0.95, lamb=1.5)
    for g in grads[:3]:
        p1.grad = g.clone()
        f1.apply()
    buf = io.BytesIO()
    torch.save(f1.state_dict(), buf)
    buf.seek(0)
    f2 = GrokfastEMA([p2], alpha=0.5, lamb=9.0)  # wrong hyper-parameters get overwritten
    f2.load_state_dict(torch.load(buf, weights_only=True))
    for g in grads[3:]:
        p1.grad, p2.grad = g.clone(), g.clone()
        f1.apply()
        f2.apply()
        assert torch.equal(p1.grad, p2.grad)


def test_ma_window_matches_hand_rolled_average():
    window, lamb = 3, 0.7
    p = _param()
    filt = GrokfastMA([p], window=window, lamb=lamb, warmup=True)
    seen = []
    for g in _grads(6, seed=2):
        p.grad = g.clone()
        filt.apply()
        seen.append(g)
        if len(seen) < window:
            expected = g
        else:
            expected = g + lamb * torch.stack(seen[-window:]).mean(0)
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-6)
