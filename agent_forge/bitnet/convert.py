"""Turn a causal LM's linear layers into BitLinear layers, and inspect a converted model.

Embeddings and norms are never converted (they are not linear layers); the LM head is kept
in high precision by default, and a head tied to the input embedding is never touched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from agent_forge.bitnet.bitlinear import BitLinear
from agent_forge.bitnet.quantize import ACT_QUANTS, QK8_0, WEIGHT_SCALES

DEFAULT_KEEP = ("lm_head",)


class BitNetError(ValueError):
    """A model or argument BitNet cannot work with; the message is one line, fit for a CLI."""


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _quant_method(config) -> str | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method)).lower()


def is_ternary(model: nn.Module) -> bool:
    """True when the model already holds BitLinear layers or was loaded as a BitNet checkpoint."""
    if any(isinstance(m, BitLinear) for m in model.modules()):
        return True
    return _quant_method(getattr(model, "config", None)) == "bitnet"


def _check_causal_lm(model: nn.Module) -> None:
    """Refuse anything that is not a decoder-only transformers model with an LM head."""
    from transformers import PreTrainedModel

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise BitNetError(f"{name} is not a transformers model; BitNet needs a causal language model")
    causal = (model.can_generate() and model.get_output_embeddings() is not None
              and not getattr(model.config, "is_encoder_decoder", False))
    if not causal:
        raise BitNetError(f"{name} is not a causal language model (no LM head to generate with)")


def _input_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "weight", None)


def _out_features(module: nn.Module) -> int:
    """Output width of an nn.Linear (weight out x in) or a GPT-2 Conv1D (weight in x out)."""
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def _shares_storage(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and (a is b or a.data_ptr() == b.data_ptr())


def convert_to_bitnet(model: nn.Module, keep: Iterable[str] = DEFAULT_KEEP, act_norm: bool | str = True,
                      eps: float = 1e-6, scale_method: str = "absmean", act_method: str = "token") -> list[str]:
    """Replace every nn.Linear / Conv1D whose name contains no `keep` pattern by a BitLinear.

    act_norm: True (or "per_linear") gives every BitLinear its own RMSNorm; "shared" gives
    the linears that read one block norm's output (q/k/v, gate/up) one shared RMSNorm that
    takes over that block norm's gains (the block norm is frozen at ones), so the model is
    the BitNet b1.58 layout llama.cpp's `bitnet` architecture runs (see gguf_export.py);
    False: no norm. `scale_method` chooses each matrix's gamma (quantize.WEIGHT_SCALES),
    `act_method` how each input is rounded (quantize.ACT_QUANTS).
    Returns the converted names. Left alone whatever `keep` says: a linear
    sharing its weight with the input embedding (a tied head), and one whose output width is
    not a multiple of 4 (e.g. a Cognate memory's 3 gates), which transformers' packed
    format (four ternary values per byte along the output rows) cannot hold."""
    if act_norm not in (True, False, "per_linear", "shared", "none"):
        raise BitNetError(f"act_norm must be true, false, 'per_linear' or 'shared', not {act_norm!r}")
    shared = act_norm == "shared"
    if shared:
        eps = float(getattr(getattr(model, "config", None), "rms_norm_eps", None) or eps)
    if scale_method not in WEIGHT_SCALES:
        raise BitNetError(f"weight scale must be one of {', '.join(WEIGHT_SCALES)}, not {scale_method!r}")
    if act_method not in ACT_QUANTS:
        raise BitNetError(f"act_quant must be one of {', '.join(ACT_QUANTS)}, not {act_method!r}")
    act_norm = act_norm not in (False, "none")
    _check_causal_lm(model)
    if is_ternary(model):
        raise BitNetError(f"{type(model).__name__} is already ternary (BitNet); convert a full-precision model")
    keep = tuple(keep)
    embedding = _input_embedding_weight(model)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, _linear_types()) and not any(p in name for p in keep)
               and not _shares_storage(module.weight, embedding) and _out_features(module) % 4 == 0]
    if not targets:
        raise BitNetError(f"{type(model).__name__}: no linear layers to convert (keep={list(keep)})")
    if act_method == "llamacpp":
        _check_llamacpp_widths(targets)
    for name, module in targets:
        model.set_submodule(name, BitLinear.from_module(module, act_norm=act_norm, eps=eps, scale_method=scale_method,
                                                        act_method=act_method))
    if shared:
        share_block_norms(model, eps)
    return [name for name, _ in targets]


def _check_llamacpp_widths(targets: list[tuple[str, nn.Module]]) -> None:
    """llama.cpp rounds a matmul's input per block of 32 (or 256) values: every input width
    must hold whole blocks, or act_quant llamacpp has nothing to mirror."""
    for name, module in targets:
        width = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
        if width % QK8_0:
            raise BitNetError(f"act_quant llamacpp: {name} has {width} inputs, not a multiple of {QK8_0}, "
                              "the block llama.cpp rounds activations in; use act_quant token")


# (block norm, the linears reading its output) in a Llama-family decoder layer
SHARED_GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                 ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


@torch.no_grad()
def share_block_norms(model: nn.Module, eps: float) -> int:
    """Give each group of BitLinears that read one block norm a single shared ActNorm holding
    that norm's gains, and freeze the block norm at ones. RMSNorm(RMSNorm(x; 1); g) equals
    RMSNorm(x; g) up to eps, so the model computes what it did before. Returns groups shared."""
    from agent_forge.bitnet.bitlinear import ActNorm

    count = 0
    for _, layer in model.named_modules():
        for norm_name, linear_names in SHARED_GROUPS:
            norm = getattr(layer, norm_name, None)
            linears = [_get(layer, n) for n in linear_names]
            if norm is None or getattr(norm, "weight", None) is None or \
                    not all(isinstance(m, BitLinear) and m.rms_norm is not None for m in linears):
                continue
            weight = norm.weight
            act = ActNorm(weight.shape[0], eps, device=weight.device, dtype=linears[0].weight.dtype)
            act.weight.copy_(weight)
            act.absorbed = True  # calibration leaves it alone: it already reproduces the block norm
            for m in linears:
                m.rms_norm = act
            weight.fill_(1.0)
            weight.requires_grad_(False)
            count += 1
    return count


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def bitlinears(model: nn.Module) -> list[tuple[str, BitLinear]]:
    """Every BitLinear in the model with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]


