"""The merge engine: each technique against a plain reference, and whole merges of tiny models.

References are written here from the papers' definitions, element by element where that is
clearer than vector code, so a wrong engine cannot agree with them by sharing its code.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from agent_forge.evomerge.genome import Genome, first_generation
from agent_forge.evomerge.merge import (MergeError, build_model, check_parents, dare, layer_path,
                                        linear, merge_state_dicts, merge_to_model, merged_config,
                                        save_merged, slerp_chain, ties, trim_magnitude)
from agent_forge.models import read_meta, save_model
from agent_forge.vocab import add_thinking_tokens
from conftest import make_tiny_model, make_tiny_tokenizer

IDS = torch.tensor([[5, 17, 3, 99, 42, 7]])


# ---------------------------------------------------------------------------------------
# References


def ref_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors (Shoemake), no shortcuts."""
    ua, ub = a.flatten() / a.norm(), b.flatten() / b.norm()
    theta = math.acos(max(-1.0, min(1.0, float(ua @ ub))))
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s * a + math.sin(t * theta) / s * b


def ref_trim(d: torch.Tensor, density: float) -> list[float]:
    values = d.flatten().tolist()
    k = max(1, int(density * len(values)))
    keep = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k])
    return [v if i in keep else 0.0 for i, v in enumerate(values)]


def ref_ties(deltas, weights, density) -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim, elect the sign of the summed weighted mass (ties to +),
    mean of the entries whose sign agrees, weighted, over those entries only."""
    trimmed = [ref_trim(d, density) for d in deltas]
    out = []
    for i in range(len(trimmed[0])):
        mass = sum(w * t[i] for w, t in zip(weights, trimmed))
        sign = 1.0 if mass >= 0 else -1.0
        agree = [(w, t[i]) for w, t in zip(weights, trimmed) if t[i] != 0 and (t[i] > 0) == (sign > 0)]
        out.append(sum(w * v for w, v in agree) / sum(w for w, _ in agree) if agree else 0.0)
    return torch.tensor(out).reshape(deltas[0].shape)


def hand_run(outer, layers, ids):
    """Embed with `outer`, run `layers` in order under an explicit causal mask, then
    `outer`'s final norm and head: what a DFS path should compute."""
    inner = outer.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = inner.rotary_emb(h, pos)
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    for layer in layers:
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
    return outer.lm_head(inner.norm(h))


# ---------------------------------------------------------------------------------------
# Fixtures: saved tiny parents


