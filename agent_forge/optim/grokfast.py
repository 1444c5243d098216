"""Grokfast gradient filters (Lee et al. 2024, "Grokfast: Accelerated Grokking by
Amplifying Slow Gradients").

Grokfast is a LOW-PASS AMPLIFIER: it keeps a slow average of each parameter's gradient
and adds `lamb` times that average back onto the gradient, so the slow (generalising)
component is boosted. It is not a high-pass filter.

Usage: call `.apply()` after `loss.backward()` and before `optimizer.step()`; it edits
`p.grad` in place. The state (one tensor per parameter) is saved by `state_dict()` as plain
tensors, so `torch.save` / `torch.load(weights_only=True)` restores it exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _state_dtype(grad: torch.Tensor) -> torch.dtype:
    """Keep filter state in float32 when gradients are half precision: an EMA with
    alpha=0.98 loses most of its signal in bf16."""
    return torch.float32 if grad.dtype in _LOW_PRECISION else grad.dtype


class GrokfastEMA:
    """EMA filter: ema = alpha*ema + (1-alpha)*g ; g <- g + lamb*ema.

    On the first gradient the EMA starts as a CLONE of that gradient (the reference code
    aliases `p.grad`, which silently breaks once the gradient is edited in place), so the
    first filtered gradient is (1 + lamb) * g.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], alpha: float = 0.98,
                 lamb: float = 2.0):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.params = [p for p in params]
        self.alpha = float(alpha)
        self.lamb = float(lamb)
        self.ema: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def apply(self) -> None:
        """Filter every parameter's gradient in place (parameters without grad are skipped)."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.ema[i] is None:
                self.ema[i] = g.detach().to(_state_dtype(g), copy=True)
            else:
                self.ema[i].mul_(self.alpha).add_(g.to(self.ema[i].dtype), alpha=1.0 - self.alpha)
            g.add_(self.ema[i].to(g.dtype), alpha=self.lamb)

    def state_dict(self) -> dict:
        """Plain tensors/floats only (loadable with weights_only=True)."""
        return {"kind": "ema", "alpha": self.alpha, "lamb": self.lamb,
                "ema": [None if e is None else e.clone() for e in self.ema]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", "ema") != "ema" or len(state["ema"]) != len(self.params):
            raise ValueError("Grokfast EMA state does not match these parameters")
        self.alpha, self.lamb = float(state["alpha"]), float(state["lamb"])
        self.ema = [None if e is None else e.detach().clone().to(p.device)
                    for e, p in zip(state["ema"], self.params)]


class GrokfastMA:
    """Moving-average (window) variant: g <- g + lamb * mean(last `window` gradients).

    Memory is `window` copies of the gradients. With `warmup=True` (the paper's default)
    nothing is added until the window is full.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], window: int = 100,
                 lamb: float = 5.0, warmup: bool = True):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.params = [p for p in params]
        self.window, self.lamb, self.warmup = int(window), float(lamb), bool(warmup)
        self.history: list[list[torch.Tensor]] = [[] for _ in self.params]

    @torch.no_grad()
    def apply(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            hist = self.history[i]
            hist.append(p.grad.detach().to(_state_dtype(p.grad), copy=True))
            if len(hist) > self.window:
                hist.pop(0)
            if self.warmup and len(hist) < self.window:
                continue
            avg = torch.stack(hist).mean(dim=0)
            p.grad.add_(avg.to(p.grad.dtype), alpha=self.lamb)

    def state_dict(self) -> dict:
        return {"kind": "ma", "window": self.window, "lamb": self.lamb, "warmup": self.warmup,
                "history": [[h.clone() for h in hist] for hist in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "ma" or len(state["history"]) != len(self.params):
            raise ValueError("Grokfast MA state does not match these parameters")
        self.window, self.lamb = int(state["window"]), float(state["lamb"])
        self.warmup = bool(state["warmup"])
        self.history = [[h.detach().clone().to(p.device) for h in hist]
                        for hist, p in zip(state["history"], self.params)]
