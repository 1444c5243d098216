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

Models that normalise q and k after the projection (`q_norm`/`k_norm`: Qwen3, OLMo2...)
undo any scaling of W_q rows, so there the norm weights carry the clip instead: a norm as
wide as all heads (OLMo2) is scaled per head as above; a norm shared by all heads (Qwen3,
head_dim wide) can only be scaled as a whole, so such a layer is clipped by its largest
head's factor. A norm whose output does not scale with its weight (Gemma's 1 + w) cannot
carry the clip: such models are refused.

Only real positions count: a query row counts only if it may attend to its own position
(padding rows may not), and keys only where the mask allows. Under torch.distributed the
per-head maxima are max-reduced across ranks before deciding, so every rank clips the same
heads. Each `apply()` counts the heads it clipped (`last_stats`, and over the run `steps`
and `steps_fired`); the optimiser exposes them for the trainers to log.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
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
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # additive float mask: ~-inf means masked
    return mask & _real_query_rows(mask, start, kv_len - attention_mask.shape[-2])


def _real_query_rows(allowed: torch.Tensor, start: int, offset: int) -> torch.Tensor:
    """Rows that may attend to their own position (padding rows may not), as (..., rows, 1).

    Query row i sits at key position i + offset (offset = cached keys before the queries).
    """
    rows = allowed.shape[-2]
    own = torch.arange(start, start + rows, device=allowed.device) + offset
    if offset < 0 or int(own[-1]) >= allowed.shape[-1]:
        return torch.ones_like(allowed[..., :1])  # no self position to read: keep every row
    return allowed[..., torch.arange(rows, device=allowed.device), own].unsqueeze(-1)


@torch.no_grad()
def max_logits_per_head(query: torch.Tensor, key: torch.Tensor, attention_mask,
                        scaling: float | None, is_causal: bool, chunk: int = 256) -> torch.Tensor:
    """Max over batch, real query rows and (unmasked) key positions of scale * q.k, per
    query head.

    query: (B, Hq, Q, D); key: (B, Hkv, K, D). Follows SDPA's conventions exactly: a None
    mask with is_causal and Q > 1 means a causal mask aligned at the top-left (keys cropped
    to Q, as transformers' sdpa wrapper does). With a mask, a query row counts only if it
    may attend to its own position, so padding rows never count (SDPA lets a right-padded
    row attend to the real keys before it). Returns a float32 tensor (Hq,).
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


class _Side:
    """Where one side's (q or k) scale lives: projection output features or a norm's weight."""

    def __init__(self, layer: nn.Module, offset: int = 0, per_head: bool = True,
                 norm: bool = False):
        self.layer, self.offset, self.per_head, self.norm = layer, offset, per_head, norm

    def scale(self, head: int | None, hd: int, factor: float) -> None:
        """Scale one head's features by factor (head None, or a shared norm: all of them)."""
        if self.norm:
            _scale_norm(self.layer, head if self.per_head else None, hd, factor)
        else:
            start = self.offset + head * hd
            _scale_outputs(self.layer, start, start + hd, factor)


@torch.no_grad()
def _scale_norm(norm: nn.Module, head: int | None, hd: int, factor: float) -> None:
    """Multiply a norm's weight (and bias), or one head's slice of it, by factor."""
    idx = slice(None) if head is None else slice(head * hd, (head + 1) * hd)
    for p in (norm.weight, getattr(norm, "bias", None)):
        if isinstance(p, torch.Tensor):
            p.view(-1)[idx].mul_(factor)


_NORM_NAMES = {"q": ("q_norm", "q_layernorm", "query_norm"),
               "k": ("k_norm", "k_layernorm", "key_norm")}


