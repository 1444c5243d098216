"""The mixing head starts as the identity on h_base and learns from the first step."""

from __future__ import annotations

import pytest
import torch

import agent_forge.quietstar.thoughts as th
from agent_forge.quietstar.mixing import MixingHead, load_head, mixed_logits, save_head
from agent_forge.training.logprobs import token_logprobs
from conftest import make_tiny_model

V = 40


def hidden_and_logits(model, ids):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_init_mix_equals_base_logits_bit_for_bit(kind):
    model = make_tiny_model(kind, V)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    h_base, logits = hidden_and_logits(model, ids)
    h_thought = torch.randn(h_base.shape, generator=torch.Generator().manual_seed(1)) * 5
    head = MixingHead(h_base.shape[-1])
    with torch.no_grad():
        assert torch.equal(head.weight(h_base, h_thought), torch.zeros(2, 12, 1))
        assert torch.equal(head(h_base, h_thought), h_base)
        assert torch.equal(mixed_logits(model, head, h_base, h_thought), logits)


def test_init_mix_on_thought_batch_equals_base_predictions():
    """On the generator's own outputs: mixed logits at init = the no-thought logits at j+t."""
    model = make_tiny_model("llama", V)
    ids = torch.randint(0, V - 2, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tb = th.generate_thoughts(model, ids, start_id=V - 2, end_id=V - 1, n_thoughts=2,
                                  thought_len=4, n_true=3, generator=torch.Generator().manual_seed(0))
        head = MixingHead(tb.base_hidden.shape[-1])
        h_base = tb.base_true_hidden[:, :, None].expand_as(tb.thought_hidden)
        mixed = mixed_logits(model, head, h_base, tb.thought_hidden)       # (B, T, K, n, V)
        plain = th.lm_logits(model, h_base)
    assert torch.equal(mixed, plain)
    ll = token_logprobs(mixed, tb.true_tokens[:, :, None].expand(-1, -1, 2, -1))
    want = tb.ll_without[:, :, None].expand_as(ll)
    assert torch.equal(ll * tb.true_valid[:, :, None], want)


def test_one_step_changes_the_head_output():
    torch.manual_seed(0)
    model = make_tiny_model("gpt2", V)
    ids = torch.randint(0, V, (2, 10))
    h_base, _ = hidden_and_logits(model, ids)
    h_thought = torch.randn_like(h_base)
    head = MixingHead(h_base.shape[-1], inner_size=16)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    before = head.weight(h_base, h_thought).detach().clone()
    targets = ids.roll(-1, dims=1)
    loss = torch.nn.functional.cross_entropy(
        mixed_logits(model, head, h_base, h_thought).flatten(0, 1), targets.flatten())
    loss.backward()
    assert head.net[-1].weight.grad.abs().sum() > 0
    opt.step()
    after = head.weight(h_base, h_thought).detach()
    assert not torch.equal(before, after)
    assert after.abs().max() > 0


def test_mix_formula_with_a_nonzero_head():
    head = MixingHead(8, inner_size=4)
    with torch.no_grad():
        head.net[-1].weight.normal_()
        head.net[-1].bias.fill_(0.3)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    w = torch.tanh(head.net(torch.cat([a, b], -1)))
    torch.testing.assert_close(head(a, b), (1 - w) * a + w * b)
    assert ((w > -1) & (w < 1)).all()


def test_save_load_roundtrip(tmp_path):
    head = MixingHead(8, inner_size=4)
    with torch.no_grad():
        head.net[-1].weight.normal_()
    path = save_head(head, tmp_path / "mixing_head.safetensors")
    again = load_head(path)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert again.inner_size == 4
    assert torch.equal(again(a, b), head(a, b))
    for (k1, v1), (k2, v2) in zip(head.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
