"""The split thought attention must equal plain masked attention over the whole cache."""

from __future__ import annotations

import pytest
import torch

import agent_forge.quietstar.thought_attention as ta
from conftest import make_tiny_model


def plain_attention(query, key, value, allowed, scale, softcap=None):
    """Softmax attention over every key with a (R, 1, S, KV) boolean mask, GQA by repeating."""
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2)


def full_mask(text_allowed, n):
    """Text part, then in each of the n pass blocks only the slot's own key."""
    R, _, S, _ = text_allowed.shape
    own = torch.eye(S, dtype=torch.bool).repeat(1, n).expand(R, 1, S, S * n)
    return torch.cat([text_allowed, own], dim=-1)


@pytest.mark.parametrize("hq,hkv,softcap", [(4, 4, None), (4, 2, None), (6, 1, None), (4, 2, 1.5)])
def test_split_equals_masked_attention_over_all_keys(hq, hkv, softcap):
    gen = torch.Generator().manual_seed(0)
    R, S, T, n, D = 3, 5, 7, 4, 8
    q = torch.randn(R, hq, S, D, generator=gen)
    k, v = torch.randn(R, hkv, T + n * S, D, generator=gen), torch.randn(R, hkv, T + n * S, D, generator=gen)
    text_allowed = torch.rand(R, 1, S, T, generator=gen) < 0.6
    text_allowed[:, :, :, 0] = True
    text_allowed[1, :, 2] = False                       # a slot that sees no text at all (padding)
    module = torch.nn.Module().eval()
    token = ta._TEXT_LEN.set(T)
    try:
        got, _ = ta.thought_attention_forward(module, q, k, v, text_allowed, scaling=0.3, softcap=softcap)
    finally:
        ta._TEXT_LEN.reset(token)
    want = plain_attention(q, k, v, full_mask(text_allowed, n), 0.3, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # it can fail: letting a slot see its neighbour's thought keys changes the answer
    leaky = full_mask(text_allowed, n)
    leaky[:, :, 0, T + 1] = True
    assert not torch.allclose(got, plain_attention(q, k, v, leaky, 0.3, softcap), atol=1e-4)


def test_gradients_match_masked_attention():
    gen = torch.Generator().manual_seed(1)
    R, S, T, n, D = 2, 3, 4, 2, 4
    q = torch.randn(R, 2, S, D, generator=gen, requires_grad=True)
    k = torch.randn(R, 1, T + n * S, D, generator=gen, requires_grad=True)
    v = torch.randn(R, 1, T + n * S, D, generator=gen, requires_grad=True)
    allowed = torch.ones(R, 1, S, T, dtype=torch.bool)
    token = ta._TEXT_LEN.set(T)
    try:
        got, _ = ta.thought_attention_forward(torch.nn.Module(), q, k, v, allowed, scaling=0.5)
    finally:
        ta._TEXT_LEN.reset(token)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want = torch.autograd.grad(plain_attention(q, k, v, full_mask(allowed, n), 0.5).square().sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_outside_the_context_it_refuses_and_the_model_gets_its_attention_back():
    with pytest.raises(RuntimeError, match="only inside"):
        ta.thought_attention_forward(torch.nn.Module(), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 2, 2),
                                     torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 1, 1, dtype=torch.bool))
    model = make_tiny_model("llama", 40, attn="eager")
    with pytest.raises(KeyError):
        with ta.split_attention(model, 5):
            assert model.config._attn_implementation == ta.ATTN_NAME
            raise KeyError("boom")
    assert model.config._attn_implementation == "eager"


def test_a_cache_that_is_not_whole_passes_is_rejected():
    token = ta._TEXT_LEN.set(3)
    try:
        with pytest.raises(ValueError, match="whole passes"):
            ta.thought_attention_forward(torch.nn.Module(), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 6, 4),
                                         torch.zeros(1, 1, 6, 4), torch.ones(1, 1, 2, 3, dtype=torch.bool))
    finally:
        ta._TEXT_LEN.reset(token)
