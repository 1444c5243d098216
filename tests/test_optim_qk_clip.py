"""QK-clip: recorded logits against a slow recomputation, exact per-head rescaling."""

import math

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from agent_forge.optim import (ATTN_NAME, MuGrokfast, MuGrokfastConfig, QKClip,
                               max_logits_per_head)


def tiny(kind="llama", kv_heads=2, seed=0):
    torch.manual_seed(seed)
    model = _build(kind, kv_heads)
    with torch.no_grad():  # biases start at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def _build(kind, kv_heads):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads,
                  attn_implementation="sdpa")
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg).eval()


def inputs(seed=0, padded=True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0  # left padding on the first row (else SDPA runs with is_causal)
    return ids, mask


def boost_head(model, layer, head, factor=40.0):
    """Make one query head's logits large (rows of W_q, or GPT-2's q columns)."""
    attn = attention(model, layer)
    hd = attn.head_dim
    with torch.no_grad():
        if hasattr(attn, "q_proj"):
            attn.q_proj.weight[head * hd:(head + 1) * hd] *= factor
        else:
            attn.c_attn.weight[:, head * hd:(head + 1) * hd] *= factor


def attention(model, layer):
    if hasattr(model, "transformer"):
        return model.transformer.h[layer].attn
    return model.model.layers[layer].self_attn


def manual_max_logits(model, ids, mask):
    """Slow path: recompute q, k (with RoPE) per layer, score every pair, mask by hand."""
    captured = {}

    def hook(module, args, kwargs):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in model.model.layers]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    result = {}
    for idx, (hidden, (cos, sin)) in captured.items():
        attn = model.model.layers[idx].self_attn
        b, t, d = hidden.shape[0], hidden.shape[1], attn.head_dim
        q = attn.q_proj(hidden).view(b, t, -1, d).transpose(1, 2)
        k = attn.k_proj(hidden).view(b, t, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        n_heads, n_kv = q.shape[1], k.shape[1]
        out = torch.full((n_heads,), -math.inf)
        for bi in range(b):
            for h in range(n_heads):
                kh = k[bi, h * n_kv // n_heads]
                for i in range(t):
                    for j in range(i + 1):
                        if mask[bi, i] and mask[bi, j]:
                            s = float((q[bi, h, i] @ kh[j]).detach()) * d ** -0.5
                            out[h] = max(out[h], s)
        result[f"model.layers.{idx}.self_attn"] = out
    return result


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_outputs_equal_plain_sdpa(kind):
    model = tiny(kind)
    ids, mask = inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        clip = QKClip(model, tau=10.0)
        assert model.config._attn_implementation == ATTN_NAME
        out = model(ids, attention_mask=mask).logits
    assert torch.equal(out, ref)
    assert len(clip.max_logits) == 2
    clip.remove()
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kv_heads,padded", [(2, True), (4, True), (2, False)])
def test_recorded_max_logits_match_slow_recomputation(kv_heads, padded):
    model = tiny("llama", kv_heads)
    boost_head(model, 1, 3, factor=5.0)
    ids, mask = inputs(1, padded)
    expected = manual_max_logits(model, ids, mask)
    clip = QKClip(model, tau=10.0)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert set(clip.max_logits) == set(expected)
    for name, values in expected.items():
        torch.testing.assert_close(clip.max_logits[name], values, rtol=1e-4, atol=1e-5)


def test_mask_conventions_agree_with_a_loop():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    allowed[1, :, :, 0] = False  # the second row's first key is padding
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~allowed, torch.finfo(torch.float32).min)
    slow = torch.full((4,), -math.inf)
    for b in range(2):
        for h in range(4):
            for i in range(5):
                for j in range(5):
                    if allowed[b, 0, i, j]:
                        slow[h] = max(slow[h], float(q[b, h, i] @ k[b, h // 2, j]) * 0.3)
    for mask in (allowed, additive):
        got = max_logits_per_head(q, k, mask, 0.3, is_causal=True, chunk=2)
        torch.testing.assert_close(got, slow)
    allowed[1, :, :, 0] = True  # no padding: None + is_causal must equal the causal mask
    torch.testing.assert_close(max_logits_per_head(q, k, None, 0.3, True, chunk=3),
                               max_logits_per_head(q, k, allowed, 0.3, True))


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_and_clip(model, layer, head):
    """Record, pick tau between the boosted head and every other head, clip, re-measure."""
    ids, mask = inputs(2)
    clip = QKClip(model, tau=1.0)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    peak = float(clip.max_logits[name_of(model, layer)][head])
    rest = torch.cat([v for v in clip.max_logits.values()])
    second = float(rest[rest < peak].max())
    assert peak > 2 * second > 0
    clip.tau = tau = math.sqrt(peak * second)
    before = weights(model)
    stats = clip.apply()
    assert stats["heads_clipped"] == 1 and stats["max_logit"] == pytest.approx(peak)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    after_peak = float(clip.max_logits[name_of(model, layer)][head])
    assert after_peak <= tau * (1 + 1e-5) and after_peak == pytest.approx(tau, rel=1e-4)
    return before, peak, tau


def name_of(model, layer):
    return f"transformer.h.{layer}.attn" if hasattr(model, "transformer") \
        else f"model.layers.{layer}.self_attn"


def assert_rows(before, model, scaled: dict[str, tuple[slice, float]], transpose=False):
    """Named rows scaled by exactly the factor; every other value bitwise unchanged."""
    for n, p in model.named_parameters():
        old, new = before[n], p.detach()
        expect = old.clone()
        if n in scaled:
            idx, factor = scaled[n]
            if transpose and old.ndim == 2:
                expect[:, idx] = old[:, idx] * factor
            else:
                expect[idx] = old[idx] * factor
        assert torch.equal(new, expect), n


def test_mha_head_gets_sqrt_factor_on_q_and_k_rows():
    model = tiny("qwen2", kv_heads=4)  # Qwen2: q/k/v carry biases
    boost_head(model, 0, 2)
    before, peak, tau = run_and_clip(model, 0, 2)
    rows, f = slice(2 * 8, 3 * 8), math.sqrt(tau / peak)
    pre = "model.layers.0.self_attn."
    assert_rows(before, model, {pre + "q_proj.weight": (rows, f), pre + "q_proj.bias": (rows, f),
                                pre + "k_proj.weight": (rows, f), pre + "k_proj.bias": (rows, f)})


def test_gqa_head_scales_query_rows_only_by_full_factor():
    model = tiny("llama", kv_heads=2)
    boost_head(model, 1, 1)
    before, peak, tau = run_and_clip(model, 1, 1)
    assert_rows(before, model, {"model.layers.1.self_attn.q_proj.weight":
                                (slice(8, 16), tau / peak)})


def test_gpt2_fused_c_attn_columns():
    model = tiny("gpt2")
    boost_head(model, 0, 1)
    before, peak, tau = run_and_clip(model, 0, 1)
    f = math.sqrt(tau / peak)
    w = "transformer.h.0.attn.c_attn."
    cols_q, cols_k = slice(8, 16), slice(32 + 8, 32 + 16)
    expect = before[w + "weight"].clone()
    expect[:, cols_q] *= f
    expect[:, cols_k] *= f
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight.detach(), expect)
    bias = before[w + "bias"].clone()
    bias[cols_q] *= f
    bias[cols_k] *= f
    assert torch.equal(model.transformer.h[0].attn.c_attn.bias.detach(), bias)


def test_disabled_recording_and_optimizer_integration():
    model = tiny("llama")
    ids, mask = inputs()
    clip = QKClip(model, tau=1e-3, enabled=False)
    model(ids, attention_mask=mask)
    assert clip.max_logits == {} and clip.apply()["heads_clipped"] == 0
    clip.remove()
    opt = MuGrokfast.from_model(model, MuGrokfastConfig(qk_clip_tau=1e-3))
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    assert opt.last_qk_clip_stats["heads_clipped"] == 2 * 4  # every head exceeds a tiny tau


def test_lora_wrapped_projections_are_clipped_including_adapter_rows():
    peft = pytest.importorskip("peft")
    model = tiny("llama", kv_heads=4)
    boost_head(model, 0, 0)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)  # B starts at zero; make the adapter contribute
    ids, mask = inputs(2)
    clip = QKClip(lora, tau=1.0)
    with torch.no_grad():
        lora(input_ids=ids, attention_mask=mask)
    name = next(n for n in clip.max_logits if n.endswith("layers.0.self_attn"))
    peak = float(clip.max_logits[name][0])
    clip.tau = tau = peak / 2
    clip.max_logits = {name: clip.max_logits[name]}  # clip this layer only
    clip.max_logits[name][1:] = 0.0
    clip.apply()
    with torch.no_grad():
        lora(input_ids=ids, attention_mask=mask)
    assert float(clip.max_logits[name][0]) == pytest.approx(tau, rel=1e-4)


# ---------------------------------------------------------------------------------------
# Review fixes: ranks agree, q/k-norm models, padded query rows, firing stats


def _rank_worker(rank, init_file, out_dir):
    """One rank of a 2-process gloo group: each rank saw a spike the other did not."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = tiny("llama", kv_heads=4)
        clip = QKClip(model, tau=10.0)
        spike = [1.0, 2.0, 50.0, 4.0] if rank == 1 else [1.0, 2.0, 3.0, 4.0]
        clip.max_logits = {"model.layers.0.self_attn": torch.tensor(spike)}
        if rank == 0:  # only rank 0 recorded layer 1 at all
            clip.max_logits["model.layers.1.self_attn"] = torch.tensor([20.0, 0.0, 0.0, 0.0])
        stats = clip.apply()
        torch.save({"heads_clipped": stats["heads_clipped"], "max_logit": stats["max_logit"],
                    "weights": {n: p.detach() for n, p in model.named_parameters()}},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_clip_the_same_heads_after_all_reduce(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["heads_clipped"] == r1["heads_clipped"] == 2
    assert r0["max_logit"] == r1["max_logit"] == pytest.approx(50.0)
    for name, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][name]), name
    q0 = r0["weights"]["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q0, tiny("llama", kv_heads=4).model.layers[0].self_attn.q_proj.weight)


def tiny_qwen3(kv_heads=2):
    """One layer, so clipping it cannot move a later layer's logits."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8,
                      attn_implementation="sdpa")
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # large q/k norm weights: large logits whatever W_q, W_k do
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(6.0)
            layer.self_attn.k_norm.weight.mul_(6.0)
    return model


def _record(model, clip, ids, mask):
    with torch.no_grad():
        model(ids, attention_mask=mask)
    return max(float(v.max()) for v in clip.max_logits.values())


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_qk_norm_model_is_clipped_through_its_norm_weights(kv_heads):
    """Qwen3 normalises q and k per head: scaling W_q rows is undone by q_norm, so the old
    clip fired every step and shrank W_q forever. The clip must land on the norm weights."""
    model = tiny_qwen3(kv_heads)
    ids, mask = inputs(4)
    clip = QKClip(model, tau=1.0)
    peak = _record(model, clip, ids, mask)
    clip.tau = tau = peak / 4
    before = weights(model)
    assert clip.apply()["heads_clipped"] > 0
    assert _record(model, clip, ids, mask) <= tau * (1 + 1e-4)
    assert clip.apply()["heads_clipped"] == 0  # fired once, not every step
    for n, p in model.named_parameters():
        if n.endswith(("q_proj.weight", "k_proj.weight")):
            assert torch.equal(p.detach(), before[n]), n  # projections untouched


def test_norm_whose_weight_does_not_scale_the_output_is_refused():
    """Gemma3's norm multiplies by (1 + w): neither W_q rows nor w can carry the clip."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, attn_implementation="sdpa")
    model = Gemma3ForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="q_norm"):
        QKClip(model, tau=10.0)
    assert MuGrokfast.from_model(model, MuGrokfastConfig()).qk_clip is None
    assert model.config._attn_implementation == "sdpa"


def test_padded_query_rows_do_not_count():
    """Right padding: pad query rows still attend to real keys. Give the pad token a q that
    only it produces, large enough to dominate; the max must ignore it."""
    model = tiny("llama", kv_heads=2)
    pad, hd = 63, 8
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, -1] = 0.0
        emb[pad, -1] = 50.0  # only the pad token has the last hidden coordinate
        q = model.model.layers[0].self_attn.q_proj.weight
        q[hd:2 * hd, -1] = 40.0  # ... and head 1 reads it
    ids, mask = inputs(5, padded=False)
    ids = ids.clamp(max=pad - 1)
    ids[1, 5:], mask[1, 5:] = pad, 0  # right padding on the second row
    expected = manual_max_logits(model, ids, mask)
    clip = QKClip(model, tau=10.0)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for name, values in expected.items():
        torch.testing.assert_close(clip.max_logits[name], values, rtol=1e-4, atol=1e-5)


def test_padded_query_rows_do_not_count_in_the_kernel():
    """The same rule on max_logits_per_head with an SDPA-style causal + key-padding mask."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 2, 6, 4, generator=gen), torch.randn(2, 2, 6, 4, generator=gen)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril() & real[:, None, None, :]
    q[1, :, 3:] *= 100.0  # pad query rows with huge q
    want = torch.full((2,), -math.inf)
    for b in range(2):
        for h in range(2):
            for i in range(6):
                for j in range(i + 1):
                    if real[b, i] and real[b, j]:
                        want[h] = max(want[h], float(q[b, h, i] @ k[b, h, j]) * 0.5)
    torch.testing.assert_close(max_logits_per_head(q, k, allowed, 0.5, True, chunk=4), want)


def test_firing_is_counted_and_exposed_on_the_optimizer():
    """Per step: heads clipped and the max logit; over the run: how many steps fired."""
    model = tiny("llama")
    ids, mask = inputs()
    opt = MuGrokfast.from_model(model, MuGrokfastConfig(qk_clip_tau=1e-3))
    seen = []
    for tau in (1e-3, 1e9):  # every head exceeds the first tau, none the second
        opt.qk_clip.tau = tau
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append(dict(opt.qk_clip_stats))
    assert seen[0]["qk_clip_heads_clipped"] == 2 * 4 and seen[0]["qk_clip_max_logit"] > 1e-3
    assert seen[1]["qk_clip_heads_clipped"] == 0
    assert [s["qk_clip_steps_fired"] for s in seen] == [1, 1]
    assert [s["qk_clip_steps"] for s in seen] == [1, 2]
