"""The shared training loop: the three Phase 3 trainers give the numbers they gave before
they moved onto it, and the loop's own promises (accumulation, warm-up, exact resume, the
NaN / explosion guard) hold on a tiny model.

REFERENCE holds the per-step figures and held-out metrics of the trainers as they were
before training/loop.py existed (bake.py, rl.py, token_rl.py at base 5f0fd99): this file's
RUNS were run as a script on that code (`PYTHONPATH=<old tree>:tests python
tests/test_training_loop.py`), and the printed JSON saved as tests/training_reference.json. Step 1 (SFT and KL) and
answer-level RL reproduce it exactly; token-level RL to ~1e-7, since thoughts.py's
log-softmax-then-gather became the shared gather-minus-logsumexp (same value, other float
rounding).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from agent_forge.data.schema import Record, Segment

from conftest import Crash, crash_at, make_tiny_model, make_tiny_tokenizer
from test_rl import make_policy

STEP_KEYS = ("loss", "grad_norm", "lr")


def _records(n: int, offset: int = 0) -> list[Record]:
    out = []
    for i in range(offset, offset + n):
        r = random.Random(i)
        a, b = r.randint(1, 9), r.randint(10, 99)
        out.append(Record(f"r{i}", f"{a} + {b} = ?", [Segment("step", f"{a} + {b} = {a + b}"),
                                                        Segment("doubt", f"{a + b} - {b} = {a}, yes")],
                          str(a + b), str(a + b), "test", family="sum"))
    return out


def _rows(history, keys) -> list[dict]:
    return [{k: h.get(k) for k in keys} for h in history if "loss" in h]


def _fingerprint(*modules) -> float:
    """Sum of |w| over every weight: equal trained models, equal number."""
    return sum(float(v.double().abs().sum()) for m in modules for v in m.state_dict().values())


def run_sft(tmp) -> dict:
    """Step 1, SFT: grad accumulation, warm-up then decay, a mid-run held-out eval."""
    from agent_forge.quietstar.bake import Baker, BakeConfig

    tok = make_tiny_tokenizer()
    cfg = BakeConfig(steps=5, batch_size=4, grad_accum=2, lr=2e-3, warmup_steps=2, save_every=0,
                     max_len=512, eval_every=3)
    baker = Baker(make_tiny_model("llama", len(tok)), tok, cfg, tmp / "sft")
    res = baker.run(_records(24), _records(6, 100))
    evals = [h["token_accuracy"] for h in res.history if "token_accuracy" in h]
    return {"steps": _rows(res.history, STEP_KEYS), "evals": evals,
            "token_accuracy": res.metrics["token_accuracy"], "weights": _fingerprint(baker.merged_model())}


def run_kl(tmp) -> dict:
    """Step 1, KL mode: two prompts baked in turn (the second's teacher is the baked model)."""
    from agent_forge.quietstar.bake import Baker, BakeConfig

    tok = make_tiny_tokenizer()
    cfg = BakeConfig(mode="kl", kl_source="dataset", kl_prompts=("Think.\n", "Check each step.\n"),
                     steps=4, batch_size=4, lr=2e-3, warmup_steps=1, save_every=0, max_len=512, kl_top_k=None,
                     explode_factor=1e9)
    baker = Baker(make_tiny_model("llama", len(tok)), tok, cfg, tmp / "kl")
    res = baker.run(_records(16), _records(4, 100))
    return {"steps": _rows(res.history, STEP_KEYS), "token_accuracy": res.metrics["token_accuracy"],
            "weights": _fingerprint(baker.merged_model())}


def run_answer_rl(tmp) -> dict:
    """Step 2, answer mode: sampling, loglik reward, k3 KL, micro-batches, warm-up."""
    from agent_forge.quietstar.rl import RLConfig, RLTrainer

    tok, model = make_policy()
    cfg = RLConfig(steps=3, questions_per_step=2, samples_per_question=3, max_new_tokens=10, lr=1e-3,
                   coherence=False, save_every=0, warmup_steps=2, micro_batch_rows=2)
    trainer = RLTrainer(model, tok, cfg, tmp / "rl")
    res = trainer.run(_records(12))
    keys = STEP_KEYS + ("policy_loss", "kl", "reward_mean", "accuracy", "loglik_gain", "thought_diversity")
    return {"steps": _rows(res.history, keys), "reward_mean_mean": res.metrics["reward_mean_mean"],
            "weights": _fingerprint(trainer.trained_model())}


def run_step2_end_to_end(tmp) -> dict:
    """run_step2 as the pipeline calls it: train, then the held-out accuracy thinking on/off."""
    from agent_forge.data.schema import write_records
    from agent_forge.models import save_model
    from agent_forge.quietstar.rl import run_step2

    tok, model = make_policy()
    save_model(model, tok, tmp / "baked", {"phase": 3, "step": 1})
    write_records(tmp / "train.jsonl", _records(12))
    over = dict(steps=2, questions_per_step=2, samples_per_question=2, max_new_tokens=8, coherence=False,
                eval_samples=6, eval_max_new_tokens=8, lr=1e-3, save_every=0)
    m = run_step2(str(tmp / "baked"), tmp / "step2", over, data=str(tmp / "train.jsonl"))
    return {k: m[k] for k in ("accuracy_thinking_on", "accuracy_thinking_off", "no_answer_rate",
                              "reward_mean_mean", "kl_mean", "steps")}


def run_token_rl(tmp) -> dict:
    """Step 2, token mode: thoughts, mixing head, KL leash, meta-token boost."""
    import agent_forge.quietstar.token_rl as trl

    tok = make_tiny_tokenizer()
    cfg = trl.TokenRLConfig(n_thoughts=2, thought_len=4, n_true=2, steps=3, batch_size=2, seq_len=24,
                            save_every=0, lr=1e-3, injection="top_fraction", fraction=0.5, kl_coefficient=0.5,
                            warmup_steps=2)
    trainer = trl.TokenRLTrainer(make_tiny_model("llama", len(tok)), tok, cfg, tmp / "token")
    ids, mask = trl.encode_crops([r.question + " " + r.answer for r in _records(40)], tok, 24)
    summary = trainer.run(ids, mask)
    keys = STEP_KEYS + ("policy_loss", "base_nll", "mixed_nll", "kl", "reward_mean", "thought_diversity")
    return {"steps": _rows(trainer.history, keys), "reward_rolling": summary["reward_rolling"],
            "weights": _fingerprint(trainer.model, trainer.head)}


RUNS = {"sft": run_sft, "kl": run_kl, "answer_rl": run_answer_rl, "step2": run_step2_end_to_end,
        "token_rl": run_token_rl}

REFERENCE = json.loads((Path(__file__).parent / "training_reference.json").read_text())


def _close(got, want, tol: float = 1e-4) -> bool:
    """Equal, floats to `tol` (relative above 1): the same run up to float32 summation order.

    1e-4, not 1e-6: the CPU's kernels change the summation order, and the answer-RL run's
    advantage normalisation amplifies that (same code and libraries, another machine: loss
    1.48e-5 apart, log-likelihood gains 2e-6). A change of method moves these by 1e-2 or more."""
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_close(got[k], want[k], tol) for k in want)
    if isinstance(want, list):
        return len(got) == len(want) and all(_close(g, w, tol) for g, w in zip(got, want))
    if isinstance(want, float) and isinstance(got, (int, float)):
        return abs(got - want) <= tol * max(1.0, abs(want))
    return got == want


