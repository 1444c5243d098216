"""Token-level Quiet-STaR RL: each loss part against a hand computation, the REINFORCE
direction, one real step, and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import agent_forge.quietstar.token_rl as trl
from agent_forge.quietstar.mixing import MixingHead
from agent_forge.quietstar.thoughts import ThoughtBatch, generate_thoughts
from agent_forge.training.batching import step_indices
from agent_forge.training.policy_gradient import reinforce_per_thought
from agent_forge.vocab import add_thinking_tokens
from conftest import Crash, baked_token_setup, crash_at, make_tiny_model, make_tiny_tokenizer, rl_cli

TEXTS = ["Question: what is 2+3?\nAnswer: 5. Two and three make five.",
         "Question: name a colour.\nAnswer: blue, like the sky at noon."] * 3


def sharp(model, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


# ---------------------------------------------------------------- pieces by hand

def test_rewards_baseline_and_clamping():
    ll_after = torch.tensor([[[-1.0, -2.0], [-0.5, -4.0], [-3.0, -1.0]]])      # (S=1, K=3, n=2)
    ll_without = torch.tensor([[-2.0, -2.0]])
    valid = torch.tensor([[True, False]])                                       # 2nd token invalid
    r = trl.rewards(ll_after, ll_without, valid)
    assert r.tolist() == [[1.0, 1.5, -1.0]]                                     # only t=0 counts
    mean = (1.0 + 1.5 - 1.0) / 3
    assert trl.advantages(r, False)[0].tolist() == pytest.approx([1 - mean, 1.5 - mean, -1 - mean])
    assert trl.advantages(r, True)[0].tolist() == pytest.approx([1 - mean, 1.5 - mean, 0.0])


def test_policy_loss_sign_and_gradient():
    adv = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    lp = torch.tensor([[-3.0, -1.0], [-2.0, -5.0]], requires_grad=True)
    loss = reinforce_per_thought(adv, lp)
    assert loss.item() == pytest.approx(-(2 * -3.0 + 1 * -5.0) / 4)
    loss.backward()
    # gradient descent raises the log-prob of positive-advantage thoughts, ignores the others
    assert lp.grad.tolist() == [[-0.5, 0.0], [0.0, -0.25]]


def test_distinct2_by_hand():
    toks = torch.tensor([[[9, 1, 2, 1, 2, 9], [9, 1, 2, 3, 4, 9]]])  # bigrams 12 21 12 | 12 23 34
    assert trl.thought_diversity(toks) == pytest.approx(4 / 6)
    assert trl.thought_diversity(toks[..., :3]) == 1.0  # no bigram inside a thought: nothing repeats


def fake_batch(model, seed=0, B=1, T=5, K=2, n=2, L=4):
    """A ThoughtBatch-like input with random contents and positions 0 and 2 selected."""
    g = torch.Generator().manual_seed(seed)
    H, V = model.config.hidden_size, model.config.vocab_size
    sel = torch.zeros(B, T, dtype=torch.bool)
    sel[0, [0, 2]] = True
    valid = sel[:, :, None].expand(B, T, n).clone()
    valid[0, 2, 1] = False
    return ThoughtBatch(
        thought_tokens=torch.randint(0, V, (B, T, K, L), generator=g), selected=sel,
        thought_logprobs=-torch.rand(B, T, K, L, generator=g), true_tokens=torch.randint(0, V, (B, T, n), generator=g),
        true_valid=valid, base_hidden=torch.randn(B, T, H, generator=g),
        base_logits=torch.randn(B, T, V, generator=g), base_true_hidden=torch.randn(B, T, n, H, generator=g),
        thought_hidden=torch.randn(B, T, K, n, H, generator=g),
        ll_without=-torch.rand(B, T, n, generator=g) * 5, ll_with=-torch.rand(B, T, K, n, generator=g) * 5)


@pytest.mark.parametrize("source,clamp", [("mixed", True), ("thought", False)])
def test_loss_parts_by_hand(source, clamp):
    model = make_tiny_model("llama", 50)
    head = MixingHead(model.config.hidden_size)
    with torch.no_grad():
        head.net[-1].weight.normal_(0, 0.3)
    tb = fake_batch(model)
    ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ref = torch.randn(1, 5, 50, generator=torch.Generator().manual_seed(5))
    cfg = trl.TokenRLConfig(reward_source=source, clamp_negative_advantage=clamp, kl_top_k=None,
                            policy_weight=0.7, kl_coefficient=0.3)
    got = trl.token_rl_loss(model, head, tb, ids, mask, ref, cfg)

    E = model.get_output_embeddings().weight
    with torch.no_grad():
        r, ll_mix, lps = [], [], []
        for j in (0, 2):
            row_r, row_ll = [], []
            for k in range(2):
                tot = 0.0
                for t in range(2):
                    hb, ht = tb.base_true_hidden[0, j, t], tb.thought_hidden[0, j, k, t]
                    w = torch.tanh(head.net(torch.cat([hb, ht])))
                    ll = torch.log_softmax(E @ (hb + w * (ht - hb)), -1)[tb.true_tokens[0, j, t]].item()
                    if tb.true_valid[0, j, t]:
                        row_ll.append(ll)
                        after = ll if source == "mixed" else tb.ll_with[0, j, k, t].item()
                        tot += after - tb.ll_without[0, j, t].item()
                row_r.append(tot)
            r.append(row_r)
            ll_mix += row_ll
            lps.append([tb.thought_logprobs[0, j, k].sum().item() for k in range(2)])
        adv = [[x - sum(row) / 2 for x in row] for row in r]
        adv = [[max(0.0, a) if clamp else a for a in row] for row in adv]
        policy = -sum(a * lp for ra, rl in zip(adv, lps) for a, lp in zip(ra, rl)) / 4
        base = -sum(torch.log_softmax(tb.base_logits[0, j], -1)[ids[0, j + 1]].item() for j in range(4)) / 4
        mixed = -sum(ll_mix) / len(ll_mix)
        kl = 0.0
        for j in range(5):
            p = torch.softmax(ref[0, j].double(), -1)
            q = torch.softmax(tb.base_logits[0, j].double(), -1)
            kl += float((p * (p.log() - q.log())).sum()) / 5
    torch.testing.assert_close(got["reward"], torch.tensor(r), atol=1e-4, rtol=0)
    assert got["policy"].item() == pytest.approx(policy, abs=1e-4)
    assert got["base_nll"].item() == pytest.approx(base, abs=1e-4)
    assert got["mixed_nll"].item() == pytest.approx(mixed, abs=1e-4)
    assert got["kl"].item() == pytest.approx(kl, abs=1e-4)
    total = 0.7 * policy + 0.5 * base + 0.5 * mixed + 0.3 * kl
    assert got["loss"].item() == pytest.approx(total, abs=1e-4)


def test_meta_token_boost_scales_the_update():
    model = make_tiny_model("llama", 30)
    emb = model.get_input_embeddings().weight
    boost = trl.MetaTokenBoost(model, [3, 7], 10.0)
    before = emb.detach().clone()
    boost.before_step()
    with torch.no_grad():
        emb -= 0.01                         # "the optimiser step"
    boost.after_step()
    delta = emb.detach() - before
    assert torch.allclose(delta[[3, 7]], torch.full_like(delta[[3, 7]], -0.1), atol=1e-6)
    assert torch.allclose(delta[0], torch.full_like(delta[0], -0.01), atol=1e-6)


# ---------------------------------------------------------------- real steps on a tiny model

def tiny_cfg(**kw):
    base = dict(n_thoughts=2, thought_len=4, n_true=2, steps=1, batch_size=2, seq_len=24,
                save_every=0, lr=1e-3, injection="top_fraction", fraction=0.5)
    return trl.TokenRLConfig(**{**base, **kw})


def test_one_step_changes_model_and_head(tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    trainer = trl.TokenRLTrainer(model, tok, tiny_cfg(), tmp_path)
    ids, mask = trl.encode_crops(trl.load_texts(TEXTS), tok, 24)
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    head_before = {k: v.clone() for k, v in trainer.head.state_dict().items()}
    summary = trainer.run(ids, mask)
    assert summary["steps"] == 1
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in model_before.items())
    assert not torch.equal(head_before["net.2.weight"], trainer.head.state_dict()["net.2.weight"])
    row = trainer.history[0]
    for key in ("reward_mean", "reward_rolling", "thought_length", "thought_diversity", "n_thoughts",
                "kl", "lr", "policy_loss", "base_nll", "mixed_nll", "frac_thought", "sec_per_step"):
        assert math.isfinite(row[key]), key
    assert 0 < row["frac_thought"] <= 0.5


def thought_logprob(model, prefix, thought, banned):
    """log p(sampled thought tokens | prefix), banned ids removed: the slow way. `thought` is
    [start, sampled..., end]."""
    seq = prefix + thought[:-1]               # text, start .. last sampled token
    logits = model(torch.tensor([seq])).logits[0].float()
    logits[:, banned] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    first = len(prefix)                       # output at `start` predicts thought[1]
    return sum(logp[first + i - 1, thought[i]] for i in range(1, len(thought) - 1))


def test_positive_advantage_thought_becomes_more_likely():
    V, START, END = 40, 38, 39
    model = sharp(make_tiny_model("llama", V))
    ids = torch.randint(0, V - 2, (1, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    head = MixingHead(model.config.hidden_size)
    cfg = trl.TokenRLConfig(reward_source="thought", base_nll_weight=0, mixed_nll_weight=0,
                            kl_coefficient=0)
    tb = generate_thoughts(model, ids, mask, start_id=START, end_id=END, n_thoughts=3, thought_len=5,
                           n_true=3, generator=torch.Generator().manual_seed(0), banned_ids=[START, END])
    parts = trl.token_rl_loss(model, head, tb, ids, mask, None, cfg)
    s, k = divmod(int(parts["advantage"].argmax()), 3)
    assert parts["advantage"][s, k] > 0
    j = int(tb.selected[0].nonzero()[s])
    thought = tb.thought_tokens[0, j, k].tolist()
    prefix = ids[0, : j + 1].tolist()
    before = thought_logprob(model, prefix, thought, [START, END]).item()
    assert before == pytest.approx(tb.logprob_sum[0, j, k].item(), abs=1e-4)
    parts["loss"].backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # big next to RL rates (1e-5)
    opt.step()
    with torch.no_grad():
        after = thought_logprob(model, prefix, thought, [START, END]).item()
    assert after > before + 1e-3


@pytest.mark.parametrize("optimizer", ["adamw", "mugrokfast"])
def test_run_and_exact_resume(tmp_path, optimizer):
    overrides = dict(n_thoughts=2, thought_len=4, n_true=2, steps=4, batch_size=2, seq_len=24,
                     save_every=2, lr=1e-3, injection="top_fraction", fraction=0.5, optimizer=optimizer,
                     kl_coefficient=0.5)

    def fresh():
        tok = make_tiny_tokenizer()
        return make_tiny_model("llama", len(tok)), tok

    full = trl.run_token_rl(fresh(), tmp_path / "a", TEXTS, overrides)

    with pytest.raises(Crash):
        trl.run_token_rl(fresh(), tmp_path / "b", TEXTS, overrides, progress=crash_at(2))
    resumed = trl.run_token_rl(fresh(), tmp_path / "b", TEXTS, overrides, resume=True)
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    for name in ("model.safetensors", trl.HEAD_FILE):
        a, b = load_file(tmp_path / "a" / "model" / name), load_file(tmp_path / "b" / "model" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    assert full["metrics"]["reward_rolling"] == pytest.approx(resumed["metrics"]["reward_rolling"], abs=1e-6)
    from agent_forge.models import read_meta
    meta = read_meta(tmp_path / "a" / "model")
    assert (meta["phase"], meta["step"], meta["mode"]) == (3, 2, "token")
    assert (tmp_path / "a" / "step2.json").exists()
    head_a = load_file(tmp_path / "a" / "model" / trl.HEAD_FILE)["net.2.weight"]
    assert head_a.abs().sum() > 0  # the head opened


def test_crops_and_batches_are_deterministic():
    tok = make_tiny_tokenizer()
    ids, mask = trl.encode_crops(TEXTS, tok, 16)
    assert ids.shape[1] == 16 and mask.all()
    short_ids, short_mask = trl.encode_crops(["hi"], tok, 16)
    assert short_mask.sum() == 3  # "h", "i", EOS
    assert step_indices(3, 4, 10, 0) == step_indices(3, 4, 10, 0)
    seen = sum((step_indices(s, 5, 10, 0) for s in range(2)), [])
    assert sorted(seen) == list(range(10))  # one epoch visits every crop once


def test_adaptive_thought_defaults_follow_model_size():
    from agent_forge.models import adaptive_defaults, measure_model

    model = make_tiny_model("llama", 60)
    cfg = trl.resolve_adaptive(trl.TokenRLConfig(), model)
    want = adaptive_defaults(measure_model(model), cfg.seq_len)
    assert (cfg.n_thoughts, cfg.thought_len) == (want["n_thoughts"], want["thought_length"])
    assert trl.resolve_adaptive(trl.TokenRLConfig(n_thoughts=3, thought_len=6), model).n_thoughts == 3


# ---------------------------------------------------------------- held-out evaluation and the CLI

def _eval_file(tmp_path):
    import json

    from test_inference import MEMORY

    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": right}) + "\n"
                            for q, (_, right, _) in MEMORY.items()))
    return str(path)


def test_held_out_eval_before_and_after_with_and_without_thoughts(tmp_path):
    """Token Step 2 answers held-out questions before training and after it, with the trained
    head's silent thoughts and without them, and pairs the three."""
    import copy

    from test_inference import memorised_model

    model, tok = memorised_model()
    res = trl.run_token_rl((copy.deepcopy(model), tok), tmp_path / "out", TEXTS,
                           {**tiny_cfg().to_dict(), "eval_samples": 3, "eval_max_new_tokens": 24,
                            "eval_thought_positions": "all", "lr": 1e-6},
                           eval_data=_eval_file(tmp_path))
    h = res["held_out"]
    assert h["n"] == 3 and h["before"]["accuracy"] == 1.0  # the memorised model, plain decoding
    assert (h["before"]["thought_positions"], h["after"]["thought_positions"],
            h["after_no_thoughts"]["thought_positions"]) == ("none", "all", "none")
    assert h["gain_vs_before"]["before"] == h["before"]["accuracy"]
    assert h["gain_vs_before"]["after"] == h["gain_vs_no_thoughts"]["after"] == h["after"]["accuracy"]
    assert h["after"]["ms_per_example"] > 0 and "correct" not in h["after"]
    assert json.loads((tmp_path / "out" / "step2.json").read_text())["held_out"] == h


