"""Batch size and sequence length from the free memory (cognate/sizing.py): the choice on
hand-made numbers, the measured linear model against a direct measurement, and a phase that
chooses them once, records them and resumes with them."""

import json

import pytest

from agent_forge.cognate.sizing import PROBE_LEN, Sizing, SizingError, choose

MiB = 2**20


@pytest.mark.parametrize("budget_tokens, want", [
    (32 * 512, (32, 512)),  # everything fits: the caps
    (5 * 512, (4, 512)),  # the longest length with room for MIN_BATCH sequences, then a power of two
    (3 * 512, (4, 256)),  # 512 leaves room for 3 < MIN_BATCH: a shorter length
    (2 * 64, (2, 64)),  # the shortest length takes any batch that fits
])
def test_choose_the_longest_length_then_the_largest_batch(budget_tokens, want):
    fixed, per_token = 100 * MiB, 0.5 * MiB
    assert choose(fixed, per_token, fixed + budget_tokens * per_token) == want


def test_choose_keeps_what_the_config_gives():
    fixed, per_token = 10 * MiB, 1 * MiB
    budget = fixed + 1024 * per_token
    assert choose(fixed, per_token, budget, batch_size=8) == (8, 128)  # the longest length for 8 sequences
    assert choose(fixed, per_token, budget, seq_len=256) == (4, 256)  # the largest batch at this length
    assert choose(fixed, per_token, budget, batch_size=2, seq_len=64) == (2, 64)
    assert choose(fixed, per_token, budget, max_batch=2, max_len=128) == (2, 128)


def test_choose_refuses_what_cannot_fit_and_says_how_much_it_needs():
    with pytest.raises(SizingError, match=r"1 x 64 tokens needs about 1\.06 GiB.*budget is 0\.50 GiB"):
        choose(1 * 2**30, 1 * MiB, 0.5 * 2**30)
    with pytest.raises(SizingError, match="8 x 512 tokens"):  # both given, too big
        choose(0, 1 * MiB, 100 * MiB, batch_size=8, seq_len=512)


def test_the_measured_linear_model_predicts_a_bigger_step():
    """Two probe steps (4 and 8 sequences of PROBE_LEN tokens, each in a fresh process) give
    fixed + per-token bytes; a step of 16 x 2*PROBE_LEN tokens, measured the same way,
    lands within 25% of the prediction (the linear model is the method, the bound its test)."""
    from agent_forge.cognate.config import CognateConfig
    from agent_forge.cognate.sizing import measure_step_bytes, resolve
    from agent_forge.cognate.train import CognateTrainConfig

    cfg = CognateConfig(vocab_size=8192, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, memory_dim=8, memory_hidden_size=16, recursion_intermediate_size=64,
                        recursion_after_layer=1, max_recursion_steps=3).to_dict()
    train = CognateTrainConfig(optimizer="adamw")
    sizing = resolve(cfg, train, batch_size=0, seq_len=0, device="cpu")
    assert sizing.bytes_per_token > 8192 * 4  # at least the logits of a token
    assert sizing.predicted_bytes <= sizing.budget_bytes and sizing.chosen == ["batch_size", "seq_len"]
    tokens = 16 * 2 * PROBE_LEN
    measured = measure_step_bytes(cfg, train, 16, 2 * PROBE_LEN, "cpu")
    predicted = sizing.fixed_bytes + tokens * sizing.bytes_per_token
    assert abs(predicted - measured) <= 0.25 * measured, (predicted / MiB, measured / MiB)


def test_a_phase_with_batch_and_length_0_chooses_once_and_resumes_with_the_choice(tmp_path, forge_home,
                                                                                     monkeypatch):
    from agent_forge.cognate import sizing
    from agent_forge.cognate.commands import summary_rows
    from agent_forge.cognate.phase import make_config, run_cognate
    from conftest import make_tiny_tokenizer
    from test_cognate_phase import Crash, crash_after_steps

    make_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    cfg = make_config("smoke", out=str(tmp_path / "cg"), tokenizer=str(tmp_path / "tok"), tracking="disabled",
                      registry=str(tmp_path / "reg.sqlite"), controls=False,
                      data={"seq_len": 0}, train={"batch_size": 0})
    calls = []

    def fake_resolve(model_config, train, batch_size, seq_len, device):
        calls.append((model_config["max_recursion_steps"], batch_size, seq_len))
        return Sizing(3, 16, ["batch_size", "seq_len"], 8 * 2**30, 4 * 2**30, 1000, 10.0, 1480, device)

    monkeypatch.setattr(sizing, "resolve", fake_resolve)
    with pytest.raises(Crash):
        run_cognate(cfg, progress=crash_after_steps(6))  # inside the first specialisation
    assert calls == [(4, 0, 0)]  # measured once, for the stage with the most recursion steps (smoke: 4)
    monkeypatch.setattr(sizing, "resolve", lambda *a, **k: pytest.fail("a resume must not choose again"))
    report = run_cognate(cfg, resume=True)
    data = report["stages"]["data"]
    assert (data["batch_size"], data["seq_len"], report["batch_size"], report["seq_len"]) == (3, 16, 3, 16)
    steps = cfg.train.foundation_steps
    assert report["stages"]["foundation"]["tokens_seen"] == steps * 3 * 16  # trained with the choice
    blocks = json.loads((tmp_path / "cg" / "cognate_report.json").read_text())["stages"]["data"]["stages"]
    assert all(s["train_tokens"] % 16 == 0 for s in blocks.values())
    row = dict(summary_rows(report))["batch (sequences x tokens)"]
    assert row.startswith("3 x 16 tokens (batch_size and seq_len chosen from 8.0 GiB free on cpu")