@pytest.mark.parametrize("name", list(RUNS))
def test_trainers_give_the_numbers_they_gave_before_the_shared_loop(tmp_path, name):
    got = RUNS[name](tmp_path)
    assert _close(got, REFERENCE[name]), json.dumps({"got": got, "want": REFERENCE[name]}, indent=1)


# ---------------------------------------------------------------------------------------
# The loop itself, with a minimal Stage: next-token loss on fixed random token rows


class LMStage:
    """Step s reads rows step_indices(s); `micros` equal micro-batches; `noise` multiplies the
    loss by a draw from the global RNG (so resume must restore the RNG to reproduce it)."""

    def __init__(self, loop, data, per_step=4, micros=1, noise=False, nan_at=None):
        self.loop, self.data, self.per_step, self.micros, self.noise, self.nan_at = \
            loop, data, per_step, micros, noise, nan_at

    def micro_batches(self, step):
        from agent_forge.training.batching import step_indices

        self.idx = step_indices(step, self.per_step, len(self.data), seed=0)
        self.step = step
        return list(self.data[self.idx].chunk(self.micros))

    def loss(self, ids):
        logits = self.loop.model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        if self.noise:
            loss = loss * (1 + 0.1 * torch.rand(()))
        if self.nan_at is not None and self.step + 1 == self.nan_at:
            loss = loss * float("nan")
        return loss, {"micro_batches": 1}

    def step_row(self, step, sums):
        return {"rows": self.idx, "micro_batches": sums["micro_batches"]}


