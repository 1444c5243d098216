"""Error-compensating ternary rounding: GPTQ (Frantar et al. 2023) on the grid {-g, 0, +g}.

Rounding every weight to its nearest ternary value (the paper's recipe, `quantize.ternary`)
ignores which input directions a layer actually sees, and a trained model converted that way
starts QAT far from itself. GPTQ rounds one input column at a time and moves each column's
rounding error onto the columns not yet rounded, weighted by the inverse of H = sum x x^T
over calibration inputs, so that the layer's outputs on those inputs move as little as the
grid allows (the Optimal Brain Surgeon update, done column by column in blocks). The result
is still one scale and ternary codes per matrix: the formats we export are unchanged.
QAT can start from it (`qat.init: gptq`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from agent_forge.bitnet.quantize import weight_scale


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (H damped by `damp` x its mean diagonal): row i from
    column i on holds the OBS update for column i given that columns < i are already fixed."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs never seen: any rounding of their weights is free
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True).float()


@torch.no_grad()
def ternary_gptq(weight: torch.Tensor, hessian: torch.Tensor, gamma: float | torch.Tensor,
                 block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Ternary codes (int8, weight's shape) of `weight` (out x in) at scale `gamma`, chosen
    column by column with GPTQ's error feedback under `hessian` (in x in)."""
    w = weight.detach().float().clone()
    u = _inverse_cholesky(hessian, damp)
    w[:, torch.diag(hessian) == 0] = 0.0
    gamma = float(gamma)
    codes = torch.zeros_like(w)
    n = w.shape[1]
    for start in range(0, n, block):
        end = min(start + block, n)
        part, errs = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start)
        for i in range(end - start):
            col = part[:, i]
            q = (col / gamma).round().clamp(-1, 1)
            codes[:, start + i] = q
            err = (col - q * gamma) / u[start + i, start + i]
            part[:, i:] -= err.unsqueeze(1) * u[start + i, start + i:end].unsqueeze(0)
            errs[:, i] = err
        w[:, end:] -= errs @ u[start:end, end:]
    return codes.to(torch.int8)


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a BitLinear multiplies by its weight at full strength: its input after its own
    RMSNorm when it has one (activation quantisation aside)."""
    norm = getattr(module, "rms_norm", None)
    return norm(x) if norm is not None else x


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """H = sum over non-padding tokens of x x^T for every BitLinear, its inputs taken in the
    full-precision model (every strength 0 while measuring, then restored)."""
    from agent_forge.bitnet.bitlinear import BitLinear, observe_inputs

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in layers}

    def observe(name, module, x, keep):
        rows = layer_inputs(module, x)[keep].float().reshape(-1, x.shape[-1]).cpu()
        hessians[name].addmm_(rows.t(), rows)

    observe_inputs(model, batches, layers, observe)
    return hessians


def output_error(weight: torch.Tensor, codes: torch.Tensor, gamma: float, hessian: torch.Tensor) -> float:
    """sum over calibration inputs of |W x - gamma q x|^2 = tr(D H D^T), D = W - gamma q."""
    d = weight.detach().float() - float(gamma) * codes.float()
    return float(((d @ hessian.float()) * d).sum())


@torch.no_grad()
def gptq_initialise(model: nn.Module, batches: Iterable[dict], block: int = 128, damp: float = 0.01,
                    progress=None) -> dict:
    """Round every BitLinear of `model` with GPTQ and store the result as its weight, scaled
    so that the layer's own quantiser (its scale method) reproduces exactly these codes and
    this gamma. Returns the output error before (nearest rounding) and after, summed."""
    from agent_forge.bitnet.bitlinear import BitLinear
    from agent_forge.bitnet.quantize import ternary

    hessians = collect_hessians(model, batches)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]
    before = after = 0.0
    for i, (name, layer) in enumerate(layers):
        nearest, gamma = ternary(layer.weight, layer.scale_method)
        codes = ternary_gptq(layer.weight, hessians[name], gamma, block, damp)
        before += output_error(layer.weight, nearest, gamma, hessians[name])
        after += output_error(layer.weight, codes, gamma, hessians[name])
        store_codes(layer, codes, gamma)
        del hessians[name]
        if progress is not None:
            progress(i + 1, len(layers))
    return {"layers": len(layers), "output_error_nearest": before, "output_error_gptq": after}


def store_codes(layer: nn.Module, codes: torch.Tensor, gamma: float | torch.Tensor) -> None:
    """Set layer.weight to c * codes with c chosen so that its scale method gives back gamma and
    rounding gives back the codes (both scales are proportional to the weight: absmean of
    c * codes is c * (share of non-zero codes), and mse's Lloyd fit returns c)."""
    q = codes.float()
    if not q.abs().sum():
        layer.weight.zero_()
        return
    c = float(gamma) / float(weight_scale(q, layer.scale_method))
    layer.weight.copy_((c * q).to(layer.weight.dtype))
