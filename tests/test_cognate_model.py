"""The Cognate model (TRM x Titans-MAG with ACT) against plain implementations of the papers'
equations, and as a Hugging Face model: generate with/without cache, save/load (also with
trust_remote_code and no agent_forge on the path), resizing, gradients, learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import agent_forge.models  # noqa: F401  # (its import registers the Auto classes)
from agent_forge.cognate.config import CognateConfig
from agent_forge.cognate.memory import MemoryState, run_memory
from agent_forge.cognate.model import CognateForCausalLM, mag_combine
from agent_forge.cognate.recursion import act_weights


def tiny_config(**overrides) -> CognateConfig:
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                memory_dim=8, memory_hidden_size=16, memory_chunk_size=3, sliding_window=4,
                recursion_after_layer=2, recursion_intermediate_size=48, latent_steps=1, max_recursion_steps=3,
                eos_token_id=1, pad_token_id=0)
    return CognateConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> CognateForCausalLM:
    torch.manual_seed(seed)
    return CognateForCausalLM(tiny_config(**overrides)).eval()


# ---------------------------------------------------------------------------------------
# Titans memory: the update rule against a slow per-token loop with autograd


def reference_memory(w1, w2, keys, values, queries, alpha, eta, theta, chunk: int, clip: float = float("inf")):
    """One row, token by token: S_t = eta_t S_{t-1} - theta_t grad loss(M_ref; k_t, v_t),
    M_t = (1 - alpha_t) M_{t-1} + S_t, loss = ||W2 silu(W1 k) - v||^2, gradients by autograd at
    M_ref = the memory before the token's chunk (the memory before the token when chunk = 1),
    which is also what the token reads; with `clip`, each token's gradient (W1 and W2 together)
    is scaled to norm <= clip. Returns (reads, state after the last full chunk)."""
    s1, s2 = torch.zeros_like(w1), torch.zeros_like(w2)
    reads, saved = [], None
    for t in range(keys.shape[0]):
        if t % chunk == 0:
            ref1, ref2 = w1.clone(), w2.clone()
            saved = (w1.clone(), w2.clone(), s1.clone(), s2.clone())
        reads.append(ref2 @ F.silu(ref1 @ queries[t]))
        p1, p2 = ref1.clone().requires_grad_(True), ref2.clone().requires_grad_(True)
        loss = ((p2 @ F.silu(p1 @ keys[t]) - values[t]) ** 2).sum()
        g1, g2 = torch.autograd.grad(loss, (p1, p2))
        norm = torch.sqrt((g1 ** 2).sum() + (g2 ** 2).sum())
        g1, g2 = g1 * min(1.0, clip / float(norm)), g2 * min(1.0, clip / float(norm))
        s1, s2 = eta[t] * s1 - theta[t] * g1, eta[t] * s2 - theta[t] * g2
        w1, w2 = (1 - alpha[t]) * w1 + s1, (1 - alpha[t]) * w2 + s2
    if keys.shape[0] % chunk == 0:
        saved = (w1, w2, s1, s2)
    return torch.stack(reads), saved


def random_memory_inputs(batch=2, steps=9, dim=4, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(width, dim, generator=g) * 0.5, torch.randn(dim, width, generator=g) * 0.5
    keys = F.normalize(torch.randn(batch, steps, dim, generator=g), dim=-1)
    queries = F.normalize(torch.randn(batch, steps, dim, generator=g), dim=-1)
    values = torch.randn(batch, steps, dim, generator=g)
    alpha = torch.rand(batch, steps, generator=g) * 0.3
    eta = 0.5 + 0.5 * torch.rand(batch, steps, generator=g)
    theta = 0.3 * torch.rand(batch, steps, generator=g)
    state = MemoryState(w1.expand(batch, -1, -1), w2.expand(batch, -1, -1),
                        torch.zeros(batch, width, dim), torch.zeros(batch, dim, width))
    return state, (keys, values, queries, alpha, eta, theta)


@pytest.mark.parametrize("chunk,steps,clip", [(1, 7, float("inf")), (3, 9, float("inf")), (4, 8, float("inf")),
                                             (1, 7, 0.5), (3, 9, 0.5)])
def test_memory_update_matches_the_per_token_equations(chunk, steps, clip):
    state, (k, v, q, a, e, th) = random_memory_inputs(steps=steps)
    reads, final = run_memory(state, k, v, q, a, e, th, chunk, grad_clip=clip)
    for row in range(k.shape[0]):
        ref_reads, ref_state = reference_memory(state.w1[row], state.w2[row], k[row], v[row], q[row],
                                                a[row], e[row], th[row], chunk, clip)
        torch.testing.assert_close(reads[row], ref_reads, rtol=1e-5, atol=1e-5)
        for got, want in zip((final.w1, final.w2, final.s1, final.s2), ref_state):
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)


def test_memory_clip_is_active_in_the_clipped_cases():
    """The clip cases above compare something: at 0.5 the gradients really are clipped."""
    state, (k, v, q, a, e, th) = random_memory_inputs(steps=3)
    _, free = run_memory(state, k, v, q, a, e, th, 1)
    _, clipped = run_memory(state, k, v, q, a, e, th, 1, grad_clip=0.5)
    assert not torch.allclose(free.s2, clipped.s2)


def test_memory_in_pieces_equals_one_pass():
    """The cache path: an unfinished chunk is carried over and completed by later tokens."""
    state, inputs = random_memory_inputs(steps=10)
    whole, end = run_memory(state, *inputs, chunk_size=4)
    first, mid = run_memory(state, *(x[:, :5] for x in inputs), chunk_size=4)
    second, end2 = run_memory(mid, *(x[:, 5:] for x in inputs), chunk_size=4)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    for got, want in zip((end2.w1, end2.w2, end2.s1, end2.s2), (end.w1, end.w2, end.s1, end.s2)):
        torch.testing.assert_close(got, want)


def test_memory_really_changes_with_surprise():
    """A pair written once is recalled better: the loss on it falls after the update."""
    state, (k, v, q, a, e, th) = random_memory_inputs(batch=1, steps=1)
    before = ((state.w2[0] @ F.silu(state.w1[0] @ k[0, 0]) - v[0, 0]) ** 2).sum()
    _, after_state = run_memory(state, k, v, q, torch.zeros_like(a), e, torch.full_like(th, 0.1), 1)
    after = ((after_state.w2[0] @ F.silu(after_state.w1[0] @ k[0, 0]) - v[0, 0]) ** 2).sum()
    assert after < before


def test_left_padding_leaves_the_memory_untouched():
    model = tiny_model(memory_chunk_size=1)
    layer = model.model.layers[0].memory
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded, _ = layer(x, mask)
    alone, _ = layer(x[:1, 2:], mask[:1, 2:])
    torch.testing.assert_close(padded[0, 2:], alone[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# MAG gate


def test_mag_combine_by_hand():
    attn, mem = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 3.0])
    gate = torch.tensor([0.25, 1.0])
    assert mag_combine(attn, mem, gate).tolist() == [0.5, -1.0]


@pytest.mark.parametrize("bias,branch", [(60.0, "attention"), (-60.0, "memory")])
def test_mag_gate_selects_a_branch(bias, branch):
    model = tiny_model()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.mag_gate.weight.zero_()
        layer.mag_gate.bias.fill_(bias)
        x = torch.randn(1, 6, 32)
        positions, index = torch.arange(6)[None], torch.arange(6)
        valid = torch.ones(1, 6, dtype=torch.bool)
        h = layer.mix_norm(x)
        attn, _ = layer.attention(h, positions, index, valid)
        mem, _ = layer.memory(h, valid)
        mixed = x + (attn if branch == "attention" else mem)
        want = mixed + layer.mlp(layer.mlp_norm(mixed))
        torch.testing.assert_close(layer(x, positions, index, valid, None, 0), want)


# ---------------------------------------------------------------------------------------
# ACT halting


def test_act_ponder_cost_by_hand():
    h = torch.tensor([[0.2, 0.5, 0.4, 0.9]])
    weights, steps, ponder = act_weights(h, threshold=0.99)
    # 0.2 + 0.5 + 0.4 = 1.1 >= 0.99 at step 3; remainder R = 1 - 0.7 = 0.3; ponder N + R = 3.3
    torch.testing.assert_close(weights, torch.tensor([[0.2, 0.5, 0.3, 0.0]]))
    assert steps.tolist() == [3]
    torch.testing.assert_close(ponder, torch.tensor([3.3]))


def test_act_max_steps_honoured():
    h = torch.full((2, 5, 4), 0.05)
    weights, steps, ponder = act_weights(h, threshold=0.99)
    assert (steps == 4).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(weights[0, 0], torch.tensor([0.05, 0.05, 0.05, 0.85]))
    torch.testing.assert_close(ponder, torch.full((2, 5), 4.85))


def test_act_gradient_reaches_halting_through_the_remainder():
    h = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    _, _, ponder = act_weights(h, threshold=0.99)
    ponder.backward()
    assert h.grad.tolist() == [-1.0, -1.0, 0.0]  # d(N + 1 - h1 - h2)/dh


def test_model_halting_respects_max_steps_and_starts_not_halting():
    model = tiny_model(max_recursion_steps=5)
    ids = torch.randint(2, 64, (2, 12))
    out = model(ids)
    assert out.halting_probs.shape == (2, 12, 5)
    assert out.halting_probs[..., :3].mean() < 0.1  # bias -3: sigmoid ~ 0.047
    assert (out.halting_steps == 5).all()  # nobody halts early at initialisation
    assert model.model.recursion.halt.bias.item() == pytest.approx(-3.0)
    with torch.no_grad():
        model.model.recursion.halt.bias.fill_(10.0)
    assert (model(ids).halting_steps == 1).all()


# ---------------------------------------------------------------------------------------
# Hugging Face behaviour


def test_registered_with_auto_classes():
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    cfg = AutoConfig.for_model("cognate", **fields)
    assert type(AutoModelForCausalLM.from_config(cfg)).__name__ == "CognateForCausalLM"


def test_incremental_cache_matches_full_forward():
    model = tiny_model()
    ids = torch.randint(2, 64, (2, 11))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, parts = None, []
        for start, end in ((0, 4), (4, 5), (5, 9), (9, 10), (10, 11)):
            out = model(ids[:, start:end], cache=cache, use_cache=True)
            cache, parts = out.cache, parts + [out.logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 11


@pytest.fixture(scope="module")
def learned():
    """A tiny model that has memorised four random sequences (so it generates varied tokens,
    not one token repeated as a fresh init does), and the sequences."""
    torch.manual_seed(5)
    seqs = torch.randint(2, 64, (4, 24))
    model = tiny_model(seed=5).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(seqs, labels=seqs).lm_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), seqs


def test_generate_with_cache_equals_without(learned):
    model, seqs = learned
    ids, mask = seqs[:2, :6].clone(), torch.ones(2, 6, dtype=torch.long)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 22)
    assert len(set(with_cache[1, 6:].tolist())) > 4  # varied output, past the window (4) and many chunks (3)
    assert torch.equal(with_cache, without)


def test_beam_search_with_cache_equals_without(learned):
    model, seqs = learned
    kwargs = dict(max_new_tokens=10, do_sample=False, num_beams=3, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(seqs[:, :5], use_cache=True, **kwargs)
    assert torch.equal(with_cache, model.generate(seqs[:, :5], use_cache=False, **kwargs))


def test_save_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "model.py", "config.py", "memory.py", "recursion.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "config.CognateConfig", "AutoModelForCausalLM": "model.CognateForCausalLM"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(t, want[k]) for k, t in got.items())
    ids = torch.randint(2, 64, (2, 9))
    with torch.no_grad():  # same weights; the kernels may group sums differently (~1e-7)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def test_remote_code_loads_without_agent_forge(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(2, 64, (1, 7))
    with torch.no_grad():
        want = model(ids).logits[0, -1].tolist()
    code = f"""
import json, sys, torch
sys.path = [p for p in sys.path if p not in ('', '.') and 'wt' not in p]
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
with torch.no_grad():
    out = m(torch.tensor({ids.tolist()})).logits[0, -1].tolist()
gen = m.generate(torch.tensor({ids.tolist()}), max_new_tokens=3, do_sample=False).shape[1]
print(json.dumps({{"logits": out, "agent_forge": "agent_forge" in sys.modules, "module": type(m).__module__,
                  "gen": gen}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert not got["agent_forge"] and got["module"].startswith("transformers_modules")
    assert got["gen"] == 10
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_resize_token_embeddings_for_thinking_tokens(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    model.resize_token_embeddings(70)
    assert model.get_input_embeddings().weight.shape[0] == 70 and model.lm_head.weight.shape[0] == 70
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.tensor([[5, 66, 69, 7]])
    assert model(ids).logits.shape == (1, 4, 70)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == 70
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_gradients_reach_every_part():
    model = tiny_model().train()
    ids = torch.randint(2, 64, (2, 10))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert missing == []


def test_tiny_model_loss_falls_on_a_repeated_batch():
    model = tiny_model(seed=1).train()
    ids = torch.randint(2, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.6 * losses[0]