def _rl_cli(tmp_path, **kw):
    return rl_cli(tmp_path, **{"json_out": False, **kw})


def _baked(tmp_path):
    return baked_token_setup(tmp_path)


@pytest.mark.parametrize("option", [{"samples": 4}, {"questions": 2}, {"reward": "correct"}])
def test_token_mode_rejects_answer_mode_options(tmp_path, option, capsys):
    import typer

    with pytest.raises(typer.Exit):
        _rl_cli(tmp_path, **_baked(tmp_path), **option)
    assert f"--{next(iter(option))}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "step2.json").exists()


def test_token_mode_prints_metrics_and_held_out_eval(tmp_path, capsys):
    """--eval-data / --eval-samples / --device reach token mode; its metrics are printed."""
    _rl_cli(tmp_path, **_baked(tmp_path), eval_data=_eval_file(tmp_path), eval_samples=2, device="cpu")
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("  ")}
    for key in ("reward_rolling", "kl", "mix_weight_mean", "frac_thought", "sec_per_step"):
        float(rows[key])  # a number, not "-"
    assert "held-out" in text and "silent thoughts difficult" in text and "ms/example" in text
    saved = json.loads((tmp_path / "out" / "step2.json").read_text())
    assert saved["held_out"]["n"] == 2 and saved["eval_data"].endswith("held_out.jsonl")