def _qk_norms(module: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """The norms applied to q and k after their projections: {"q"|"k": (name, module)}."""
    found = {}
    for side, names in _NORM_NAMES.items():
        for name in names:
            norm = getattr(module, name, None)
            if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
                found[side] = (name, norm)
                break
    return found


@torch.no_grad()
def _scales_with_weight(norm: nn.Module) -> bool:
    """Does doubling the norm's own parameters double its output (y = w * normalised x)?"""
    w = norm.weight
    x = torch.randn((3, *w.shape), generator=torch.Generator().manual_seed(0))
    x = x.to(w.device, w.dtype)
    doubled = {n: p * 2 for n, p in norm.named_parameters(recurse=False)}
    out = functional_call(norm, doubled, (x,))
    return torch.allclose(out.float(), 2 * norm(x).float(), rtol=1e-2, atol=1e-3)


def _norm_side(norm: nn.Module, n_heads: int, hd: int, where: str) -> _Side:
    """A q/k norm as the carrier of the clip, or ValueError when it cannot carry it."""
    w = getattr(norm, "weight", None)
    if (not isinstance(w, torch.Tensor) or w.numel() not in (hd, n_heads * hd)
            or not _scales_with_weight(norm)):
        raise ValueError(f"QK-clip: {where} ({type(norm).__name__}) normalises q/k after the "
                         f"projection, so scaling W_q/W_k rows does nothing, and its weight "
                         f"cannot carry the clip either; not supported")
    return _Side(norm, per_head=w.numel() == n_heads * hd, norm=True)


class _Entry:
    """How to find one attention module's per-head q and k scales."""

    def __init__(self, module: nn.Module, name: str):
        self.head_dim = hd = int(module.head_dim)
        if not hasattr(module, "q_proj"):  # GPT-2: c_attn outputs [q | k | v], each embed_dim wide
            self.n_heads = self.n_kv = int(module.num_heads)
            q, k = _Side(module.c_attn), _Side(module.c_attn, self.n_heads * hd)
        else:
            self.n_heads = _out_features(module.q_proj) // hd
            self.n_kv = _out_features(module.k_proj) // hd
            q, k = _Side(module.q_proj), _Side(module.k_proj)
        norms = _qk_norms(module)
        if "q" in norms:
            q = _norm_side(norms["q"][1], self.n_heads, hd, f"{name}.{norms['q'][0]}")
        if "k" in norms:
            k = _norm_side(norms["k"][1], self.n_kv, hd, f"{name}.{norms['k'][0]}")
        self.q, self.k = q, k
        self.per_head = q.per_head  # False: a shared q norm, clipped per layer
        self.layer_idx = getattr(module, "layer_idx", None)

    def clip_head(self, head: int, gamma: float) -> None:
        """Shrink one query head's logits by gamma."""
        hd = self.head_dim
        if self.n_kv == self.n_heads and self.k.per_head:
            root = math.sqrt(gamma)
            self.q.scale(head, hd, root)
            self.k.scale(head, hd, root)
        else:  # GQA (or a shared k norm): k stays, the query head takes the whole factor
            self.q.scale(head, hd, gamma)

    def clip_layer(self, gamma: float) -> None:
        """Shrink every head's logits by gamma (the q norm is shared by all heads)."""
        if not self.k.per_head:
            root = math.sqrt(gamma)
            self.q.scale(None, self.head_dim, root)
            self.k.scale(None, self.head_dim, root)
        else:
            self.q.scale(None, self.head_dim, gamma)


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
        modules = {name: m for name, m in model.named_modules() if _is_attention(m)}
        self.entries = {name: _Entry(m, name) for name, m in modules.items()}  # may refuse
        self._names: dict[int, str] = {id(m): name for name, m in modules.items()}
        for module in modules.values():
            _RECORDERS[module] = self
        if not self.entries:
            raise ValueError(f"QK-clip: no q_proj/k_proj or GPT-2 c_attn attention found in "
                             f"{type(model).__name__}; not supported")
        self.max_logits: dict[str, torch.Tensor] = {}
        self.last_stats: dict = {}
        self.steps = self.steps_fired = 0  # apply() calls, and those that clipped something
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
        recorded), heads_clipped, heads_seen, per_layer {module name: [max per head]}, and
        over the run: steps (calls) and steps_fired (calls that clipped a head).
        """
        per_layer, clipped = {}, 0
        for name, logits in self._agreed_max_logits().items():
            per_layer[name] = values = logits.tolist()
            clipped += self._clip(self.entries[name], values)
        finite = [v for values in per_layer.values() for v in values if math.isfinite(v)]
        self.steps += 1
        self.steps_fired += int(clipped > 0)
        self.last_stats = {"max_logit": max(finite) if finite else None,
                           "heads_clipped": clipped,
                           "heads_seen": sum(len(v) for v in per_layer.values()),
                           "per_layer": per_layer, "steps": self.steps,
                           "steps_fired": self.steps_fired}
        self.reset()
        return self.last_stats

    def _clip(self, entry: _Entry, values: list[float]) -> int:
        """Clip one layer's heads above tau; return how many were above."""
        over = {h: v for h, v in enumerate(values) if math.isfinite(v) and v > self.tau}
        if over and entry.per_head:
            for head, value in over.items():
                entry.clip_head(head, self.tau / value)
        elif over:
            entry.clip_layer(self.tau / max(over.values()))
        return len(over)

    def _agreed_max_logits(self) -> dict[str, torch.Tensor]:
        """The recorded maxima, max-reduced over ranks when torch.distributed runs, so every
        rank clips the same heads (each rank saw only its own batch)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.max_logits
        device = next(self.model.parameters()).device
        flat = torch.cat([self.max_logits.get(name, torch.full((e.n_heads,), -math.inf))
                          .to(device, torch.float32) for name, e in self.entries.items()])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        parts = flat.split([e.n_heads for e in self.entries.values()])
        return {name: t for name, t in zip(self.entries, parts)
                if name in self.max_logits or bool((t > -math.inf).any())}

    def remove(self) -> None:
        """Stop recording and give the model back its previous attention implementation."""
        for module in self.model.modules():
            if _RECORDERS.get(module) is self:
                del _RECORDERS[module]
        if self._previous_impl is not None:
            self.model.set_attn_implementation(self._previous_impl)
        self.reset()
