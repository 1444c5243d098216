"""Step 2 (answer mode): advantages, policy gradient, KL, log-prob recomputation, the loglik
reward, and exact resume, on tiny models."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from agent_forge.data.schema import Record, Segment, write_records
from agent_forge.quietstar.rl import RLConfig, RLTrainer
from agent_forge.quietstar.rl_rollouts import (Samples, combine_rewards, loglik_gains, sample,
                                               valid_lengths)
from agent_forge.training.batching import step_indices
from agent_forge.training.kl import kl_policy_to_ref as kl_penalty
from agent_forge.training.kl import kl_policy_to_ref_k3 as k3_kl
from agent_forge.training.logprobs import sample_logits, token_logprobs
from agent_forge.training.policy_gradient import distinct_n, group_advantages
from agent_forge.training.policy_gradient import reinforce_per_token as policy_loss
from agent_forge.vocab import add_thinking_tokens

from conftest import Crash, baked_token_setup, crash_at, make_tiny_model, make_tiny_tokenizer, rl_cli


def make_policy(kind="llama", seed=0):
    tok = make_tiny_tokenizer()
    model = make_tiny_model(kind, len(tok), seed=seed)
    add_thinking_tokens(model, tok)
    return tok, model


def records(n=12):
    out = []
    for i in range(n):
        r = random.Random(i)
        a, b = r.randint(1, 9), r.randint(10, 99)
        out.append(Record(f"r{i}", f"{a} + {b} = ?", [Segment("step", f"{a} + {b} = {a + b}")],
                          str(a + b), str(a + b), "test", family="sum"))
    return out


def tiny_cfg(**kw):
    base = dict(steps=3, questions_per_step=2, samples_per_question=3, max_new_tokens=10,
                coherence_embedder="none", save_every=0, warmup_steps=1)
    base.update(kw)
    return RLConfig(**base)


# ---------------------------------------------------------------------------------------
# Advantages and rewards


@pytest.mark.parametrize("normalize", [False, True])
def test_group_advantages_match_hand_loop(normalize):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0]
    k = 4
    want = []
    for g in range(0, len(rewards), k):
        grp = rewards[g:g + k]
        mean = sum(grp) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / k)
        want += [(x - mean) / (std + 1e-4) if normalize else x - mean for x in grp]
    got = group_advantages(torch.tensor(rewards), k, normalize_std=normalize)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    assert got[4:8].abs().max() == 0  # a group that agrees carries no signal


def test_combine_rewards_modes():
    cfg = RLConfig(loglik_weight=0.5, loglik_clip=2.0)
    correct, gains = [1.0, 0.0, 1.0], [5.0, -0.4, -9.0]
    assert combine_rewards(correct, gains, RLConfig(reward="correct")) == correct
    assert combine_rewards(correct, gains, RLConfig(reward="loglik")) == gains
    assert combine_rewards(correct, gains, cfg) == pytest.approx([2.0, -0.2, 0.0])
    with pytest.raises(ValueError):
        combine_rewards(correct, None, cfg)
    shaped = RLConfig(reward="correct", consistency_weight=0.5)
    assert combine_rewards(correct, None, shaped, [1.0, 0.5, 0.0]) == pytest.approx([1.5, 0.25, 1.0])
    with pytest.raises(ValueError, match="consistency"):
        combine_rewards(correct, None, shaped)
    honest = RLConfig(reward="correct", consistency_weight=0.5, honesty_weight=1.0)
    assert combine_rewards(correct, None, honest, [1.0, 0.5, 0.0], [1.0, None, 0.5]) == pytest.approx(
        [2.5, 0.25, 1.5])  # a thought without a judged check earns no honesty reward
    with pytest.raises(ValueError, match="check honesty"):
        combine_rewards(correct, None, honest, [1.0, 0.5, 0.0])


def test_step_questions_pure_function_of_seed_and_step():
    a = [step_indices(s, 4, 10, 3, offset=7) for s in range(5)]
    assert a == [step_indices(s, 4, 10, 3, offset=7) for s in range(5)]
    assert sorted(a[0] + a[1] + a[2][:2]) == list(range(10))  # one epoch covers every question once
    assert a != [step_indices(s, 4, 10, 4, offset=7) for s in range(5)]


def test_distinct_n():
    assert distinct_n([t.split() for t in ["a b c", "a b d"]]) == pytest.approx(3 / 4)
    assert distinct_n([["x"]]) == 0.0


# ---------------------------------------------------------------------------------------
# Policy loss and its gradient


def test_policy_loss_normalisations_match_hand_loop():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    tok = -(2.0 * (-6.0) + (-1.0) * (-1.0)) / 5
    seq = -((2.0 * (-6.0) / 3) + (-1.0 * (-1.0) / 2)) / 2
    assert policy_loss(logp, mask, adv, "token").item() == pytest.approx(tok)
    assert policy_loss(logp, mask, adv, "sequence").item() == pytest.approx(seq)


def _seq_logp(model, s: Samples) -> torch.Tensor:
    with torch.no_grad():
        lp = token_logprobs(sample_logits(model, s.sequences, s.mask, s.n_new), s.sequences[:, -s.n_new:])
    return torch.where(s.new_mask, lp, torch.zeros_like(lp)).sum(1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sgd_step_moves_logprob_with_the_advantage(sign):
    tok, model = make_policy()
    torch.manual_seed(1)
    s = sample(model, tok, ["3 + 4 = ?"], 1, tiny_cfg())
    before = _seq_logp(model, s)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lp = token_logprobs(sample_logits(model, s.sequences, s.mask, s.n_new), s.sequences[:, -s.n_new:])
    policy_loss(lp, s.new_mask, torch.tensor([sign])).backward()
    opt.step()
    after = _seq_logp(model, s)
    assert (after - before).item() * sign > 0


def test_trainer_reinforces_the_rewarded_sample(tmp_path):
    """Stub reward: the first sample of each group gets 1, the rest 0; one big-lr step with
    no KL must raise the first sample's log-prob relative to its siblings."""
    tok, model = make_policy()
    cfg = tiny_cfg(steps=1, lr=0.05, kl_coefficient=0.0, warmup_steps=1, max_grad_norm=1e9,
                   coherence=False, reward="correct")
    k = cfg.samples_per_question
    stub = lambda s, batch: [1.0 if i % k == 0 else 0.0 for i in range(len(s.new_ids))]  # noqa: E731
    trainer = RLTrainer(model, tok, cfg, tmp_path, reward_fn=stub)
    ref = trainer.reference
    trainer.run(records())
    s = trainer.last_samples
    gain = _seq_logp(trainer.trained_model(), s) - _seq_logp(ref, s)
    for q in range(cfg.questions_per_step):
        g = gain[q * k:(q + 1) * k]
        assert g[0] > g[1:].max()


