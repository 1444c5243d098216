"""The BitNet b1.58 quantisers (Ma et al. 2024), written out as the paper states them.

Weights: absmean scale gamma = mean|W|, W_q = clamp(round(W / gamma), -1, 1).
(Or, converting a trained model, the gamma that minimises the rounding error: `WEIGHT_SCALES`.)
Activations: per-token absmax to int8, x_q = clamp(round(x * 127 / max|x|), -128, 127).
(Or as llama.cpp rounds the input of our GGUF's ternary matmuls: `ACT_QUANTS`.)
Training uses straight-through fake quantisation blended by a strength lambda in [0, 1];
export packs the ternary weights four to a byte in transformers' layout.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-5
VALUES_PER_BYTE = 4
# How gamma is chosen. "absmean": the paper's mean|W|, right for weights trained ternary from
# the start. "mse": the gamma that minimises |W - gamma * q|^2 for q = clamp(round(W / gamma)),
# found by Lloyd's iterations from absmean. A trained model's weights are bell-shaped or
# heavier-tailed, and there absmean rounds too many of them to +-1: on Gaussian weights the
# optimum is 1.53 x absmean (squared error 0.19 of the variance, absmean's 0.26), on Laplace
# weights 2.0 x (0.26 vs 0.39). Either way the result is codes and one scale per matrix, the
# format transformers and llama.cpp read.
WEIGHT_SCALES = ("absmean", "mse")
# How a ternary matmul's input is rounded to 8 bits. "token": the paper's absmax per token,
# which transformers' BitNet format runs, so the saved HF file reproduces our logits exactly.
# "llamacpp": as llama.cpp computes the GGUF we write: inputs rounded per block of 256 values
# (Q8_K, beside TQ2_0 rows) or of 32 with an fp16 scale (Q8_0, beside the Q4_0-coded rows
# of widths that are not a multiple of 256), and each matrix's gamma in fp16, as both block
# types store it; so the model trained and measured is the GGUF's arithmetic, and the HF
# file differs from it by that rounding.
ACT_QUANTS = ("token", "llamacpp")
QK_K, QK8_0 = 256, 32  # llama.cpp's block widths: TQ2_0 / Q8_K, and Q8_0
MSE_ITERATIONS = 10
MSE_SAMPLE = 1 << 16  # weights a gamma is fitted on (see mse_scale)


def absmean(w: torch.Tensor) -> torch.Tensor:
    """gamma: the mean absolute weight (float32, 0-d), kept away from zero for all-zero weights."""
    return w.float().abs().mean().clamp(min=EPS)


def mse_scale(w: torch.Tensor, iterations: int = MSE_ITERATIONS, sample: int = MSE_SAMPLE) -> torch.Tensor:
    """gamma minimising the ternary rounding error, by Lloyd's algorithm: given the codes, the
    best scale is the mean |w| over the non-zero codes; given the scale, the best codes are
    the rounded ones. Each round lowers the error; from absmean it settles in ~10 rounds.

    A matrix larger than `sample` weights is fitted on an evenly strided sample of about that
    many (the stride shares no factor with the row length, so every column is visited): gamma
    is one number, and fitting it on every weight of every matrix at every training step cost
    a fifth of the step."""
    flat = w.detach().reshape(-1)
    stride = max(1, flat.numel() // sample)
    while stride > 1 and math.gcd(stride, w.shape[-1]) != 1:
        stride += 1
    a = flat[::stride].float().abs()
    gamma = a.mean().clamp(min=EPS)
    for _ in range(iterations):
        nonzero = a > 0.5 * gamma  # round(|w| / gamma) >= 1 (torch rounds half to even: 0.5 -> 0)
        count = nonzero.sum()
        if count == 0:
            break
        gamma = (a * nonzero).sum().div(count).clamp(min=EPS)
    return gamma


def weight_scale(w: torch.Tensor, method: str = "absmean") -> torch.Tensor:
    """gamma of `w` by `method` (see WEIGHT_SCALES)."""
    if method == "absmean":
        return absmean(w)
    if method == "mse":
        return mse_scale(w)
    raise ValueError(f"weight scale must be one of {', '.join(WEIGHT_SCALES)}, not {method!r}")


def ternary(w: torch.Tensor, method: str = "absmean") -> tuple[torch.Tensor, torch.Tensor]:
    """(q, gamma): q = clamp(round(w / gamma), -1, 1) as int8, so that w ~ q * gamma."""
    gamma = weight_scale(w, method)
    q = (w.float() / gamma).round().clamp(-1, 1).to(torch.int8)
    return q, gamma


def act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) per token (last dim): scale = 127 / max|x|, q = clamp(round(x * scale), -128, 127).

    q is a float32 tensor holding integers; x ~ q / scale."""
    xf = x.float()
    scale = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    q = (xf * scale).round().clamp(-128, 127)
    return q, scale


