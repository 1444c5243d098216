"""procedural.py, traces.py, gym.py: exact traces, strategy coverage, verification, seeds."""

import re
from collections import Counter
from fractions import Fraction

import pytest

from agent_forge.data import gym as G
from agent_forge.data import procedural as P
from agent_forge.data import traces as T
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
    segs, answer = T.arithmetic_trace("6 + 10 * 0", random.Random(1))
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


def test_verifier_accepts_a_caught_slip_and_refuses_an_uncaught_one():
    slip, fix = Segment("step", "12 + 7 = 18"), Segment("correct", "12 + 7 = 19, not 18")
    caught = Record("x", "q", [slip, Segment("doubt", "18 - 7 = 11, not 12"), fix], "19", "19", "gym")
    assert P.verify_record(caught) == []
    lying = Record("x", "q", [slip, Segment("doubt", "18 - 7 = 12, yes"), fix], "19", "19", "gym")
    assert P.verify_record(lying)  # the check itself states false arithmetic
    unrepaired = Record("x", "q", [slip, Segment("doubt", "18 - 7 = 11, not 12"),
                                   Segment("step", "18 + 1 = 19")], "19", "19", "gym")
    assert P.verify_record(unrepaired)


@pytest.fixture(scope="module")
def wide():
    return P.build_gym_records(600, seed=2, families=("chain_sum", "basic_arithmetic", "simple_equations"),
                               difficulty="easy_wide")


def _caught_slips(record):
    """Indices of steps that state false arithmetic, with the check after them (a reference
    reading: exact arithmetic on each segment, no use of the builder's own bookkeeping)."""
    from agent_forge.data.parse import false_equalities

    segs = record.thinking
    return [(i, segs[i + 1]) for i, s in enumerate(segs[:-1]) if s.strategy == "step" and false_equalities(s.text)]


def test_about_a_third_of_traces_show_a_check_that_fails_and_a_repair(wide):
    """Issue 19: checks must be seen to fail. Each planted slip is followed by a <doubt> or
    <falsify> that computes (true arithmetic) and rejects, then a <correct>; the check
    honesty test reads every training check as honest and every failed one as corrected."""
    from agent_forge.data.parse import false_equalities
    from agent_forge.data.schema import render_thinking
    from agent_forge.validation.check_honesty import check_honesty, parse_checks, verdict_of

    with_slip = [r for r in wide if _caught_slips(r)]
    assert 0.2 <= len(with_slip) / len(wide) <= 0.4
    for r in with_slip:
        for i, check in _caught_slips(r):
            assert check.strategy in ("doubt", "falsify") and verdict_of(check.text) == "reject", r.id
            assert not false_equalities(check.text), r.id
            assert r.thinking[i + 2].strategy == "correct", r.id
    row = check_honesty([render_thinking(r.thinking) for r in wide])
    assert row["honesty_rate"] == 1.0 and row["correction_rate"] == 1.0
    failed_checks = [c for r in wide for c in parse_checks(render_thinking(r.thinking))
                     if c.failed and c.strategy != "correct"]
    assert len(failed_checks) >= 0.2 * len(wide)


def test_equation_traces_have_exactly_the_problems_steps():
    import random

    def steps(eq, var="x"):
        segs, answer = T.equation_trace(eq, var, random.Random(5))
        return [s.text for s in segs if s.strategy == "step"], answer

    for seed in range(20):  # slips change the text, never the shape
        segs, _ = T.equation_trace("x + 9 = 25", "x", random.Random(seed))
        assert not any("/" in s.text for s in segs if s.strategy in ("step", "correct"))
        segs, _ = T.equation_trace("4*x = 20", "x", random.Random(seed))
        assert not any(s.text.startswith("4*x =") for s in segs if s.strategy == "step")
    text, answer = steps("7 - 3*x = -8")
    assert answer == "5" and text[-1].endswith("= 5") and "/ -3" in text[-1]


def test_long_problems_get_fewer_extra_strategies(wide):
    """A 4-step chain's trace must fit the thinking budget: at most one extra strategy."""
    from agent_forge.data.parse import eval_steps

    for r in wide:
        if "expression" in r.meta and len(eval_steps(r.meta["expression"])[1]) >= 4:
            extras = {s for s in r.strategies if s not in ("step", "doubt", "correct", "uncertain")}
            assert len(extras) <= 1, r.id


def test_basic_arithmetic_gold_trap_is_fixed():
    item = {"question": "What is 3 + 2 * 3?", "answer": "15", "metadata": {"expression": "3 + 2 * 3"}}
    fixed = G.check_problem("basic_arithmetic", item)
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
        P.build_gym_records(10, seed=G.MAX_TRAIN_SEED)
    top = (G.MAX_TRAIN_SEED - 1) * G.TRAIN_SEED_STRIDE + G.TRAIN_SEED_STRIDE
    assert top <= G.EVAL_SEED_BASE