# ---------------------------------------------------------------------------------------
# KL to the reference


def test_k3_expectation_equals_kl_definition():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(7), torch.randn(7)
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    definition = sum(lp.exp()[i] * (lp[i] - lq[i]) for i in range(7))
    expectation = (lp.exp() * k3_kl(lp, lq)).sum()  # E_{x ~ policy}[k3(x)], exactly
    assert expectation.item() == pytest.approx(definition.item(), rel=1e-5)
    assert torch.all(k3_kl(lp, lq) >= 0)
    assert torch.all(k3_kl(lp, lp) == 0)


@pytest.mark.parametrize("estimator", ["k3", "full"])
def test_kl_penalty_zero_for_equal_models_positive_otherwise(estimator):
    torch.manual_seed(0)
    pol, ref = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    lp, lr = token_logprobs(pol, targets), token_logprobs(ref, targets)
    assert kl_penalty(pol, pol, lp, lp, mask, estimator).item() == pytest.approx(0.0, abs=1e-6)
    got = kl_penalty(pol, ref, lp, lr, mask, estimator).item()
    assert got > 0
    if estimator == "full":
        want, n = 0.0, 0
        for b in range(2):
            for t in range(3):
                if mask[b, t]:
                    p, q = pol[b, t].softmax(-1), ref[b, t].softmax(-1)
                    want += float((p * (p / q).log()).sum())
                    n += 1
        assert got == pytest.approx(want / n, rel=1e-5)
    else:
        r = (lr - lp)[mask]
        assert got == pytest.approx(float((r.exp() - r - 1).mean()), rel=1e-5)