def layer_groups(model: nn.Module) -> list[list[BitLinear]]:
    """The BitLinears by decoder layer, input side first: the units a progressive schedule
    quantises one after another. A layer is the first number in a module's dotted name
    (`model.layers.3.mlp.up_proj` -> 3); modules without one (none in a plain decoder) form
    one last group."""
    by_layer: dict[int, list[BitLinear]] = {}
    rest: list[BitLinear] = []
    for name, layer in bitlinears(model):
        index = next((int(part) for part in name.split(".") if part.isdigit()), None)
        (rest if index is None else by_layer.setdefault(index, [])).append(layer)
    return [by_layer[i] for i in sorted(by_layer)] + ([rest] if rest else [])


def set_strength(model: nn.Module, s: float) -> None:
    """Set the quantisation strength lambda of every BitLinear (0 = original, 1 = ternary)."""
    s = float(s)
    if not 0.0 <= s <= 1.0:
        raise BitNetError(f"quantisation strength must be in [0, 1], got {s}")
    for _, layer in bitlinears(model):
        layer.strength = s


@contextmanager
def activation_rounding(model: nn.Module, method: str):
    """Every BitLinear rounds its input by `method` (quantize.ACT_QUANTS) inside the block:
    e.g. "token", as transformers' BitNet format runs a saved model."""
    layers = [layer for _, layer in bitlinears(model)]
    before = [layer.act_method for layer in layers]
    try:
        for layer in layers:
            layer.act_method = method
        yield model
    finally:
        for layer, m in zip(layers, before):
            layer.act_method = m


@torch.no_grad()
def sparsity(model: nn.Module) -> dict:
    """Fraction of ternary weights that are zero, per BitLinear and overall (weighted by size)."""
    layers = bitlinears(model)
    if not layers:
        raise BitNetError(f"{type(model).__name__} has no BitLinear layers; convert it first")
    per_layer, zeros, total = {}, 0, 0
    for name, layer in layers:
        q, _ = layer.ternary()
        n_zero = int((q == 0).sum())
        per_layer[name] = n_zero / q.numel()
        zeros, total = zeros + n_zero, total + q.numel()
    return {"per_layer": per_layer, "overall": zeros / total}
