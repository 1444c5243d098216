"""Parallel thoughts must equal the slow per-position reference, token for token."""

from __future__ import annotations

import pytest
import torch

import agent_forge.quietstar.thoughts as th
from conftest import make_tiny_model

V = 40                      # tiny vocabulary; the last two ids are the start / end tokens
START, END = V - 2, V - 1
K, L, N_TRUE = 2, 5, 3


def sharp_model(kind: str, attn: str, seed: int = 0):
    """A tiny model with larger weights, so its next-token distributions depend on context
    (default init gives near-uniform logits, under which a wrong mask could go unnoticed)."""
    model = make_tiny_model(kind, V, seed=seed, attn=attn)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def batch(T: int = 9, seed: int = 3):
    """Two rows; the second is right-padded after 6 tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 2, (2, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def noise_for(ids, seed: int = 0):
    return th.draw_noise((*ids.shape, K, L), torch.Generator().manual_seed(seed))


def run_both(model, ids, mask, **kw):
    kw = dict(start_id=START, end_id=END, n_thoughts=K, thought_len=L, n_true=N_TRUE, **kw)
    with torch.no_grad():
        return th.generate_thoughts(model, ids, mask, **kw), th.reference_thoughts(model, ids, mask, **kw)


def assert_same(a: th.ThoughtBatch, b: th.ThoughtBatch, atol: float = 1e-4):
    assert torch.equal(a.selected, b.selected)
    assert torch.equal(a.thought_tokens, b.thought_tokens)
    assert torch.equal(a.true_valid, b.true_valid)
    torch.testing.assert_close(a.thought_logprobs, b.thought_logprobs, atol=atol, rtol=0)
    torch.testing.assert_close(a.ll_with, b.ll_with, atol=atol, rtol=0)
    torch.testing.assert_close(a.ll_without, b.ll_without, atol=atol, rtol=0)
    torch.testing.assert_close(a.thought_hidden, b.thought_hidden, atol=atol, rtol=0)
    torch.testing.assert_close(a.base_true_hidden, b.base_true_hidden, atol=atol, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_parallel_equals_reference(kind, attn):
    model = sharp_model(kind, attn)
    ids, mask = batch()
    par, ref = run_both(model, ids, mask, noise=noise_for(ids))
    assert_same(par, ref)
    real = mask.bool()
    torch.testing.assert_close(par.base_logits[real], ref.base_logits[real], atol=1e-4, rtol=0)
    assert (par.thought_tokens[..., 1:-1][real] != par.thought_tokens[..., 1:-1][real][0, 0]).any()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_selected_positions_left_padding_and_chunks(kind):
    model = sharp_model(kind, "sdpa", seed=1)
    ids, _ = batch(T=10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                  # left padding in row 0
    sel = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    noise = noise_for(ids, seed=2)
    par, ref = run_both(model, ids, mask, selected=sel, noise=noise)
    assert_same(par, ref)
    with torch.no_grad():
        chunked = th.generate_thoughts(model, ids, mask, selected=sel, noise=noise, chunk_size=2,
                                       start_id=START, end_id=END, n_thoughts=K, thought_len=L,
                                       n_true=N_TRUE)
    assert_same(chunked, par, atol=1e-5)
    assert torch.equal(par.selected, sel & mask.bool())
    assert (par.thought_tokens[~par.selected] == th.NOT_SELECTED).all()
    assert (par.thought_logprobs[~par.selected] == 0).all()


def test_greedy_matches_reference_and_ignores_noise():
    model = sharp_model("qwen2", "eager")
    ids, mask = batch()
    par, ref = run_both(model, ids, mask, noise=noise_for(ids, 0), temperature=0.0)
    assert_same(par, ref)
    other, _ = run_both(model, ids, mask, noise=noise_for(ids, 9), temperature=0.0)
    assert torch.equal(other.thought_tokens, par.thought_tokens)


def test_structure_forced_tokens_and_banned_ids():
    model = sharp_model("llama", "sdpa")
    ids, mask = batch()
    banned = list(range(0, 20))
    par, ref = run_both(model, ids, mask, noise=noise_for(ids), banned_ids=banned)
    assert_same(par, ref)
    toks = par.thought_tokens[par.selected]                     # (n, K, L)
    assert (toks[..., 0] == START).all() and (toks[..., -1] == END).all()
    assert ((toks[..., 1:-1] >= 20) & (toks[..., 1:-1] < V)).all()
    lp = par.thought_logprobs[par.selected]
    assert (lp[..., 0] == 0).all() and (lp[..., -1] == 0).all() and (lp[..., 1:-1] < 0).all()
    assert torch.equal(par.logprob_sum, par.thought_logprobs.sum(-1))


def test_same_seed_same_thoughts_other_seed_differs():
    model = sharp_model("gpt2", "sdpa")
    ids, mask = batch()
    kw = dict(start_id=START, end_id=END, n_thoughts=K, thought_len=L, n_true=N_TRUE)
    with torch.no_grad():
        a = th.generate_thoughts(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
        b = th.generate_thoughts(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
        c = th.generate_thoughts(model, ids, mask, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a.thought_tokens, b.thought_tokens)
    assert not torch.equal(a.thought_tokens, c.thought_tokens)


def test_ll_without_equals_plain_forward():
    model = sharp_model("llama", "eager")
    ids, mask = batch()
    par, _ = run_both(model, ids, mask, noise=noise_for(ids))
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[b:b + 1, :n]).logits[0].float(), -1)
        for j in range(n):
            for t in range(N_TRUE):
                if j + 1 + t < n:
                    want = logp[j + t, ids[b, j + 1 + t]]
                    assert abs(par.ll_without[b, j, t].item() - want.item()) < 1e-5
                else:
                    assert not par.true_valid[b, j, t] and par.ll_without[b, j, t] == 0


def test_wrong_mask_kind_or_positions_are_caught(monkeypatch):
    """The comparison can fail: a boolean mask under eager, or thoughts placed after the end
    of the text, must both break equality with the reference."""
    model = sharp_model("llama", "eager")
    ids, mask = batch()
    noise = noise_for(ids)
    monkeypatch.setattr(th, "mask_kind", lambda m: "bool")
    bad, ref = run_both(model, ids, mask, noise=noise)
    assert not torch.allclose(bad.thought_logprobs, ref.thought_logprobs, atol=1e-4)
    monkeypatch.undo()
    T = ids.shape[1]
    monkeypatch.setattr(th, "thought_positions", lambda am, slots: torch.full_like(slots, T))
    bad, ref = run_both(model, ids, mask, noise=noise)
    assert not torch.allclose(bad.ll_with, ref.ll_with, atol=1e-4)


def test_gradients_reach_model_but_not_tokens():
    model = sharp_model("qwen2", "sdpa")
    ids, mask = batch()
    out = th.generate_thoughts(model, ids, mask, start_id=START, end_id=END, n_thoughts=K,
                               thought_len=L, n_true=N_TRUE, noise=noise_for(ids))
    assert not out.thought_tokens.requires_grad
    loss = -(out.logprob_sum.sum() + out.ll_with.sum() + out.ll_without.sum())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_sample_tokens_is_inverse_cdf():
    """Against a plain loop over the vocabulary, and empirically against the softmax."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen) * 2
    u = torch.rand(5, generator=gen)
    toks, lps = th.sample_tokens(logits, u, temperature=0.7)
    probs = torch.softmax(logits / 0.7, -1)
    for r in range(5):
        acc, want = 0.0, 6
        for i in range(7):
            acc += probs[r, i].item()
            if acc >= u[r].item():
                want = i
                break
        assert toks[r].item() == want
        assert abs(lps[r].item() - probs[r, want].log().item()) < 1e-5
    many = torch.rand(20000, generator=gen)
    draws, _ = th.sample_tokens(logits[0].expand(20000, -1), many, temperature=0.7)
    freq = torch.bincount(draws, minlength=7).float() / 20000
    assert (freq - probs[0]).abs().max() < 0.02