# ---------------------------------------------------------------- text format, probes, figures

def test_records_as_answer_only_drops_the_written_thinking():
    from agent_forge.data.schema import Record, Segment
    from agent_forge.vocab import get_vocab

    recs = [Record("a", "What is 2 + 3?", [Segment("step", "2 + 3 = 5")], "5", "5", "t")]
    assert trl.load_texts(recs, records_as="answer_only") == ["Question: What is 2 + 3?\nAnswer: 5"]
    full = trl.load_texts(recs)[0]
    assert get_vocab().open in full and "2 + 3 = 5" in full and full.endswith(" 5")
    with pytest.raises(ValueError, match="records_as"):
        trl.load_texts(recs, records_as="plain")


def test_grad_norms_match_separate_backward_passes():
    """The probe's two norms equal the norms of each weighted term's gradient computed alone,
    and the step's own backward still runs afterwards (the graph was kept)."""
    tok = make_tiny_tokenizer()
    model = sharp(make_tiny_model("llama", len(tok)))
    ids_map = add_thinking_tokens(model, tok)
    start, end = sorted(ids_map.values())[:2]
    head = MixingHead(model.config.hidden_size)
    with torch.no_grad():
        head.net[-1].weight.normal_(0, 0.3)
    ids, mask = trl.encode_crops(trl.load_texts(TEXTS), tok, 24)
    cfg = tiny_cfg(reward_source="thought", clamp_negative_advantage=False, policy_weight=3.0, injection="all",
                   base_nll_weight=0.5, mixed_nll_weight=0.25)
    parts, _ = trl.step_loss(model, None, head, ids[:2], mask[:2], cfg, start, end, torch.Generator().manual_seed(0))
    got = trl.grad_norms(model, parts, cfg)

    def alone(term) -> float:
        model.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        return sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None) ** 0.5

    pol = alone(3.0 * parts["policy"])
    lm = alone(0.5 * parts["base_nll"] + 0.25 * parts["mixed_nll"])
    assert pol > 0 and lm > 0
    assert got["grad_norm_policy"] == pytest.approx(pol, rel=1e-4)
    assert got["grad_norm_lm"] == pytest.approx(lm, rel=1e-4)
    assert got["grad_ratio_policy_lm"] == pytest.approx(pol / lm, rel=1e-4)
    parts["loss"].backward()


def test_thought_token_logprob_is_the_mean_over_sampled_tokens():
    model = make_tiny_model("llama", 50)
    tb = fake_batch(model, L=5)
    tb.thought_tokens[~tb.selected] = trl.NOT_SELECTED
    sampled = tb.thought_logprobs[tb.selected][..., 1:-1]  # (S, K, L-2): start and end are forced
    assert trl.thought_token_logprob(tb) == pytest.approx(float(sampled.mean()), abs=1e-6)
    tb.thought_tokens.fill_(trl.NOT_SELECTED)
    assert trl.thought_token_logprob(tb) == 0.0


def test_grad_probe_runs_on_its_steps_only(tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    trainer = trl.TokenRLTrainer(model, tok, tiny_cfg(steps=3, grad_probe_every=2), tmp_path)
    ids, mask = trl.encode_crops(trl.load_texts(TEXTS), tok, 24)
    trainer.run(ids, mask)
    probed = ["grad_norm_policy" in row for row in trainer.history]
    assert probed == [True, False, True]
    assert all(math.isfinite(row["thought_token_logprob"]) for row in trainer.history)
