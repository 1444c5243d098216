"""QK-clip (the "Clip" of MuonClip, Kimi K2): keep attention logits bounded by tau.

SDPA and flash attention never materialise the logits, so we register our own attention
function with transformers' `AttentionInterface`: it records, per layer and per query head,
the largest pre-softmax logit (scale * q.k, over unmasked positions only) and then calls the
stock SDPA implementation, so the model's outputs are unchanged. After each optimiser step
`QKClip.apply()` rescales every head whose max logit exceeded tau:

* multi-head attention (one key head per query head): that head's rows of W_q and W_k (and
  their biases) are each multiplied by sqrt(tau / max_logit), so its logits shrink by
  exactly tau / max_logit;
* grouped-query attention (a key head shared by several query heads): only the query head's
  rows are multiplied, by the full factor tau / max_logit, so the shared key head and the
  other query heads of its group are untouched (K2 does the same for its shared rotary key).

RoPE is linear and per head, so scaling projection rows scales post-RoPE q and k alike.
Supported: modules with `q_proj`/`k_proj` (Llama, Qwen2, Mistral, SmolLM...), GPT-2's fused
`c_attn` (Conv1D), and PEFT LoRA wrappers of them (base rows and lora_B rows both scaled).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "qk_clip_sdpa"

# attention module -> the QKClip recording it (weak, so a dropped model frees its recorder)
_RECORDERS: "weakref.WeakKeyDictionary[nn.Module, QKClip]" = weakref.WeakKeyDictionary()


def _allowed_positions(attention_mask, causal: bool, start: int, stop: int,
                       kv_len: int, device) -> torch.Tensor | None:
    """Boolean 'may attend' for query rows [start, stop) (broadcastable to B,H,rows,K)."""
    if attention_mask is None:
        if not causal:
            return None
        rows = torch.arange(start, stop, device=device)[:, None]
        return rows >= torch.arange(kv_len, device=device)[None, :]
    mask = attention_mask[..., start:stop, :kv_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask: ~-inf means masked


@torch.no_grad()
def max_logits_per_head(query: torch.Tensor, key: torch.Tensor, attention_mask,
                        scaling: float | None, is_causal: bool, chunk: int = 256) -> torch.Tensor:
    """Max over batch, query and (unmasked) key positions of scale * q.k, per query head.

    query: (B, Hq, Q, D); key: (B, Hkv, K, D). Follows SDPA's conventions exactly: a None
    mask with is_causal and Q > 1 means a causal mask aligned at the top-left (keys cropped
    to Q, as transformers' sdpa wrapper does). Returns a float32 tensor (Hq,).
    """
    n_heads, q_len, head_dim = query.shape[1], query.shape[2], query.shape[3]
    scale = head_dim ** -0.5 if scaling is None else scaling
    k = key.detach().float()
    if key.shape[1] != n_heads:
        k = k.repeat_interleave(n_heads // key.shape[1], dim=1)
    causal = attention_mask is None and is_causal and q_len > 1
    if causal and k.shape[2] > q_len:
        k = k[:, :, :q_len]
    kt = k.transpose(-1, -2)
    out = torch.full((n_heads,), float("-inf"), device=query.device)
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        scores = (query[:, :, start:stop].detach().float() @ kt) * scale
        allowed = _allowed_positions(attention_mask, causal, start, stop, k.shape[2], query.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.maximum(out, scores.amax(dim=(0, 2, 3)))
    return out


def recording_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, is_causal=None, **kwargs):
    """The registered attention function: record max logits, then run stock SDPA."""
    recorder = _RECORDERS.get(module)
    if recorder is not None and recorder.enabled:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        recorder.record(module, max_logits_per_head(query, key, attention_mask, scaling,
                                                    bool(causal), recorder.chunk))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def register_attention() -> str:
    """Register the recording function (and SDPA's mask builder) under ATTN_NAME."""
    AttentionInterface.register(ATTN_NAME, recording_sdpa_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


def _base_and_lora(layer: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """Unwrap a PEFT LoRA layer into its base layer and its lora_B layers."""
    base = getattr(layer, "base_layer", layer)
    lora_b = list(getattr(layer, "lora_B", {}).values()) if hasattr(layer, "base_layer") else []
    return base, lora_b


@torch.no_grad()
def _scale_outputs(layer: nn.Module, start: int, stop: int, factor: float) -> None:
    """Multiply output features [start, stop) of a Linear or Conv1D (and LoRA B) by factor."""
    base, lora_b = _base_and_lora(layer)
    if isinstance(base, nn.Linear):
        base.weight[start:stop].mul_(factor)
    else:  # transformers Conv1D stores weight as (in_features, out_features)
        base.weight[:, start:stop].mul_(factor)
    if getattr(base, "bias", None) is not None:
        base.bias[start:stop].mul_(factor)
    for b in lora_b:
        b.weight[start:stop].mul_(factor)


class _Entry:
    """How to find one attention module's per-head q and k output features."""

    def __init__(self, module: nn.Module):
        self.fused = not hasattr(module, "q_proj")
        self.head_dim = int(module.head_dim)
        if self.fused:  # GPT-2: c_attn outputs [q | k | v], each embed_dim wide
            self.q_layer = self.k_layer = module.c_attn
            self.n_heads = self.n_kv = int(module.num_heads)
            self.k_offset = self.n_heads * self.head_dim
        else:
            self.q_layer, self.k_layer = module.q_proj, module.k_proj
            self.n_heads = _out_features(module.q_proj) // self.head_dim
            self.n_kv = _out_features(module.k_proj) // self.head_dim
            self.k_offset = 0
        self.layer_idx = getattr(module, "layer_idx", None)

    def clip_head(self, head: int, gamma: float) -> None:
        hd = self.head_dim
        if self.n_kv == self.n_heads:
            root = math.sqrt(gamma)
            _scale_outputs(self.q_layer, head * hd, (head + 1) * hd, root)
            start = self.k_offset + head * hd
            _scale_outputs(self.k_layer, start, start + hd, root)
        else:  # GQA: shared key head stays, the query head takes the whole factor
            _scale_outputs(self.q_layer, head * hd, (head + 1) * hd, gamma)


def _out_features(layer: nn.Module) -> int:
    base, _ = _base_and_lora(layer)
    return int(base.weight.shape[0] if isinstance(base, nn.Linear) else base.weight.shape[1])


def _is_attention(module: nn.Module) -> bool:
    if hasattr(module, "q_proj") and hasattr(module, "k_proj") and hasattr(module, "head_dim"):
        return True
    return (hasattr(module, "c_attn") and hasattr(module, "num_heads")
            and not getattr(module, "is_cross_attention", False))


class QKClip:
    """Record per-head max attention logits during forwards; clip heads above tau.

    `QKClip(model, tau)` switches the model to the recording attention function (restore
    with `remove()`). Call `apply()` after every optimiser step: it clips and then clears the
    record. Set `enabled = False` to stop recording (the SDPA path is then the only cost).
    Raises ValueError if the model has no supported attention module.
    """

    def __init__(self, model: nn.Module, tau: float, enabled: bool = True, chunk: int = 256):
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.model, self.tau, self.enabled, self.chunk = model, float(tau), enabled, int(chunk)
        self.entries: dict[str, _Entry] = {}
        self._names: dict[int, str] = {}
        for name, module in model.named_modules():
            if _is_attention(module):
                self.entries[name] = _Entry(module)
                self._names[id(module)] = name
                _RECORDERS[module] = self
        if not self.entries:
            raise ValueError(f"QK-clip: no q_proj/k_proj or GPT-2 c_attn attention found in "
                             f"{type(model).__name__}; not supported")
        self.max_logits: dict[str, torch.Tensor] = {}
        self.last_stats: dict = {}
        self._previous_impl = getattr(model.config, "_attn_implementation", None)
        model.set_attn_implementation(register_attention())

    def record(self, module: nn.Module, head_max: torch.Tensor) -> None:
        """Keep the running per-head maximum for this module since the last apply()."""
        name = self._names.get(id(module))
        if name is None:
            return
        prev = self.max_logits.get(name)
        self.max_logits[name] = head_max if prev is None else torch.maximum(prev, head_max)

    def reset(self) -> None:
        self.max_logits = {}

    @torch.no_grad()
    def apply(self) -> dict:
        """Clip every recorded head whose max logit > tau; return what was done.

        Stats: max_logit (over all layers and heads, before clipping; None if nothing was
        recorded), heads_clipped, heads_seen, per_layer {module name: [max per head]}.
        """
        per_layer, clipped, overall = {}, 0, None
        for name, logits in self.max_logits.items():
            values = logits.tolist()
            per_layer[name] = values
            entry = self.entries[name]
            for head, value in enumerate(values):
                if math.isfinite(value) and value > self.tau:
                    entry.clip_head(head, self.tau / value)
                    clipped += 1
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                overall = max(finite) if overall is None else max(overall, max(finite))
        self.last_stats = {"max_logit": overall, "heads_clipped": clipped,
                           "heads_seen": sum(len(v) for v in per_layer.values()),
                           "per_layer": per_layer}
        self.reset()
        return self.last_stats

    def remove(self) -> None:
        """Stop recording and give the model back its previous attention implementation."""
        for module in self.model.modules():
            if _RECORDERS.get(module) is self:
                del _RECORDERS[module]
        if self._previous_impl is not None:
            self.model.set_attn_implementation(self._previous_impl)
        self.reset()