@pytest.mark.parametrize("norm,estimator", [("token", "k3"), ("sequence", "full")])
def test_micro_batches_give_the_full_batch_loss_and_gradient(tmp_path, norm, estimator):
    """Length-sorted, padding-trimmed micro-batches must change nothing but the cost."""
    tok, model = make_policy()
    torch.manual_seed(0)
    s = sample(model, tok, ["1 + 2 = ?", "10 + 20 + 300 = ?", "7 * 8 = ?"], 2, tiny_cfg(max_new_tokens=12))
    assert len(set(s.new_mask.sum(1).tolist())) > 1  # rows of different lengths
    adv = torch.tensor([1.0, -0.5, 0.3, -2.0, 0.7, 0.1])
    results = []
    for rows in (100, 2):
        cfg = tiny_cfg(micro_batch_rows=rows, loss_norm=norm, kl_estimator=estimator, coherence=False)
        tr = RLTrainer(model, tok, cfg, tmp_path / str(rows),
                       reference=make_tiny_model("llama", model.config.vocab_size, seed=5))
        model.zero_grad()
        row = tr.loop.accumulate(tr, tr.policy_micros(s, adv))
        results.append((row, [p.grad.clone() for p in model.parameters()]))
    (full, g_full), (micro, g_micro) = results
    assert micro["policy_loss"] == pytest.approx(full["policy_loss"], rel=1e-4, abs=1e-6)
    assert micro["kl"] == pytest.approx(full["kl"], rel=1e-4) and full["kl"] > 0
    for a, b in zip(g_full, g_micro):
        assert torch.allclose(a, b, atol=1e-5)


def test_kl_is_zero_on_the_first_step_and_positive_after(tmp_path):
    tok, model = make_policy()
    cfg = tiny_cfg(steps=2, lr=0.05, coherence=False, reward="loglik")
    hist = RLTrainer(model, tok, cfg, tmp_path).run(records()).history
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    assert hist[1]["kl"] > 1e-6


# ---------------------------------------------------------------------------------------
# Sampling and log-prob recomputation


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_recomputed_logprobs_match_generate_scores(kind):
    tok, model = make_policy(kind)
    # a hub model's defaults must not leak into sampling (they would bend the distribution)
    model.generation_config.top_k, model.generation_config.repetition_penalty = 5, 1.5
    model.generation_config.min_p, model.generation_config.temperature = 0.2, 0.3
    torch.manual_seed(0)
    s = sample(model, tok, ["1 + 2 = ?", "10 + 20 + 300 = ?"], 2, tiny_cfg(), return_scores=True)
    targets = s.sequences[:, -s.n_new:]
    recomputed = token_logprobs(sample_logits(model, s.sequences, s.mask, s.n_new), targets)
    from_scores = token_logprobs(torch.stack(s.scores, 1), targets)
    assert torch.isfinite(recomputed[s.new_mask]).all()
    assert torch.allclose(recomputed[s.new_mask], from_scores[s.new_mask], atol=1e-4)
    assert s.sequences.shape[0] == 4 and len(set(len(p) for p in s.prompt_ids)) == 2  # padding exercised
    assert model.generation_config.top_k == 5  # restored


def test_valid_lengths_replay_stop_rules():
    tok, _ = make_policy()
    close = tok.convert_tokens_to_ids("[/endthinking]")
    eos = tok.eos_token_id
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [ids("ab") + [close] + ids(" 5\nxyz"),   # stops at the newline after the answer
            ids("abc") + [eos] + ids("zzzzz"),        # stops at EOS (counted)
            ids("a\nb") + ids("cccccc"),              # a newline inside thinking does not stop
            ids("ab") + [close] + ids("\n 7") + [eos] + ids("q")]  # newline before any answer text: no stop
    width = max(len(r) for r in rows)
    new = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    got = valid_lengths(tok, new, {eos}, close)
    assert got == [len(ids("ab")) + 1 + len(ids(" 5\n")), len(ids("abc")) + 1, width,
                   len(ids("ab")) + 1 + len(ids("\n 7")) + 1]


