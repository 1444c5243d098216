"""bench/bench_rl_vs_trl.py: the reward TRL gets is our RL's reward, and the smoke run
(both arms, tiny model, seconds of budget) writes a result with every field the README reads."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agent_forge.data.schema import Record, Segment
from agent_forge.inference import eos_ids
from agent_forge.models import save_model
from agent_forge.quietstar.rl import RLConfig, RLTrainer
from agent_forge.vocab import add_thinking_tokens

from conftest import make_tiny_model, make_tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_rl_vs_trl as bench  # noqa: E402

# A correct answer, a wrong one, a thought that never closes (cut at max_new_tokens, the
# longest row), a right answer after one false claim, and a right answer with an honest check.
COMPLETIONS = [
    ("<step> 2 + 3 = 5[/endthinking] 5", True),
    ("<step> 2 + 3 = 6[/endthinking] 6", True),
    ("<step> 2 + 3 = 5<step> and 5 is the sum of 2 and 3, so the answer", False),
    ("<step> 2 + 2 = 5<step> 2 + 3 = 5[/endthinking] 5", True),
    ("<step> 2 + 3 = 5<doubt> 5 - 3 = 2, yes[/endthinking] 5", True),
]


def policy():
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    return tok, model


def hand_ids(tok, eos: int) -> list[list[int]]:
    """Each completion's ids as a sampler would produce them (EOS after a finished answer)."""
    return [tok(text, add_special_tokens=False)["input_ids"] + ([eos] if ends else []) for text, ends in COMPLETIONS]


def our_rewards(tok, model, cfg, record, rows: list[list[int]], tmp_path) -> list[float]:
    """Our RL's rewards for these completions: RLTrainer.micro_batches with the real
    sampler (parse, answer check, consistency, combine), `generate` replaced by the rows."""
    trainer = RLTrainer(model, tok, cfg, tmp_path / "run")
    trainer.records = [record]
    width = max(map(len, rows))
    pad = tok.pad_token_id
    new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])

    def fake_generate(input_ids, **kw):
        return SimpleNamespace(sequences=torch.cat([input_ids, new], 1), scores=None)

    trainer.loop.unwrapped().generate = fake_generate
    trainer.micro_batches(0)
    return trainer.current["rewards"]


@pytest.mark.parametrize("consistency_weight,honesty_weight", [(0.5, 0.0), (0.0, 0.0), (0.5, 1.0)])
def test_trl_reward_is_our_reward(tmp_path, consistency_weight, honesty_weight):
    tok, model = policy()
    eos = eos_ids(model, tok)
    rows = hand_ids(tok, tok.eos_token_id)
    cfg = RLConfig(questions_per_step=1, samples_per_question=len(rows), max_new_tokens=max(map(len, rows)),
                   reward="correct", consistency_weight=consistency_weight, honesty_weight=honesty_weight,
                   coherence=False, save_every=0)
    record = Record("r0", "2 + 3 = ?", [Segment("step", "2 + 3 = 5")], "5", "5", "test", family="sum")
    ours = our_rewards(tok, model, cfg, record, rows, tmp_path)
    # TRL hands the reward function the ids up to and including the first EOS
    trl_ids = [r[:r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in rows]
    theirs = bench.trl_reward(tok, cfg, eos)(prompts=[""] * len(rows), completions=[""] * len(rows),
                                               completion_ids=trl_ids, gold=["5"] * len(rows), trainer_state=None)
    assert theirs == pytest.approx(ours)
    # the cases really differ: right/wrong; + the claim shares 1, 1/2, 0; + an honest check
    assert len(set(ours)) == 2 + bool(consistency_weight) * 2 + bool(honesty_weight)


def test_answer_stop_generate_ends_rows_like_our_sampler():
    """--trl-stop answer: a row that wrote its answer line stops there, the rest is EOS."""
    tok, model = policy()
    eos = eos_ids(model, tok)
    text = tok("<step> 1[/endthinking] 1\nmore text", add_special_tokens=False)["input_ids"]
    prompt = torch.tensor([tok("Q[thinking]")["input_ids"]])
    model.generate = lambda *a, **kw: torch.cat([kw["input_ids"], torch.tensor([text])], 1)
    bench.answer_stop_generate(model, tok, eos)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt))[0, prompt.shape[1]:].tolist()
    n = len(tok("<step> 1[/endthinking] 1\n", add_special_tokens=False)["input_ids"])
    assert out[:n] == text[:n] and set(out[n:]) == {eos[0]}


@pytest.mark.slow
def test_smoke_run_writes_both_arms(tmp_path):
    tok, model = policy()
    save_model(model, tok, tmp_path / "step1", {"phase": 3, "step": 1})
    out = tmp_path / "rl_vs_trl.json"
    bench.main(["--smoke", "--model", str(tmp_path / "step1"), "--seeds", "0", "--budget-s", "1",
                "--results", str(out)])
    rec = json.loads(out.read_text())["smoke"]
    assert rec["before"]["n"] >= 1 and "correct" not in rec["before"]
    assert {r["arm"] for r in rec["runs"]} == {"ours", "trl"}
    for r in rec["runs"]:
        assert r["steps"] >= 1 and r["sec_per_step"] > 0 and r["peak_rss_mb"] > 0
        assert set(r["after"]) >= {"accuracy", "ci95", "n"} and r["after"]["n"] == rec["before"]["n"]
        assert set(r["gain_vs_before"]) >= {"points", "ci95_points", "mcnemar_p"}
    ours = next(r for r in rec["runs"] if r["arm"] == "ours")
    assert "ours_minus_trl" in ours
    assert rec["settings"]["shared"]["samples_per_question"] == 4 and rec["settings"]["ours_lm_coefficient"] == 1.0
