"""parse.py: completion format, answer matching, exact arithmetic, claim checking."""

import random
from fractions import Fraction

import pytest

from agent_forge.data.parse import (ParseError, answers_match, claimed_equalities, eval_steps,
                                    evaluate, false_equalities, parse_completion)
from agent_forge.data.schema import Record, Segment, render_completion


def test_roundtrip_with_rendered_completion():
    rec = Record("r", "1+2?", [Segment("step", "1 + 2 = 3"), Segment("doubt", "3 - 2 = 1, yes")], "3", "3", "t")
    segs, answer = parse_completion(render_completion(rec))
    assert segs == rec.thinking and answer == "3"


@pytest.mark.parametrize("text", [
    "```\n[thinking]<step> 2 * 3 = 6[/endthinking]\n```\nAnswer: 6.",
    "[thinking]<step> 2 * 3 = 6[/endthinking]\nAnswer: **6**",
    "Here you go:\n```text\n[thinking]<step> 2 * 3 = 6[/endthinking] 6\n```",
])
def test_fenced_and_answer_line_variants(text):
    segs, answer = parse_completion(text)
    assert [s.strategy for s in segs] == ["step"] and answer == "6"


@pytest.mark.parametrize("text", [
    "no block at all 6",
    "[thinking]<step> 1 + 1 = 2 6",                       # unclosed
    "[thinking]hello<step> 1 + 1 = 2[/endthinking] 2",    # text before first marker
    "[thinking]<step>   <doubt> x[/endthinking] 2",       # empty segment
    "[thinking]<step> 1 + 1 = 2[/endthinking]   ",        # no answer
    "[thinking]<step> a[/endthinking] 2 <step>",          # token in answer
])
def test_malformed_raises(text):
    with pytest.raises(ParseError):
        parse_completion(text)


def test_answers_match():
    assert answers_match("$1,234.0", "1234") and answers_match("18.", "18")
    assert answers_match("b", "B") and not answers_match("4", "5") and not answers_match(None, "1")
    assert not answers_match("", "")


def test_evaluate_matches_python_precedence_on_random_expressions():
    rng = random.Random(0)
    for _ in range(300):
        nums = [rng.randint(-20, 20) for _ in range(rng.randint(1, 5))]
        ops = [rng.choice("+-*") for _ in nums[1:]]
        expr = str(nums[0]) + "".join(f" {o} {n}" for o, n in zip(ops, nums[1:]))
        assert evaluate(expr) == eval(expr)  # plain reference: Python itself


def test_eval_steps_order_and_consistency():
    value, steps = eval_steps("12 + 3 * 4 - (5 - 7)")
    assert value == 26
    assert steps[0] == (3, "*", 4, 12)
    for a, op, b, r in steps:
        assert r == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert evaluate("-(2 + 3) * 4") == -20 and evaluate("7 / 2") == Fraction(7, 2)


def test_claims_checked_and_half_visible_operands_skipped():
    assert false_equalities("12 + 7 = 18") == [("12 + 7", "18")]
    assert false_equalities("So he responds to 160-48=112 emails") == []
    assert claimed_equalities("30% of 160 = 48") == []          # left operand only half visible
    assert false_equalities("a = 3 * 4 = 12 = 13") == [("12", "13")]
    assert false_equalities("$400,000 x 8/100 = $32,000") == []  # 'x' glued: not judged
