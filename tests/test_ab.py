"""A/B harness with injected arms: winners, ties, rounds, the item as the unit of analysis,
and a real tiny-model arm."""

import math
import random

import numpy as np
import pytest

from agent_forge.data.evalsets import EvalItem
from agent_forge.inference import Generation, generate_answers
from agent_forge.validation.ab import Arm, compare_items, model_arm, run_ab
from agent_forge.validation.stats import mcnemar_exact
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


def _binom_p_by_sum(k, n):
    """Two-sided exact binomial(n, 1/2) p: twice the smaller tail, capped at 1."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_clear_candidate_win():
    rep = run_ab(_arm("base", 0.3, 1), _arm("cand", 0.9, 2), ITEMS, rounds=3)
    assert rep.winner == "candidate" and rep.diff_points > 40
    assert rep.n_pairs == 60 and len(rep.candidate["per_round"]) == 3  # 60 items, not 180 (round, item) pairs
    assert rep.diff_ci_points[0] < rep.diff_points < rep.diff_ci_points[1]
    assert rep.mcnemar["p"] < 1e-6 and "sign test" in rep.mcnemar["test"] and "Winner: cand" in rep.sentence
    assert not {"ttest", "cohens_d"} & set(rep.to_dict())  # round-level statistics are gone
    lo, hi = rep.diff_ci_points
    assert f"interval over items [{lo:+.1f}, {hi:+.1f}]" in rep.sentence  # the sentence carries the measured interval
    assert "over 60 items" in rep.sentence


def test_same_model_is_a_tie_and_baseline_can_win():
    same = run_ab(_arm("a", 0.6, 5), _arm("b", 0.6, 5), ITEMS, rounds=2)
    assert same.winner == "tie" and same.diff_points == 0 and same.mcnemar["p"] == 1.0
    assert "not significant" in same.sentence
    worse = run_ab(_arm("base", 0.9, 1), _arm("cand", 0.2, 2), ITEMS, rounds=2)
    assert worse.winner == "baseline"


def test_small_gain_below_threshold_is_a_tie():
    rep = run_ab(_arm("base", 0.5, 1), _arm("cand", 0.5, 1), ITEMS, rounds=1, threshold=2.0)
    assert rep.winner == "tie" and rep.mcnemar["test"] == "exact McNemar test over items"
    big = run_ab(_arm("base", 0.3, 1), _arm("cand", 0.9, 2), ITEMS, rounds=1, threshold=90.0)
    assert big.winner == "tie"  # significant but not the required improvement
    assert "significant at alpha=0.05, but not more than 90.0 points" in big.sentence


def test_item_level_statistics_match_a_by_hand_computation_with_subsample():
    """Each item's mean correctness over the rounds that asked it, the sign of c - b, and the
    binomial sum: computed here from the arms' raw answers, not by the library."""
    base, cand = _arm("base", 0.4, 3), _arm("cand", 0.7, 4)
    rep = run_ab(base, cand, ITEMS, rounds=2, subsample=0.5, seed=9)
    b_hits, c_hits, asked = {}, {}, {}
    for r in range(2):
        its = random.Random(9 + r).sample(ITEMS, 30)
        qs = [it.question for it in its]
        b_ok = [g.answer_text == it.answer for g, it in zip(base.generate(qs, r), its)]
        c_ok = [g.answer_text == it.answer for g, it in zip(cand.generate(qs, r), its)]
        for it, b, c in zip(its, b_ok, c_ok):
            b_hits[it.id] = b_hits.get(it.id, 0) + b
            c_hits[it.id] = c_hits.get(it.id, 0) + c
            asked[it.id] = asked.get(it.id, 0) + 1
        row = rep.per_round_diff[r]  # each round on its own, paired within the round
        assert row["round"] == r and row["sampled"] == (r > 0)
        assert row["points"] == pytest.approx(100 * (sum(c_ok) - sum(b_ok)) / 30)
        gained = sum(c and not b for b, c in zip(b_ok, c_ok))
        lost = sum(b and not c for b, c in zip(b_ok, c_ok))
        assert row["mcnemar_p"] == pytest.approx(_binom_p_by_sum(gained, gained + lost))
    d = [(c_hits[i] - b_hits[i]) / asked[i] for i in asked]
    assert rep.n_pairs == len(asked) < 60  # distinct items seen, each once
    assert rep.diff_points == pytest.approx(100 * sum(d) / len(d))
    ahead, behind = sum(x > 0 for x in d), sum(x < 0 for x in d)
    assert (rep.mcnemar["only_b"], rep.mcnemar["only_a"]) == (ahead, behind)
    assert rep.mcnemar["p"] == pytest.approx(_binom_p_by_sum(ahead, ahead + behind))
    half = 1.96 * np.std(d, ddof=1) / math.sqrt(len(d)) * 100  # normal-theory half-width over items
    lo, hi = rep.diff_ci_points
    assert lo == pytest.approx(rep.diff_points - half, abs=0.2 * half)
    assert hi == pytest.approx(rep.diff_points + half, abs=0.2 * half)


def test_no_true_difference_finds_a_winner_at_most_at_the_stated_rate():
    """400 simulated A/Bs, 3 rounds, 40 items, no true difference between the arms. Each item has
    a latent ability shared by both arms plus each arm's own per-item offset (drawn alike for both),
    so an arm's outcomes on an item correlate across rounds. The item-level verdict must find a
    winner at most at the stated 5%; McNemar over the 120 pooled (round, item) pairs, the old
    method, is run on the same data to show the simulation does catch pooling."""
    alpha, trials, rounds, n = 0.05, 400, 3, 40
    margin = 3 * math.sqrt(alpha * (1 - alpha) / trials)  # 3 sd of a rate measured on 400 trials
    wins = pooled_wins = 0
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        shared = rng.normal(0, 1.5, n)
        b, c = (rng.random((rounds, n)) < 1 / (1 + np.exp(-(shared + rng.normal(0, 3, n)))) for _ in range(2))
        cmp = compare_items(b.mean(axis=0), c.mean(axis=0), rounds, threshold=0.0, alpha=alpha, n_boot=20)
        assert cmp["n_pairs"] == n
        wins += cmp["winner"] != "tie"
        pooled_wins += mcnemar_exact(b.ravel(), c.ravel())["p"] < alpha
    assert wins / trials <= alpha + margin
    assert pooled_wins / trials > alpha + margin


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


def test_recorded_generations_for_a_subset_of_their_questions(tmp_path):
    """subset=True: any questions the record holds, in the order asked; one it lacks: None."""
    from agent_forge.inference import Generation, load_generations, save_generations

    gens = [Generation(prompt=q, full_text="", completion="", thinking="", answer_text=a, closed=True,
                       n_new_tokens=1, seconds=0.0) for q, a in (("a?", "1"), ("b?", "2"), ("c?", "3"))]
    key = {"model": "m", "mode": "on"}
    save_generations(tmp_path / "g.json", key, ["a?", "b?", "c?"], gens)
    assert load_generations(tmp_path / "g.json", key, ["c?", "a?"]) is None  # exact list by default
    got = load_generations(tmp_path / "g.json", key, ["c?", "a?"], subset=True)
    assert [g.answer_text for g in got] == ["3", "1"]
    assert load_generations(tmp_path / "g.json", key, ["a?", "d?"], subset=True) is None