# ---------------------------------------------------------------------------------------
# The log-likelihood reward


def test_batched_continuation_logprob_matches_one_row_at_a_time():
    from agent_forge.training.logprobs import continuation_logprob

    tok, model = make_policy("qwen2")
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    contexts = [ids("Question: 1 + 2 = ?"), ids("Q: 100 + 250 + 3 = ?\nA:"), ids("x")]
    conts = [ids(" 3"), ids(" 353") + [tok.eos_token_id], ids(" yz")]
    got = continuation_logprob(model, contexts, conts, tok.pad_token_id)
    for c, a, g in zip(contexts, conts, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([c + a])).logits[0].log_softmax(-1)
        want = sum(float(logits[len(c) - 1 + j, a[j]]) for j in range(len(a)))
        assert g == pytest.approx(want, abs=1e-4)


class BagOfTokens(torch.nn.Module):
    """Predicts the tokens it has seen: logits[t] = 3 for each token present in x[:t+1], else 0."""

    def __init__(self, vocab_size):
        super().__init__()
        self.v = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids=None, **kw):
        onehot = torch.nn.functional.one_hot(input_ids, self.v).float() * attention_mask[..., None]
        return SimpleNamespace(logits=3.0 * onehot.cumsum(1).clamp(max=1.0))


def test_loglik_reward_sign_on_a_handmade_case():
    tok, _ = make_policy()
    model = BagOfTokens(len(tok))
    close = tok.convert_tokens_to_ids("[/endthinking]")
    prompt = tok("Question: 2 + 2 = ?\nAnswer:[thinking]")["input_ids"]
    helpful = tok(" it is 4", add_special_tokens=False)["input_ids"] + [close]
    useless = tok(" xyz qqq", add_special_tokens=False)["input_ids"] + [close]
    s = Samples(torch.zeros(1), torch.zeros(1), torch.zeros(2, 1, dtype=torch.bool), [prompt, prompt],
                [helpful, useless], [], [], [], [], [], 0.0)
    gains = loglik_gains(model, tok, s, ["4"], k=2)
    assert gains[0] > 0 > gains[1]