def act_llamacpp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x rounded as llama.cpp rounds it, a scale of 1): per block of 256 (width a multiple of
    256: Q8_K, fp32 scale) or of 32 (Q8_0, fp16 scale), q = round(x * 127 / max|block|) with
    ties to even (ggml's rounding), value q * d, d = max|block| / 127. The block scales
    cannot be taken out of the matmul, so the first element holds the rounded values."""
    width = x.shape[-1]
    block = QK_K if width % QK_K == 0 else QK8_0
    if width % block:
        raise ValueError(f"llama.cpp rounds activations in blocks of {QK8_0}; a width of {width} has none")
    xb = x.float().reshape(*x.shape[:-1], width // block, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = (xb * inverse).round()
    d = 1.0 / inverse.clamp(min=EPS) if block == QK_K else (amax / 127.0).half().float()
    return (q * d).reshape(x.shape), torch.ones((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)


def act_quant(x: torch.Tensor, method: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with x ~ q / scale, rounded by `method` (see ACT_QUANTS)."""
    if method == "token":
        return act_int8(x)
    if method == "llamacpp":
        return act_llamacpp(x)
    raise ValueError(f"act_quant must be one of {', '.join(ACT_QUANTS)}, not {method!r}")


def engine_scale(gamma: torch.Tensor, method: str = "token") -> torch.Tensor:
    """gamma as the engine that `method` mirrors multiplies by it: fp16 for llama.cpp (the
    block scale of TQ2_0 and Q4_0 rows), as computed for transformers' format."""
    return gamma.half().float() if method == "llamacpp" else gamma


def _straight_through(x: torch.Tensor, target: torch.Tensor, strength: float) -> torch.Tensor:
    """x + strength * (target - x), with the gradient w.r.t. x the identity.

    The value is taken from lerp, which is exactly x at strength 0 and exactly target at
    strength 1; `xf - xf.detach()` adds zero to the value and the identity to the gradient."""
    xf = x.float()
    with torch.no_grad():
        mixed = torch.lerp(xf, target, float(strength))
    return (mixed + (xf - xf.detach())).to(x.dtype)


def fake_quant_weight(w: torch.Tensor, strength: float = 1.0, method: str = "absmean") -> torch.Tensor:
    """The weight as the forward pass should see it: blended toward q * gamma, gradient passed straight."""
    with torch.no_grad():
        q, gamma = ternary(w, method)
        target = q.float() * gamma
    return _straight_through(w, target, strength)


def fake_quant_act(x: torch.Tensor, strength: float = 1.0, method: str = "token") -> torch.Tensor:
    """Activations blended toward their 8-bit round trip q / scale, gradient passed straight."""
    with torch.no_grad():
        q, scale = act_quant(x, method)
        target = q / scale
    return _straight_through(x, target, strength)


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """Pack ternary values four to a byte along dim 0, as transformers' `pack_weights` does.

    Value v is stored as v + 1 in two bits; packed row j holds rows j, j+R, j+2R, j+3R
    (bits 0-1, 2-3, 4-5, 6-7) with R = ceil(rows / 4). Missing tail rows stay 0 bits."""
    if q.numel() and (q.min() < -1 or q.max() > 1):
        raise ValueError("pack_ternary: values must be in {-1, 0, 1}")
    rows = q.shape[0]
    packed_rows = -(-rows // VALUES_PER_BYTE)
    shifted = torch.zeros((VALUES_PER_BYTE * packed_rows, *q.shape[1:]), dtype=torch.uint8, device=q.device)
    shifted[:rows] = (q.to(torch.int16) + 1).to(torch.uint8)
    parts = shifted.view(VALUES_PER_BYTE, packed_rows, *q.shape[1:])
    packed = parts[0].clone()
    for i in range(1, VALUES_PER_BYTE):
        packed |= parts[i] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The int8 ternary tensor of `rows` rows that `pack_ternary` packed into `packed`."""
    packed_rows = packed.shape[0]
    if not VALUES_PER_BYTE * (packed_rows - 1) < rows <= VALUES_PER_BYTE * packed_rows:
        raise ValueError(f"unpack_ternary: {packed_rows} packed rows cannot hold {rows} rows")
    parts = [(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)]
    return (torch.cat(parts, dim=0)[:rows].to(torch.int8) - 1)
