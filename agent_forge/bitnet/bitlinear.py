"""BitLinear: the training-time BitNet layer, a drop-in for nn.Linear / GPT-2 Conv1D.

It keeps a full-precision weight and fake-quantises weight (ternary) and input (int8) on
the fly, blended by `strength` so a trainer can ramp quantisation in. An optional RMSNorm
(`rms_norm`) before the activation quantiser matches transformers' BitLinear, so a trained
layer exports to it key for key.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from agent_forge.bitnet.quantize import (ACT_QUANTS, act_quant, engine_scale, fake_quant_act, fake_quant_weight,
                                         ternary, weight_scale)


class ActNorm(nn.Module):
    """RMSNorm computed exactly as transformers' LlamaRMSNorm, so `rms_norm.weight` loads there."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps
        # True when it took over a block norm's gains (convert.share_block_norms): then it is
        # part of the original function and applies at every strength, and is not calibrated.
        self.absorbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class BitLinear(nn.Module):
    """A linear layer trained toward ternary weights and int8 inputs (BitNet b1.58).

    `strength` (0..1, set by the trainer, not saved) blends from the original linear (0)
    to the fully quantised layer (1). `scale_method` chooses gamma (quantize.WEIGHT_SCALES),
    `act_method` how the input is rounded (quantize.ACT_QUANTS)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, act_norm: bool = True,
                 eps: float = 1e-6, *, scale_method: str = "absmean", act_method: str = "token",
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.rms_norm = ActNorm(in_features, eps, device=device, dtype=dtype) if act_norm else None
        self.strength = 1.0
        weight_scale(torch.ones(1), scale_method)  # an unknown method fails here, not mid-training
        self.scale_method = scale_method
        if act_method not in ACT_QUANTS:
            raise ValueError(f"act_quant must be one of {', '.join(ACT_QUANTS)}, not {act_method!r}")
        self.act_method = act_method
        self._frozen = None  # (weight version key, q_w as float, weight_scale): inference without grad
        self._blended = None  # (weight version key, strength, blended weight): the same below strength 1

    @classmethod
    def from_module(cls, module: nn.Module, act_norm: bool = True, eps: float = 1e-6,
                    scale_method: str = "absmean", act_method: str = "token") -> "BitLinear":
        """A BitLinear with the weights of an nn.Linear or a GPT-2 Conv1D (whose weight is (in, out))."""
        from transformers.pytorch_utils import Conv1D

        if isinstance(module, nn.Linear):
            weight = module.weight
        elif isinstance(module, Conv1D):
            weight = module.weight.t()
        else:
            raise TypeError(f"BitLinear.from_module: cannot convert {type(module).__name__}")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, module.bias is not None, act_norm, eps,
                    scale_method=scale_method, act_method=act_method, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        layer.requires_grad_(module.weight.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        strength = float(self.strength)
        if torch.is_grad_enabled():  # a training step may follow, and a fused optimiser (torch's
            self._frozen = self._blended = None  # fused AdamW) changes the weight without bumping its version
        if self.rms_norm is not None:
            x = self.rms_norm(x) if self.rms_norm.absorbed else torch.lerp(x, self.rms_norm(x), strength)
        if strength == 0.0:  # the original linear exactly (fake_quant_* at 0 return their input)
            return F.linear(x, self.weight, self.bias)
        if strength == 1.0 and not torch.is_grad_enabled():
            return _ternary_value(x, *act_quant(x, self.act_method), *self._frozen_ternary(), self.bias)
        if strength == 1.0:
            return _TernaryLinear.apply(x, self.weight, self.bias, self.scale_method, self.act_method)
        x = fake_quant_act(x, strength, self.act_method)
        weight = fake_quant_weight(self.weight, strength, self.scale_method) if torch.is_grad_enabled() else self._blended_weight(strength)
        return F.linear(x, weight, self.bias)

    def _weight_key(self) -> tuple:
        w = self.weight
        return (w._version, w.data_ptr(), w.device, w.dtype, self.act_method)

    def _blended_weight(self, strength: float) -> torch.Tensor:
        """fake_quant_weight(weight, strength) for a no-grad forward, recomputed only when the
        weight or the strength changes (evaluating mid warm-in decodes token by token too)."""
        key = self._weight_key()
        if self._blended is None or self._blended[:2] != (key, strength):
            self._blended = (key, strength, fake_quant_weight(self.weight.detach(), strength, self.scale_method))
        return self._blended[2]

    def _frozen_ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_w as float, weight_scale), recomputed only when the weight changes: decoding one
        token at a time otherwise spends more time re-quantising the weight than multiplying."""
        w, key = self.weight, self._weight_key()
        if self._frozen is None or self._frozen[0] != key:
            q_w, gamma = ternary(w.detach(), self.scale_method)
            gamma = engine_scale(gamma, self.act_method)
            self._frozen = (key, q_w.float(), (1.0 / gamma).to(w.dtype).float())
        return self._frozen[1], self._frozen[2]

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8, gamma) of the current weight: what export stores."""
        return ternary(self.weight.detach(), self.scale_method)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, strength={self.strength}, scale={self.scale_method}, "
                f"act={self.act_method}")


class _TernaryLinear(torch.autograd.Function):
    """Strength 1: F.linear(fake_quant_act(x), fake_quant_weight(w), b) with the value computed
    in transformers' BitLinear order: integer matmul, then / (weight_scale * input_scale),
    weight_scale = 1 / gamma as exported. The plain order rounds differently in the last bit,
    and activations that sit exactly on a .5 (common: they are ratios of integer sums) then
    round to another int8 value downstream; this order makes the export reproduce the model.
    Backward is the straight-through one of the plain formula."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale_method="absmean", act_method="token"):
        q_w, gamma = ternary(weight, scale_method)
        gamma = engine_scale(gamma, act_method)
        q_x, input_scale = act_quant(x, act_method)
        y = _ternary_value(x, q_x, input_scale, q_w.float(), (1.0 / gamma).to(weight.dtype).float(), bias)
        ctx.save_for_backward((q_x / input_scale).to(x.dtype), (q_w.float() * gamma).to(weight.dtype))
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x_fq, w_fq = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(w_fq.to(grad.dtype))
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = flat.t().matmul(x_fq.reshape(-1, x_fq.shape[-1]).to(grad.dtype)).to(w_fq.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b, None, None


def _ternary_value(x, q_x: torch.Tensor, input_scale: torch.Tensor, q_w: torch.Tensor,
                   weight_scale: torch.Tensor, bias) -> torch.Tensor:
    """The strength-1 output in transformers' BitLinear order (see _TernaryLinear), from the
    input's int8 codes and scale (computed once by the caller)."""
    y = (F.linear(q_x, q_w) / (weight_scale * input_scale)).to(x.dtype)
    return y if bias is None else y + bias


def _mask_for(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The token mask that matches x's leading dims; all tokens when the shapes differ."""
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        return mask.to(device=x.device, dtype=torch.bool)
    return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)


@torch.no_grad()
def calibrate_act_norms(model: nn.Module, batches: Iterable[dict]) -> int:
    """Set each BitLinear's rms_norm.weight to the mean input RMS it sees on `batches`.

    The RMSNorm rescales every token to RMS 1; with this weight the normalised input keeps
    the magnitude the next layers were trained on. Inputs are measured in the full-precision
    model (all strengths 0 while measuring, then restored), over non-padding tokens only.
    Returns the number of layers calibrated."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear) and m.rms_norm is not None
              and not m.rms_norm.absorbed]  # shared norms already hold the block norm's gains
    totals = {name: [0.0, 0] for name, _ in layers}

    def observe(name, module, x, keep):
        rms = x.float().pow(2).mean(-1).sqrt()
        totals[name][0] += float(rms[keep].sum())
        totals[name][1] += int(keep.sum())

    observe_inputs(model, batches, layers, observe)
    calibrated = 0
    for name, m in layers:
        total, count = totals[name]
        if count:
            m.rms_norm.weight.fill_(total / count)
            calibrated += 1
    return calibrated


def observe_inputs(model: nn.Module, batches: Iterable[dict], layers: list[tuple[str, nn.Module]],
                   observe: Callable) -> None:
    """Run each batch through `model` as the original (every BitLinear at strength 0, eval
    mode, no grad) and call observe(name, module, x, keep) with the input x of each of
    `layers` and keep, its real (non-padding) tokens; strengths and mode restored after."""
    every = [m for m in model.modules() if isinstance(m, BitLinear)]
    strengths, was_training = [m.strength for m in every], model.training
    current = {"mask": None}

    def hook_for(name):
        return lambda module, args: observe(name, module, args[0], _mask_for(args[0], current["mask"]))

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in layers]
    try:
        model.eval()
        for m in every:
            m.strength = 0.0
        device = next(model.parameters()).device
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            current["mask"] = torch.ones_like(ids) if mask is None else mask.to(device)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=current["mask"])
    finally:
        for h in handles:
            h.remove()
        for m, strength in zip(every, strengths):
            m.strength = strength
        model.train(was_training)
