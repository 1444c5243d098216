"""A/B harness with injected arms: winners, ties, rounds, and a real tiny-model arm."""

import random

import numpy as np
import pytest

from agent_forge.data.evalsets import EvalItem
from agent_forge.inference import Generation, generate_answers
from agent_forge.validation.ab import Arm, model_arm, run_ab
from agent_forge.validation.stats import mcnemar_exact, paired_ttest
from test_inference import MEMORY, memorised_model

ITEMS = [EvalItem(f"q{i}", f"What is {i} + 1?", str(i + 1), "f") for i in range(60)]


def _arm(name, p_right, base_seed):
    """Right on item i in round r with probability p_right (seeded per item and round)."""
    def generate(questions, r):
        out = []
        for q in questions:
            i = int(q.split()[2])
            right = random.Random(f"{base_seed}-{i}-{r}").random() < p_right
            ans = str(i + 1) if right else str(i + 7)
            out.append(Generation(q, q + ans, " " + ans, None, ans, True, 2, 0.001, "direct"))
        return out
    return Arm(name, generate)


def test_clear_candidate_win():
    rep = run_ab(_arm("base", 0.3, 1), _arm("cand", 0.9, 2), ITEMS, rounds=3)
    assert rep.winner == "candidate" and rep.diff_points > 40
    assert rep.n_pairs == 180 and len(rep.candidate["per_round"]) == 3
    assert rep.diff_ci_points[0] < rep.diff_points < rep.diff_ci_points[1]
    assert rep.ttest == paired_ttest(rep.baseline["per_round"], rep.candidate["per_round"])
    assert rep.mcnemar["p"] < 1e-6 and "Winner: cand" in rep.sentence
    lo, hi = rep.diff_ci_points
    assert f"interval [{lo:+.1f}, {hi:+.1f}]" in rep.sentence  # the sentence carries the measured interval


def test_same_model_is_a_tie_and_baseline_can_win():
    same = run_ab(_arm("a", 0.6, 5), _arm("b", 0.6, 5), ITEMS, rounds=2)
    assert same.winner == "tie" and same.diff_points == 0 and same.mcnemar["p"] == 1.0
    worse = run_ab(_arm("base", 0.9, 1), _arm("cand", 0.2, 2), ITEMS, rounds=2)
    assert worse.winner == "baseline"


def test_small_gain_below_threshold_is_a_tie():
    rep = run_ab(_arm("base", 0.5, 1), _arm("cand", 0.5, 1), ITEMS, rounds=1, threshold=2.0)
    assert rep.ttest is None and rep.winner == "tie"
    big = run_ab(_arm("base", 0.3, 1), _arm("cand", 0.9, 2), ITEMS, rounds=1, threshold=90.0)
    assert big.winner == "tie"  # significant but not the required improvement


def test_pooled_mcnemar_matches_direct_computation_and_subsample():
    base, cand = _arm("base", 0.4, 3), _arm("cand", 0.7, 4)
    rep = run_ab(base, cand, ITEMS, rounds=2, subsample=0.5, seed=9)
    assert rep.n_pairs == 60
    b_ok, c_ok = [], []
    for r in range(2):
        its = random.Random(9 + r).sample(ITEMS, 30)
        qs = [it.question for it in its]
        b_ok += [g.answer_text == it.answer for g, it in zip(base.generate(qs, r), its)]
        c_ok += [g.answer_text == it.answer for g, it in zip(cand.generate(qs, r), its)]
    assert rep.mcnemar == mcnemar_exact(b_ok, c_ok)
    assert rep.diff_points == pytest.approx(100 * (np.mean(c_ok) - np.mean(b_ok)))
    for r, row in enumerate(rep.per_round_diff):  # each round on its own, paired within the round
        b, c = b_ok[30 * r:30 * (r + 1)], c_ok[30 * r:30 * (r + 1)]
        assert row["round"] == r and row["sampled"] == (r > 0)
        assert row["points"] == pytest.approx(100 * (np.mean(c) - np.mean(b)))
        assert row["mcnemar_p"] == pytest.approx(mcnemar_exact(b, c)["p"])
        assert row["ci95_points"][0] <= row["points"] <= row["ci95_points"][1]


def test_model_arm_greedy_then_seeded_sampling():
    model, tok = memorised_model()
    qs = list(MEMORY)
    arm = model_arm("m", model, tok, thinking="on", max_new_tokens=24)
    greedy = generate_answers(model, tok, qs, thinking="on", max_new_tokens=24)
    assert [g.completion for g in arm.generate(qs, 0)] == [g.completion for g in greedy]
    s1, s1b = arm.generate(qs, 1), arm.generate(qs, 1)
    assert [g.completion for g in s1] == [g.completion for g in s1b]
    items = [EvalItem(f"m{i}", q, r, "a") for i, (q, (_, r, _)) in enumerate(MEMORY.items())]
    off = model_arm("off", model, tok, thinking="off", max_new_tokens=8)
    rep = run_ab(off, arm, items, rounds=1)
    assert rep.candidate["mean"] == 1.0 and rep.baseline["mean"] == 0.0


def test_direct_arm_gets_its_best_reading():
    from agent_forge.data.evalsets import EvalItem
    from agent_forge.inference import Generation
    from agent_forge.validation.ab import _correct

    item = EvalItem("1", "4 + 9 = ?", "13", "sum", None, {})

    def gen(text, mode="direct"):
        return Generation(prompt="", full_text=text, completion=text, thinking=None, answer_text=text,
                          closed=True, n_new_tokens=1, seconds=0.0, mode=mode)

    assert _correct([item] * 3, [gen("13"), gen("4 + 9 is 13"), gen("4 + 9 is 12")]) == [True, True, False]
    # a thinking arm is read strictly from its answer slot
    assert _correct([item], [gen("4 + 9 is 13", mode="on")]) == [False]


def test_recorded_greedy_round_replays_exactly_and_only_when_it_matches(tmp_path):
    """The pipeline's A/B replays anti-theater's greedy thinking-on pass: the replay must equal
    a fresh greedy generation, and anything that differs (key, questions, round) regenerates."""
    from agent_forge.inference import load_generations, save_generations
    from agent_forge.validation.ab import replay_first_round

    model, tok = memorised_model()
    qs = list(MEMORY)
    key = {"model": "m", "mode": "on", "max_new_tokens": 24, "batch_size": 16}
    fresh = generate_answers(model, tok, qs, thinking="on", max_new_tokens=24)
    path = tmp_path / "greedy_on.json"
    save_generations(path, key, qs, fresh)
    recorded = load_generations(path, key, qs)
    assert recorded == fresh  # dataclass equality: every field survives the round trip
    assert load_generations(path, {**key, "max_new_tokens": 25}, qs) is None
    assert load_generations(path, key, qs[::-1]) is None
    assert load_generations(tmp_path / "missing.json", key, qs) is None

    calls = []
    inner = Arm("c", lambda q, r: calls.append(r) or [fresh[0]] * len(q))
    arm = replay_first_round(inner, recorded, qs)
    assert arm.generate(qs, 0) is recorded and calls == []
    arm.generate(qs, 1)
    arm.generate(qs[:1], 0)  # other questions: generated, not replayed
    assert calls == [1, 0]
    assert replay_first_round(inner, None, qs) is inner