def _loop(tmp, seed=0, **kw):
    from agent_forge.training.loop import LoopConfig, TrainingLoop

    tok = make_tiny_tokenizer()
    cfg = dict(steps=4, stage="test", warmup_steps=2, decay=True, seed=0, batch_log="rows")
    return TrainingLoop(make_tiny_model("llama", len(tok), seed=seed), LoopConfig(**{**cfg, **kw}), tmp)


def _data():
    return torch.randint(0, 200, (12, 10), generator=torch.Generator().manual_seed(0))


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5)


def _train(loop, stage, resume=False, progress=None, build=_adamw):
    loop.run(stage, loop.setup(build, stage, resume), progress=progress)
    return {k: v.clone() for k, v in loop.unwrapped().state_dict().items()}


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    one = _loop(tmp_path / "one", steps=2)
    w_one = _train(one, LMStage(one, _data(), per_step=4, micros=1), build=_sgd)  # SGD: Adam would magnify
    acc = _loop(tmp_path / "acc", steps=2, grad_accum=2)                           # float noise in ~0 grads
    w_acc = _train(acc, LMStage(acc, _data(), per_step=4, micros=2), build=_sgd)
    assert [h["micro_batches"] for h in acc.history] == [2, 2]
    for a, b in zip(one.history, acc.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for k in w_one:
        assert torch.allclose(w_one[k], w_acc[k], atol=1e-6), k


def test_warmup_then_decay_or_constant():
    from agent_forge.training.loop import warmup_factor

    decay = [warmup_factor(s, 3, 6, True) for s in range(7)]
    assert decay == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    assert [warmup_factor(s, 3, 6, False) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    assert warmup_factor(0, 0, 6, False) == 1.0  # no warm-up: full rate from the first step


def test_the_logged_lr_follows_the_schedule(tmp_path):
    loop = _loop(tmp_path, steps=4, warmup_steps=2, decay=True)
    _train(loop, LMStage(loop, _data()))
    # row of step i (1-based) holds the rate the next step will use: lr * factor(i)
    assert [h["lr"] for h in loop.history] == pytest.approx([1e-2, 1e-2 * 2 / 2, 1e-2 * 1 / 2, 0.0])


def test_resume_after_a_save_equals_an_uninterrupted_run(tmp_path):
    full = _loop(tmp_path / "full", save_every=2)
    want = _train(full, LMStage(full, _data(), noise=True))

    part = _loop(tmp_path / "part", save_every=2)
    with pytest.raises(Crash):
        _train(part, LMStage(part, _data(), noise=True), progress=crash_at(3))
    torch.manual_seed(1234)  # whatever the RNG holds now, resume must restore the checkpoint's
    resumed = _loop(tmp_path / "part", seed=99, save_every=2)  # other init: must be overwritten
    got = _train(resumed, LMStage(resumed, _data(), noise=True), resume=True)
    # the steps before the crash come back with the checkpoint: a report's "first step" row is the run's
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-6)
    assert resumed.first_loss == full.first_loss
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k
    assert (tmp_path / "part" / "batches.jsonl").read_text() == (tmp_path / "full" / "batches.jsonl").read_text()


def test_a_nan_loss_stops_naming_the_last_good_checkpoint(tmp_path):
    from agent_forge.training.checkpoint import latest_checkpoint

    loop = _loop(tmp_path, steps=5, save_every=1)
    with pytest.raises(FloatingPointError, match="nan at step 3; last good checkpoint kept: .*step-0000002"):
        _train(loop, LMStage(loop, _data(), nan_at=3))
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000002"


def test_an_exploding_loss_stops_when_a_factor_is_set(tmp_path):
    loop = _loop(tmp_path, steps=3, explode_factor=1.01)
    stage = LMStage(loop, _data())
    real = stage.loss
    stage.loss = lambda ids: (lambda out: (out[0] * (1 + stage.step), out[1]))(real(ids))
    with pytest.raises(FloatingPointError, match="exploded .* at step 2; no checkpoint was written yet"):
        _train(loop, stage)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps({name: fn(Path(d)) for name, fn in RUNS.items()}, indent=1))


def test_rolling_mean_by_hand():
    from agent_forge.training.loop import rolling_mean

    history = [{"r": 1.0}, {"other": 5.0}, {"r": 2.0}, {"r": 4.0}]
    assert rolling_mean(history, "r", 6.0, 3) == pytest.approx((2 + 4 + 6) / 3)  # the last two rows that have it
    assert rolling_mean(history, "r", 6.0, 10) == pytest.approx((1 + 2 + 4 + 6) / 4)
    assert rolling_mean(history, "r", 6.0, 1) == 6.0  # window 1: the value alone, not the whole history
    assert rolling_mean([], "r", 3.0, 20) == 3.0
