"""Attention for the parallel thought passes: each thought token attends to its own text prefix
and its own thought so far, and no other thought's keys are ever scored.

During pass p of `thoughts.generate_thoughts` the KV cache holds the text (T keys) followed by
p + 1 blocks of S keys, one block per pass: key T + q*S + s is token q of the thought at slot s.
Generic attention with a mask scores all T + (p+1)*S keys and then throws away all but the
prefix and the p + 1 own keys, so its cost grows with the square of the number of slots. Here
the text block is scored under a (rows, S, T) "may attend" mask and each slot's own keys are
read out of the blocks (a strided view), so a pass costs what one plain forward's attention
costs plus p + 1 dot products per query: the cost the pass count promises.

The function is registered with transformers' AttentionInterface and switched on only around
the passes (`split_attention`), so no modeling file is touched and every model whose
attention goes through the interface (Llama, Qwen2, Mistral, GPT-2, ...) gets it.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

ATTN_NAME = "forge_thought_split"
_TEXT_LEN: contextvars.ContextVar[int | None] = contextvars.ContextVar("forge_thought_text_len", default=None)


def thought_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor, scaling: float | None = None,
                              dropout: float = 0.0, softcap: float | None = None, **kwargs):
    """AttentionInterface signature. `query` (R, Hq, S, D): one new token per slot;
    `key`/`value` (R, Hkv, T + n*S, D); `attention_mask` (R, 1, S, T) bool over the text."""
    T = _TEXT_LEN.get()
    if T is None:
        raise RuntimeError(f"{ATTN_NAME} runs only inside thought_attention.split_attention()")
    R, Hq, S, D = query.shape
    Hkv = key.shape[1]
    n = (key.shape[2] - T) // S
    if T + n * S != key.shape[2] or attention_mask is None or attention_mask.shape[-1] != T:
        raise ValueError(f"cache of {key.shape[2]} keys is not text ({T}) + whole passes of {S} slots")
    q = query.view(R, Hkv, Hq // Hkv, S, D)        # query head h uses kv head h // groups (repeat_kv)
    k_own = key[:, :, T:].unflatten(2, (n, S))      # (R, Hkv, n, S, D)
    v_own = value[:, :, T:].unflatten(2, (n, S))
    scale = D ** -0.5 if scaling is None else scaling
    s_text = torch.einsum("rhgsd,rhtd->rhgst", q, key[:, :, :T]) * scale
    s_own = torch.einsum("rhgsd,rhnsd->rhgsn", q, k_own) * scale
    scores = torch.cat([s_text, s_own], dim=-1)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = torch.cat([attention_mask.bool(), attention_mask.new_ones((R, 1, S, n), dtype=torch.bool)], -1)
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))  # after the cap: tanh(-inf) is finite
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    p_text, p_own = probs.split([T, n], dim=-1)
    out = torch.einsum("rhgst,rhtd->rhgsd", p_text, value[:, :, :T]) \
        + torch.einsum("rhgsn,rhnsd->rhgsd", p_own, v_own)
    return out.reshape(R, Hq, S, D).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the function under ATTN_NAME. No mask builder is needed: the passes hand the
    model a ready 4-D mask, which transformers passes through unchanged."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, thought_attention_forward)
    return ATTN_NAME


@contextlib.contextmanager
def split_attention(model, text_len: int):
    """Within the block, `model` attends with `thought_attention_forward` over a text of
    `text_len` keys; the model's own implementation is restored on exit, errors included."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(register())
    token = _TEXT_LEN.set(text_len)
    try:
        yield
    finally:
        _TEXT_LEN.reset(token)
        hf_model.set_attn_implementation(previous)