# ---------------------------------------------------------------------------------------
# Exact resume


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw", "mugrokfast"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, optimizer):
    cfg = tiny_cfg(steps=4, save_every=2, lr=1e-2, optimizer=optimizer, coherence=True,
                   coherence_embedder="policy")
    tok, model = make_policy()
    full = RLTrainer(model, tok, cfg, tmp_path / "a")
    full.run(records())
    want = _weights(full.trained_model())

    tok, model = make_policy()
    with pytest.raises(Crash):
        RLTrainer(model, tok, cfg, tmp_path / "b").run(records(), progress=crash_at(3))
    tok, model = make_policy()
    resumed = RLTrainer(model, tok, cfg, tmp_path / "b")
    resumed.run(records(), resume=True)
    got = _weights(resumed.trained_model())
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-5), k
    assert not torch.equal(want["model.embed_tokens.weight"], make_policy()[1].state_dict()["model.embed_tokens.weight"])
    log = [json.loads(x) for x in (tmp_path / "b" / "batches.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    assert resumed.history[-1]["reward_rolling"] == pytest.approx(full.history[-1]["reward_rolling"], abs=1e-5)


# ---------------------------------------------------------------------------------------
# The recipe and the command


def test_run_step2_writes_model_and_report(tmp_path):
    from agent_forge.models import read_meta, save_model
    from agent_forge.quietstar.rl import run_step2

    tok, model = make_policy()
    save_model(model, tok, tmp_path / "baked", {"phase": 3, "step": 1})
    data = tmp_path / "train.jsonl"
    write_records(data, records())
    over = dict(steps=2, questions_per_step=2, samples_per_question=2, max_new_tokens=8, coherence=False,
                eval_samples=3, eval_max_new_tokens=8)
    asked = [{"question": r.question, "answer": r.gold} for r in records()[:2]]  # two it trains on
    unseen = [{"question": f"{a} + 100 = ?", "answer": str(a + 100)} for a in range(4)]
    eval_file = tmp_path / "held_out.jsonl"
    eval_file.write_text("".join(json.dumps(d) + "\n" for d in asked + unseen))
    metrics = run_step2(str(tmp_path / "baked"), tmp_path / "out", over, data=str(data), eval_data=str(eval_file))
    assert metrics["eval_left_out_seen"] == 2 and metrics["eval_n"] == 3  # the limit filled from the rest
    meta = read_meta(tmp_path / "out" / "model")
    assert meta["phase"] == 3 and meta["step"] == 2 and meta["parent_meta"]["step"] == 1
    assert metrics["model_dir"] == str(tmp_path / "out" / "model")
    assert "accuracy_thinking_on" in metrics and "accuracy_thinking_off" in metrics
    assert json.loads((tmp_path / "out" / "step2.json").read_text())["steps"] == 2
    trained = [json.loads(line)["question"] for line in (tmp_path / "out" / "train_questions.jsonl").open()]
    assert trained and set(trained) <= {r.question for r in records()}


def test_step2_evaluation_leaves_out_the_questions_it_trained_on(tmp_path):
    """The before/after comparison must not ask what RL trained on: items whose question a
    training record asks are dropped, counted, and the limit is still filled."""
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.quietstar.rl import unseen_eval_items

    pool = load_eval_set("easy_arithmetic", limit=12)
    trained = [Record(f"t{i}", it.question, [Segment("step", "x")], "0", "0", "test") for i, it in enumerate(pool[:3])]
    kept, n_left_out = unseen_eval_items("easy_arithmetic", 6, trained)
    assert n_left_out == 3
    assert len(kept) == 6
    assert not {it.question for it in kept} & {r.question for r in trained}
    assert [it.question for it in kept] == [it.question for it in pool[3:9]]  # the next ones, in order
    kept_all, none = unseen_eval_items("easy_arithmetic", 6, records())
    assert none == 0 and [it.question for it in kept_all] == [it.question for it in pool[:6]]


def test_answer_mode_prints_what_it_left_out_and_the_paired_gain(capsys):
    from agent_forge.quietstar.rl_commands import _print_answer

    _print_answer({"model_dir": "o/model", "eval_data": "easy_arithmetic_fresh:1", "eval_n": 90,
                   "eval_left_out_seen": 7, "accuracy_thinking_on": 0.5,
                   "gain_vs_before": {"points": 6.5, "ci95_points": [1.5, 12.5], "mcnemar_p": 0.035}}, "o")
    text = " ".join(capsys.readouterr().out.split())
    assert "easy_arithmetic_fresh:1: 90 questions, leaving out 7 that the training data asks" in text
    assert "+6.5 points [+1.5, +12.5], McNemar p=0.035" in text


def test_held_out_metrics_carry_the_honesty_of_the_thoughts_checks(monkeypatch, capsys):
    """Step 2's before/after evaluation reports check honesty over its thinking-on replies:
    the same figure check_honesty gives on those thoughts, printed before -> after."""
    from agent_forge.data.evalsets import EvalItem
    from agent_forge.evaluation import runner
    from agent_forge.inference import Generation
    from agent_forge.quietstar.rl_commands import _print_answer
    from agent_forge.quietstar.step1 import generation_metrics
    from agent_forge.validation.check_honesty import check_honesty

    thoughts = ["<step> 6 * 7 = 42<doubt> 42 / 6 = 7, yes", "<step> 5 + 4 = 10<doubt> 10 - 4 = 5, yes",
                "<step> 2 + 2 = 4"]

    def fake(model, tokenizer, questions, **kw):
        return [Generation(q, q, t, t, "1", True, 4, 0.0, "thinking") for q, t in zip(questions, thoughts)]

    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **kw: real(*a, generate_fn=fake, loglik=False, **kw))
    items = [EvalItem(f"q{i}", f"question {i}", "1", family="sum") for i in range(3)]
    tok, _ = make_policy()
    got = generation_metrics(None, tok, items, max_new_tokens=8, with_off=False)["check_honesty"]
    want = check_honesty(thoughts)
    assert got["honesty_rate"] == want["honesty_rate"] == 0.5 and got["n_checks"] == 2
    _print_answer({"eval_data": "x", "check_honesty": got,
                   "before": {"check_honesty": {**got, "honesty_rate": 0.25, "n_checks": 4}}}, "o")
    assert "check honesty 0.25 of 4 checks -> 0.50 of 2 checks" in " ".join(capsys.readouterr().out.split())


def _rl_cli(tmp_path, **kw):
    return rl_cli(tmp_path, **{"json_out": True, **kw})


def test_token_mode_needs_data(tmp_path):
    import typer

    with pytest.raises(typer.Exit):
        _rl_cli(tmp_path)


def test_token_mode_trains_and_saves_the_mixing_head(tmp_path):
    _rl_cli(tmp_path, **baked_token_setup(tmp_path), steps=2, eval_samples=4)
    out = tmp_path / "out"
    report = json.loads((out / "step2.json").read_text())
    assert report["mode"] == "token" and report["metrics"]["steps"] == 2
    assert (out / "model" / "mixing_head.safetensors").exists()


def test_policy_coefficient_scales_only_the_policy_gradient(tmp_path):
    """0 leaves the KL gradient alone (the LM/KL-only ablation); 2 doubles the policy part."""
    tok, model = make_policy()
    torch.manual_seed(0)
    s = sample(model, tok, ["1 + 2 = ?", "7 * 8 = ?"], 2, tiny_cfg(max_new_tokens=8))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    ref = make_tiny_model("llama", model.config.vocab_size, seed=5)

    def grads(policy, kl):
        cfg = tiny_cfg(policy_coefficient=policy, kl_coefficient=kl, coherence=False)
        model.zero_grad()
        tr = RLTrainer(model, tok, cfg, tmp_path / f"{policy}-{kl}", reference=ref)
        tr.loop.accumulate(tr, tr.policy_micros(s, adv))
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in model.parameters()])

    pol, kl_only, both = grads(1.0, 0.0), grads(0.0, 0.1), grads(2.0, 0.1)
    assert pol.abs().sum() > 0 and kl_only.abs().sum() > 0
    torch.testing.assert_close(both, 2 * pol + kl_only, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Checkpoints and QK-clip logging


def test_a_nan_step_never_becomes_the_saved_checkpoint(tmp_path):
    """Step 2's rewards are NaN, so its loss is: the run must stop with step 1 as the newest
    checkpoint (saving first would keep the NaN step as the "last good" one)."""
    from safetensors.torch import load_file

    from agent_forge.training.checkpoint import latest_checkpoint

    tok, model = make_policy()
    cfg = tiny_cfg(steps=3, save_every=1, coherence=False, reward="correct")
    calls = []

    def reward(s, batch):
        calls.append(1)
        return [math.nan if len(calls) == 2 else float(i % 2) for i in range(len(s.new_ids))]

    trainer = RLTrainer(model, tok, cfg, tmp_path, reward_fn=reward)
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.run(records())
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last is not None and last.name == "step-0000001"
    weights = load_file(last / "model.safetensors")
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def test_mugrokfast_rl_steps_log_qk_clip_firing(tmp_path):
    """The RL trainer's per-step row carries QK-clip's figures when MuGrokfast runs it."""
    tok, model = make_policy()
    cfg = tiny_cfg(steps=1, optimizer="mugrokfast", coherence=False, reward="correct")
    trainer = RLTrainer(model, tok, cfg, tmp_path)
    trainer.run(records())
    row = next(h for h in trainer.history if "reward_mean" in h)
    assert row["qk_clip_steps"] == 1 and row["qk_clip_heads_clipped"] >= 0
    assert row["qk_clip_max_logit"] is not None and row["qk_clip_max_logit"] > 0