def _save(tmp, name, model, tok):
    save_model(model, tok, tmp / name, {"phase": 1})
    return tmp / name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two different tiny Llamas sharing a tokenizer, a copy of parent 1, and a thinking pair."""
    tmp = tmp_path_factory.mktemp("parents")
    tok = make_tiny_tokenizer()
    a, b = make_tiny_model("llama", len(tok), seed=0), make_tiny_model("llama", len(tok), seed=1)
    paths = {"a": _save(tmp, "a", a, tok), "b": _save(tmp, "b", b, tok), "a2": _save(tmp, "a2", a, tok)}
    for name, seed in (("ta", 2), ("tb", 3)):
        t = make_tiny_tokenizer()
        m = make_tiny_model("llama", len(t), seed=seed)
        add_thinking_tokens(m, t)
        paths[name] = _save(tmp, name, m, t)
    return paths


def _states(seed_a=0, seed_b=1, kind="llama"):
    tok = make_tiny_tokenizer()
    a, b = make_tiny_model(kind, len(tok), seed=seed_a), make_tiny_model(kind, len(tok), seed=seed_b)
    return a, b, dict(a.state_dict()), dict(b.state_dict())


# ---------------------------------------------------------------------------------------
# Techniques on hand-made tensors


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("scale_a,scale_b", [(1.0, 1.0), (2.0, 3.0)])
def test_slerp_orthogonal_vectors_interpolate_the_angle(t, scale_a, scale_b):
    a = torch.tensor([scale_a, 0.0, 0.0])
    b = torch.tensor([0.0, scale_b, 0.0])
    expected = math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b
    assert torch.allclose(slerp_chain([a, b], t), expected, atol=1e-6)


def test_slerp_general_angle_and_matrix_shape():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    out = slerp_chain([a, b], 0.3)
    assert out.shape == (4, 6)
    assert torch.allclose(out, ref_slerp(a, b, 0.3), atol=1e-5)
    assert not torch.allclose(out, 0.7 * a + 0.3 * b, atol=1e-3)  # really spherical


def test_slerp_parallel_and_near_parallel_fall_back_to_linear():
    a = torch.tensor([1.0, 2.0, -1.0, 0.5])
    for b in (2 * a, a + 1e-4 * torch.tensor([1.0, -1.0, 0.5, 0.0])):
        out = slerp_chain([a, b], 0.25)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, 0.75 * a + 0.25 * b, atol=1e-6)


def test_slerp_chains_parent_by_parent():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(10, generator=g) for _ in range(3))
    expected = ref_slerp(ref_slerp(a, b, 0.4), c, 0.4)
    assert torch.allclose(slerp_chain([a, b, c], 0.4), expected, atol=1e-5)


def test_linear_is_the_weighted_average():
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(3, 5, generator=g) for _ in range(3))
    assert torch.allclose(linear([a, b, c], [0.2, 0.3, 0.5]), 0.2 * a + 0.3 * b + 0.5 * c, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.35, 0.5, 1.0])
def test_trim_keeps_the_largest_magnitudes_like_mergekit(density):
    from mergekit.sparsify import magnitude

    d = torch.randn(7, 9, generator=torch.Generator().manual_seed(3))
    out = trim_magnitude(d, density)
    assert out.flatten().tolist() == pytest.approx(ref_trim(d, density))
    assert torch.equal(out, magnitude(d, density))
    assert int((out != 0).sum()) == max(1, int(density * d.numel()))


def test_trim_on_a_large_tensor_is_a_top_k_selection():
    """Exactly k kept, each with its own value, and no dropped magnitude above a kept one."""
    g = torch.Generator().manual_seed(8)
    d = (torch.randn(600, 700, generator=g) * 64).round() / 64  # repeats at every threshold
    for density in (0.1, 0.5, 0.8):
        out = trim_magnitude(d, density)
        kept = out != 0
        assert int(kept.sum()) == int(density * d.numel())
        assert torch.equal(out[kept], d[kept])
        assert d[~kept].abs().max() <= d[kept].abs().min()


@pytest.mark.parametrize("density", [0.25, 0.5, 0.9])
def test_trim_keeps_exactly_k_with_equal_magnitudes_and_zeros(density):
    """The selection shortcut's two edge cases against the reference: magnitudes equal at
    the threshold (topk then picks exactly k; which of the equal ones is free, so the check
    is on the kept magnitudes) and a tensor mostly zero (every nonzero entry kept)."""
    g = torch.Generator().manual_seed(6)
    tied = torch.randint(-3, 4, (12, 10), generator=g).float()  # seven values, many repeats
    out = trim_magnitude(tied, density)
    k = max(1, int(density * tied.numel()))
    assert int((out != 0).sum()) == min(k, int((tied != 0).sum()))
    assert sorted(out.abs().flatten().tolist(), reverse=True)[:k] == \
        sorted(tied.abs().flatten().tolist(), reverse=True)[:k]
    assert torch.equal(out[out != 0], tied[out != 0])  # kept entries keep their sign and value
    sparse = torch.zeros(50)
    sparse[[3, 17, 40]] = torch.tensor([0.5, -2.0, 1.0])
    assert torch.equal(trim_magnitude(sparse, density), torch.tensor(ref_trim(sparse, density)))


@pytest.mark.parametrize("density", [0.3, 0.6, 1.0])
def test_ties_matches_trim_elect_disjoint_mean(density):
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(4, 5, generator=g) for _ in range(3)]
    weights = [0.5, 0.2, 0.3]
    assert torch.allclose(ties(deltas, weights, density), ref_ties(deltas, weights, density), atol=1e-6)


def test_ties_small_case_by_hand():
    """Entry 0: +3 and +1 agree against -1 -> mean 2; entry 1: +1 vs -5 -> -5 wins alone."""
    deltas = [torch.tensor([3.0, 1.0]), torch.tensor([1.0, -5.0]), torch.tensor([-1.0, 0.0])]
    assert torch.allclose(ties(deltas, [1 / 3] * 3, 1.0), torch.tensor([2.0, -5.0]))


def test_dare_keeps_the_seeded_mask_and_rescales_by_one_over_density():
    d = torch.randn(100, 100, generator=torch.Generator().manual_seed(5))
    out = dare(d, 0.3, torch.Generator().manual_seed(11))
    mask = torch.rand(d.shape, generator=torch.Generator().manual_seed(11)) < 0.3
    assert torch.equal(out, torch.where(mask, d / 0.3, torch.zeros_like(d)))
    kept = float((out != 0).float().mean())
    assert abs(kept - 0.3) < 0.03
    assert torch.equal(dare(d, 1.0, torch.Generator()), d)


# ---------------------------------------------------------------------------------------
# merge_state_dicts: stages put together


def test_linear_stage_normalises_genome_weights():
    _, _, sa, sb = _states()
    g = Genome(interp="linear", weights=(3.0, 1.0), taskvec_scale=0.0)
    out = merge_state_dicts(g, [sa, sb])
    for k in sa:
        assert torch.allclose(out[k], 0.75 * sa[k] + 0.25 * sb[k], atol=1e-6), k


@pytest.mark.parametrize("taskvec", ["ties", "dare"])
def test_task_vectors_from_the_stage1_model(taskvec):
    """No ancestor: task vectors are parent - stage-1 model, added back at taskvec_scale."""
    _, _, sa, sb = _states()
    g = Genome(interp="linear", taskvec=taskvec, weights=(0.5, 0.5), density=0.4, taskvec_scale=0.7)
    out = merge_state_dicts(g, [sa, sb], seed=3)
    k = "model.layers.1.mlp.up_proj.weight"
    mid = 0.5 * sa[k] + 0.5 * sb[k]
    deltas = [sa[k] - mid, sb[k] - mid]
    if taskvec == "ties":
        vector = ref_ties(deltas, [0.5, 0.5], 0.4)
        assert torch.allclose(out[k], mid + 0.7 * vector, atol=1e-5)
    else:  # the masks are the engine's; each entry keeps delta_k / density (weighted) or drops
        got = (out[k] - mid) / 0.7
        options = torch.stack([torch.zeros_like(mid), 0.5 * deltas[0] / 0.4, 0.5 * deltas[1] / 0.4])
        assert ((got[None] - options).abs() < 1e-5).any(0).all()
        nonzero = float((got.abs() > 1e-6).float().mean())  # exactly one of two kept: 2 * 0.4 * 0.6
        assert 0.38 < nonzero < 0.58


def test_task_vectors_from_a_common_ancestor():
    """With a base and a linear stage 1, lambda scales the sparsified task vector that
    replaces stage 1's plain one: lambda 1 gives exactly base + TIES(parent - base) (the TIES
    paper's merge, not the plain task vector added twice), lambda 2.5 two and a half times
    that vector, and lambda 0 the base itself."""
    _, _, sa, sb = _states()
    k = "model.layers.0.self_attn.q_proj.weight"
    g = torch.Generator().manual_seed(3)
    base = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in sa.items()}
    deltas = [sa[k] - base[k], sb[k] - base[k]]
    for lam in (1.0, 2.5, 0.0):
        genome = Genome(interp="linear", taskvec="ties", weights=(0.3, 0.7), density=0.4, taskvec_scale=lam)
        out = merge_state_dicts(genome, [sa, sb], base_state=base)
        assert torch.allclose(out[k], base[k] + lam * ref_ties(deltas, [0.3, 0.7], 0.4), atol=1e-5), lam


def test_lambda_n_with_equal_weights_is_task_arithmetic():
    """Equal weights, density 1 and lambda = number of parents: base + the sum of every
    parent's whole task vector (task arithmetic), for DARE (nothing dropped) and TIES on
    vectors whose signs agree."""
    _, _, sa, sb = _states()
    k = "model.layers.0.mlp.up_proj.weight"
    base = {n: t - 0.01 for n, t in sa.items()}
    sb = {n: sa[n] + (t - sa[n]).abs() for n, t in sb.items()}  # both task vectors >= 0: TIES keeps all
    for taskvec in ("dare", "ties"):
        genome = Genome(interp="linear", taskvec=taskvec, weights=(0.5, 0.5), density=1.0, taskvec_scale=2.0)
        out = merge_state_dicts(genome, [sa, sb], base_state=base)
        expected = base[k] + (sa[k] - base[k]) + (sb[k] - base[k])
        assert torch.allclose(out[k], expected, atol=1e-5), taskvec


def test_dare_merge_is_seeded():
    _, _, sa, sb = _states()
    g = Genome(taskvec="dare", density=0.5)
    one, two, other = (merge_state_dicts(g, [sa, sb], seed=s) for s in (7, 7, 8))
    k = "model.layers.0.mlp.down_proj.weight"
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert not torch.equal(one[k], other[k])


def test_frankenmerge_route_picks_layers_from_the_named_source():
    _, _, sa, sb = _states()
    g = Genome(interp="linear", taskvec_scale=0.0, layers="frankenmerge", route=(2, 0))
    out = merge_state_dicts(g, [sa, sb])
    for k in sa:
        if k.startswith("model.layers.0."):
            assert torch.equal(out[k], sb[k]), k
        else:  # layer 1 and the non-layer tensors come from the stage-2 model
            assert torch.allclose(out[k], 0.5 * sa[k] + 0.5 * sb[k], atol=1e-6), k
    assert set(out) == set(sa)


def test_dfs_path_sets_depth_and_layer_tensors():
    _, _, sa, sb = _states()
    path = ((2, 1), (1, 0), (0, 1), (2, 1))
    g = Genome(interp="linear", taskvec_scale=0.0, layers="dfs", route=path)
    out = merge_state_dicts(g, [sa, sb])
    layer_keys = {k.split(".", 3)[3] for k in sa if k.startswith("model.layers.0.")}
    assert {k for k in out if k.startswith("model.layers.")} == {
        f"model.layers.{j}.{s}" for j in range(4) for s in layer_keys}
    for j, (source, layer) in enumerate(path):
        for s in layer_keys:
            src = f"model.layers.{layer}.{s}"
            expected = {1: sa[src], 2: sb[src], 0: 0.5 * sa[src] + 0.5 * sb[src]}[source]
            assert torch.allclose(out[f"model.layers.{j}.{s}"], expected, atol=1e-6)


def test_dfs_model_computes_the_hand_run_of_parent_layers():
    """Parents that share embeddings and norms: the merged model's logits are parent layers
    run in the path's order, between parent 1's embedding and head."""
    a, b, sa, _ = _states()
    with torch.no_grad():
        b.model.embed_tokens.weight.copy_(a.model.embed_tokens.weight)
        b.model.norm.weight.copy_(a.model.norm.weight)
    sb = dict(b.state_dict())
    path = ((1, 0), (2, 1), (2, 0), (1, 1))
    g = Genome(interp="linear", taskvec_scale=0.0, layers="dfs", route=path)
    model = build_model(merge_state_dicts(g, [sa, sb]), _config_at_depth(a.config, 4))
    parents = {1: a, 2: b}
    with torch.no_grad():
        expected = hand_run(a, [parents[s].model.layers[l] for s, l in path], IDS)
        assert torch.allclose(model(IDS).logits, expected, atol=1e-5)
        own_path = Genome(layers="dfs", route=((1, 0), (1, 1)), taskvec_scale=0.0)
        own = build_model(merge_state_dicts(own_path, [sa, sb]), a.config)
        assert torch.allclose(own(IDS).logits, a(IDS).logits, atol=1e-5)


def _config_at_depth(config, depth):
    import copy

    c = copy.deepcopy(config)
    c.num_hidden_layers = depth
    return c


def test_untied_head_is_merged_too():
    _, _, sa, sb = _states(kind="qwen2")
    out = merge_state_dicts(Genome(taskvec_scale=0.0), [sa, sb])
    assert torch.allclose(out["lm_head.weight"], 0.5 * sa["lm_head.weight"] + 0.5 * sb["lm_head.weight"])
    assert not torch.allclose(out["lm_head.weight"], out["model.embed_tokens.weight"])


def test_per_tensor_dtype_is_kept():
    _, _, sa, sb = _states()
    sa = {k: v.to(torch.bfloat16) for k, v in sa.items()}
    sb = {k: v.to(torch.bfloat16) for k, v in sb.items()}
    sa["model.norm.weight"] = sa["model.norm.weight"].float()
    sb["model.norm.weight"] = sb["model.norm.weight"].float()
    out = merge_state_dicts(Genome(interp="slerp", taskvec="dare"), [sa, sb])
    assert out["model.norm.weight"].dtype == torch.float32
    assert out["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("genome, words", [
    (Genome(layers="frankenmerge", route=(0, 1, 2)), "one source per layer"),
    (Genome(layers="frankenmerge", route=(0, 3)), "out of range"),
    (Genome(layers="dfs", route=((1, 2),)), "out of range"),
    (Genome(layers="dfs", route=(1, 0)), "pairs"),
    (Genome(weights=(1.0, 1.0, 1.0)), "3 weights for 2 parents"),
])
def test_bad_routes_and_weights_are_refused(genome, words):
    _, _, sa, sb = _states()
    with pytest.raises(MergeError, match=words):
        merge_state_dicts(genome, [sa, sb])


# ---------------------------------------------------------------------------------------
# Parents on disk, saved merges


def test_identical_parents_merge_to_themselves(saved):
    parents = check_parents([saved["a"], saved["a2"]])
    a = AutoModelForCausalLM.from_pretrained(saved["a"])
    with torch.no_grad():
        ref = a(IDS).logits
        for g in first_generation(2) + [Genome(interp=i, taskvec_scale=0.0) for i in ("linear", "slerp")]:
            assert torch.allclose(merge_to_model(g, parents)(IDS).logits, ref, atol=1e-5), g.combination


def test_all_first_generation_combinations_save_load_and_generate(saved, tmp_path):
    parents = check_parents([saved["a"], saved["b"]])
    tok = AutoTokenizer.from_pretrained(saved["a"])
    seen = set()
    for g in first_generation(2):
        state = merge_state_dicts(g, parents.states(), seed=1)
        out = save_merged(state, parents, tmp_path / g.combination, g, {"seed": 1})
        model = AutoModelForCausalLM.from_pretrained(out)
        in_memory = merge_to_model(g, parents, seed=1)
        with torch.no_grad():
            assert torch.allclose(model(IDS).logits, in_memory(IDS).logits, atol=1e-6)
        text = model.generate(IDS, max_new_tokens=4, do_sample=False)
        assert text.shape == (1, IDS.shape[1] + 4)
        assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
        meta = read_meta(out)
        assert meta["genome"] == g.to_dict() and meta["seed"] == 1 and meta["phase"] == 2
        seen.add(tuple(model.state_dict()["model.layers.0.mlp.up_proj.weight"].flatten()[:4].tolist()))
    assert len(seen) > 1  # the combinations really differ


def test_deeper_dfs_saves_with_its_depth(saved, tmp_path):
    parents = check_parents([saved["a"], saved["b"]])
    g = Genome(layers="dfs", route=((1, 0), (2, 0), (0, 1), (1, 1), (2, 1)))
    assert merged_config(parents, g).num_hidden_layers == 5
    out = save_merged(merge_state_dicts(g, parents.states()), parents, tmp_path / "deep", g)
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 5
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, merge_to_model(g, parents)(IDS).logits, atol=1e-6)
    assert parents.config.num_hidden_layers == 2  # the parents' config is left alone


def test_parents_with_thinking_tokens_merge_and_keep_ids(saved, tmp_path):
    parents = check_parents([saved["ta"], saved["tb"]])
    tok = AutoTokenizer.from_pretrained(saved["ta"])
    g = Genome(interp="slerp", taskvec="ties", layers="dfs", route=((1, 0), (2, 1)))
    out = save_merged(merge_state_dicts(g, parents.states()), parents, tmp_path / "think", g)
    merged_tok = AutoTokenizer.from_pretrained(out)
    for t in ("[thinking]", "[/endthinking]", "<doubt>"):
        assert merged_tok.convert_tokens_to_ids(t) == tok.convert_tokens_to_ids(t) >= 258
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    think = torch.tensor([[tok.convert_tokens_to_ids("[thinking]"), 5, 6]])
    assert model.generate(think, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_base_is_checked_and_used(saved):
    parents = check_parents([saved["a"], saved["b"]], base=saved["a2"])
    g = Genome(taskvec="ties", density=1.0, taskvec_scale=1.0, weights=(0.5, 0.5))
    out = merge_to_model(g, parents).state_dict()
    sa, sb = parents.states()
    k = "model.layers.1.self_attn.o_proj.weight"
    # base == parent 1: only parent 2's delta is nonzero; scale 1 after linear = base + TIES
    expected = sa[k] + ref_ties([sa[k] - sa[k], sb[k] - sa[k]], [0.5, 0.5], 1.0)
    assert torch.allclose(out[k], expected, atol=1e-6)
    with pytest.raises(MergeError, match="base"):
        check_parents([saved["a"], saved["b"]], base=saved["ta"])


def test_hidden_size_mismatch_names_the_field(tmp_path, saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    wide = _save(tmp_path, "wide", LlamaForCausalLM(cfg), tok)
    with pytest.raises(MergeError) as err:
        check_parents([saved["a"], wide])
    msg = str(err.value)
    assert "hidden_size differs" in msg and ": 32" in msg and ": 48" in msg
    assert "tokenizer" not in msg and "\n" not in msg


def test_tokenizer_mismatch_names_the_tokens(tmp_path, saved):
    """Same config, but parent 2's tokenizer has one more added token than parent 1's."""
    tok = make_tiny_tokenizer()
    tok.add_tokens(["<extra>"], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(saved["b"])
    odd = _save(tmp_path, "odd", model, tok)
    with pytest.raises(MergeError, match=r"tokenizer vocabulary differs.*only in parent 2.*<extra>"):
        check_parents([saved["a"], odd])


def test_thinking_tokens_on_one_parent_only_is_refused(saved):
    with pytest.raises(MergeError) as err:
        check_parents([saved["a"], saved["ta"]])
    msg = str(err.value)
    assert "vocab_size differs" in msg and "[thinking]" in msg


def test_one_parent_is_refused(saved):
    with pytest.raises(MergeError, match="at least 2"):
        check_parents([saved["a"]])


def test_layer_path_defaults_are_the_identity():
    assert layer_path(Genome(layers="frankenmerge"), 3, 2) == [(0, 0), (0, 1), (0, 2)]
    assert layer_path(Genome(layers="dfs"), 3, 2) == [(0, 0), (0, 1), (0, 2)]


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_other_families_merge_at_a_new_depth(kind, tmp_path):
    tok = make_tiny_tokenizer()
    paths = [_save(tmp_path, name, make_tiny_model(kind, len(tok), seed=seed), tok)
             for name, seed in (("a", 0), ("b", 1))]
    parents = check_parents(paths)
    g = Genome(interp="slerp", taskvec="dare", layers="dfs", route=((1, 0), (0, 1), (2, 0)))
    out = save_merged(merge_state_dicts(g, parents.states()), parents, tmp_path / "m", g)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, merge_to_model(g, parents)(IDS).logits, atol=1e-6)


def test_unreadable_parent_is_named(saved, tmp_path):
    with pytest.raises(MergeError, match=r"parent 2 .*cannot read its config"):
        check_parents([saved["a"], tmp_path / "nowhere"])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_mapped_state_equals_the_loaded_state_and_refuses_foreign_names(kind, tmp_path):
    """Streaming's views of the files against `load_state` (names in order, dtypes, values;
    a tied head held once), and a checkpoint whose tensor names are not the model's is
    refused rather than guessed."""
    from safetensors.torch import load_file, save_file

    from agent_forge.evomerge.merge import load_state, mapped_state

    tok = make_tiny_tokenizer()
    path = save_model(make_tiny_model(kind, len(tok)), tok, tmp_path / kind)
    loaded, mapped = load_state(path), mapped_state(path)
    assert list(mapped) == list(loaded)
    assert all(mapped[k].dtype == loaded[k].dtype and torch.equal(mapped[k], loaded[k]) for k in loaded)
    weights = load_file(path / "model.safetensors")
    first = next(iter(weights))
    weights["renamed." + first] = weights.pop(first)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(MergeError, match="not named as the model's state dict"):
        mapped_state(path)