def test_edge_cases_shortest_thought_empty_selection_bad_noise():
    model = sharp_model("gpt2", "eager")
    ids, mask = batch()
    kw = dict(start_id=START, end_id=END, n_thoughts=1, thought_len=2, n_true=1)
    noise = th.draw_noise((*ids.shape, 1, 2), torch.Generator().manual_seed(0))
    with torch.no_grad():
        par = th.generate_thoughts(model, ids, mask, noise=noise, **kw)
        ref = th.reference_thoughts(model, ids, mask, noise=noise, **kw)
        assert_same(par, ref)
        none = th.generate_thoughts(model, ids, mask, selected=torch.zeros_like(mask, dtype=torch.bool),
                                    noise=noise, **kw)
    assert (none.thought_tokens == th.NOT_SELECTED).all() and (none.ll_with == 0).all()
    with pytest.raises(ValueError):
        th.generate_thoughts(model, ids, mask, noise=noise[..., :1], **kw)
    with pytest.raises(ValueError):
        th.generate_thoughts(model, ids, mask, **{**kw, "thought_len": 1})


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sparse_pass_embeddings_give_the_dense_gradient(kind, monkeypatch):
    """The passes' sparse embedding gradient must sum to what the model's own (dense)
    embedding module gives, and leave a dense .grad for the optimiser."""
    def grads():
        model = sharp_model(kind, "sdpa")
        ids, mask = batch()
        out = th.generate_thoughts(model, ids, mask, start_id=START, end_id=END, n_thoughts=K,
                                   thought_len=L, n_true=N_TRUE, noise=noise_for(ids))
        (-(out.logprob_sum.sum() + out.ll_with.sum() + out.ll_without.sum())).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    sparse = grads()
    monkeypatch.setattr(th, "pass_embedder", lambda model: model.get_input_embeddings())
    dense = grads()
    assert sparse.keys() == dense.keys()
    for name in dense:
        assert not sparse[name].is_sparse
        torch.testing.assert_close(sparse[name], dense[name], atol=1e-5, rtol=1e-4)
