"""procedural.py: exact traces, strategy coverage, verification, seeds."""

import re
from collections import Counter
from fractions import Fraction

import pytest

from agent_forge.data import procedural as P
from agent_forge.data.parse import evaluate
from agent_forge.data.schema import Record, Segment
from agent_forge.vocab import STRATEGIES


@pytest.fixture(scope="module")
def records():
    stats = {}
    recs = P.build_gym_records(400, seed=3, stats=stats)
    return recs, stats


def test_count_families_ids_and_determinism(records):
    recs, _ = records
    assert len(recs) == 400
    assert Counter(r.family for r in recs) == {f: 100 for f in P.DEFAULT_FAMILIES}
    assert len({r.id for r in recs}) == 400
    assert all(re.fullmatch(rf"gym-{r.family}-easy-s3-\d+", r.id) for r in recs)
    again = P.build_gym_records(40, seed=3)
    by_id = {r.id: r for r in recs}
    assert all(by_id[r.id].to_json() == r.to_json() for r in again)


def test_every_record_verifies_and_answer_is_gold(records):
    for r in records[0]:
        assert P.verify_record(r) == [], r.id
        assert r.answer == r.gold


def test_gold_recomputed_independently(records):
    """Reference: Python's own eval of the expression, and substitution for equations."""
    for r in records[0]:
        if "expression" in r.meta:
            assert Fraction(r.gold) == eval(r.meta["expression"])
        if "equation" in r.meta:
            lhs, rhs = r.meta["equation"].split("=")
            var = re.search(r"Solve for (\w)|value of (\w)", r.question)
            v = next(g for g in var.groups() if g)
            assert evaluate(re.sub(rf"\b{v}\b", f"({r.gold})", lhs)) == evaluate(rhs)


def test_steps_follow_precedence_exactly():
    import random
    segs, answer = P.arithmetic_trace("6 + 10 * 0", random.Random(1))
    steps = [s.text for s in segs if s.strategy == "step"]
    assert answer == "6"
    assert steps[0].startswith("10 * 0 = ") and steps[-1].startswith("6 + 0 = ")


def test_all_strategies_appear_in_a_2000_build():
    recs = P.build_gym_records(2000, seed=1)
    share = Counter(s for r in recs for s in set(r.strategies))
    for s in STRATEGIES:
        assert share[s] / len(recs) >= 0.03, (s, share[s])


def test_verifier_catches_wrong_traces():
    good = Record("x", "q", [Segment("step", "12 + 7 = 19")], "19", "19", "gym")
    assert P.verify_record(good) == []
    wrong = Record("x", "q", [Segment("step", "12 + 7 = 18"), Segment("step", "18 + 1 = 19")], "19", "19", "gym")
    assert P.verify_record(wrong)
    repaired = Record("x", "q", [Segment("step", "12 + 7 = 18"), Segment("correct", "12 + 7 = 19, not 18")],
                      "19", "19", "gym")
    assert P.verify_record(repaired) == []
    off_gold = Record("x", "q", [Segment("step", "12 + 7 = 19")], "19", "20", "gym")
    assert P.verify_record(off_gold)


def test_basic_arithmetic_gold_trap_is_fixed():
    item = {"question": "What is 3 + 2 * 3?", "answer": "15", "metadata": {"expression": "3 + 2 * 3"}}
    fixed = P.check_problem("basic_arithmetic", item)
    assert fixed["answer"] == "9" and fixed["gold_fixed_from"] == "15"


def test_easy_difficulty_bounds(records):
    for r in records[0]:
        if r.family in ("chain_sum", "basic_arithmetic"):
            expr = r.meta["expression"]
            assert all(abs(int(n)) <= 99 for n in re.findall(r"\d+", expr))
            assert 2 <= len(re.findall(r"\d+", expr)) <= 3
            assert "/" not in expr


def test_seeds_never_reach_eval_range():
    with pytest.raises(ValueError):
        P.build_gym_records(10, seed=P.MAX_TRAIN_SEED)
    top = (P.MAX_TRAIN_SEED - 1) * P.TRAIN_SEED_STRIDE + P.TRAIN_SEED_STRIDE
    assert top <= P.EVAL_SEED_BASE
