"""evalsets.py and overlap.py: local eval sets load, are clean, and never leak into training."""

import json
import re
from collections import Counter
from fractions import Fraction

import pytest

from agent_forge.data import procedural as P
from agent_forge.data.evalsets import EASY_FAMILIES, MAX_ASKED, askable, load_eval_set
from agent_forge.data.overlap import DEFAULT_EVAL_SETS, filter_overlap, find_overlap, math_key, normalize_question
from agent_forge.data.schema import Record, Segment


@pytest.fixture(scope="module")
def easy():
    return load_eval_set("easy_arithmetic")


def test_easy_arithmetic_mix_and_gold(easy):
    assert len(easy) == 300 and len({i.id for i in easy}) == 300
    assert Counter(i.family for i in easy) == {"chain_sum": 100, "basic_arithmetic": 100, "simple_equations": 100}
    for it in easy:
        if "expression" in it.meta:
            assert Fraction(it.answer) == eval(it.meta["expression"])  # Python precedence
    assert load_eval_set("easy_arithmetic", limit=30) == easy[:30]


def _asks(question: str, meta: dict) -> str:
    """What a question asks, worked out apart from overlap.py's keys: its expression, its
    equation with the variable renamed, else its text."""
    if "expression" in meta:
        return "expression " + meta["expression"].replace(" ", "")
    if "equation" in meta:
        return "equation " + re.sub(r"[a-z]", "v", meta["equation"].replace(" ", ""))
    return "text " + " ".join(question.lower().split())


def test_training_data_asks_nothing_any_eval_set_can_ask():
    """The pipeline's training data (generated, then filtered) against every item each
    filtered eval set can ask, up to the largest `--limit`, compared by content."""
    records = P.build_gym_records(600, seed=1, families=EASY_FAMILIES)
    kept, dropped = filter_overlap(records)
    asked = {_asks(i.question, i.meta) for name in DEFAULT_EVAL_SETS for i in askable(name)}
    repeats = {r.id for r in records if _asks(r.question, r.meta) in asked}
    assert repeats and repeats <= set(dropped)  # generation alone repeats eval questions
    assert not [r.id for r in kept if _asks(r.question, r.meta) in asked]


def test_gsm8k_answers_are_numbers():
    items = load_eval_set("gsm8k", limit=50)
    assert len(items) == 50 and items[0].answer == "18"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", i.answer) for i in items)


@pytest.mark.parametrize("name,letters", [("arc_challenge", "ABCDE"), ("commonsense_qa", "ABCDE")])
def test_multiple_choice(name, letters):
    items = load_eval_set(name, limit=40)
    for it in items:
        assert it.answer in letters and it.choices
        assert f"\n{it.answer}. " in it.question


def test_gym_family_and_jsonl_and_unknown(tmp_path):
    items = load_eval_set("gym:leg_counting", limit=5)
    assert len(items) == 5 and all(i.family == "leg_counting" for i in items)
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "answer": 4}) + "\n" + json.dumps({"question": "x", "answer": "y", "id": "k"}) + "\n")
    got = load_eval_set(str(path))
    assert [g.answer for g in got] == ["4", "y"] and got[1].id == "k"
    with pytest.raises(ValueError, match="unknown eval set"):
        load_eval_set("no_such_set")


def test_jsonl_bad_line_is_named_and_refused(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "1 + 1 =", "answer": 2}\n\n{"question": "2 + 2 =", answer: 4}\n')
    with pytest.raises(ValueError, match=r"mine\.jsonl:3: not valid JSON \(Expecting property name"):
        load_eval_set(str(path))
    path.write_text('{"question": "1 + 1 =", "answer": 2}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"mine\.jsonl:2: not a JSON object"):
        load_eval_set(str(path))


def test_procedural_sets_stop_at_max_asked():
    assert len(load_eval_set("easy_arithmetic")) == 300  # the default size is unchanged
    assert len(load_eval_set("easy_arithmetic_val", limit=5 * MAX_ASKED)) == MAX_ASKED
    assert [i.id for i in askable("easy_arithmetic")] == [i.id for i in load_eval_set("easy_arithmetic", 10**6)]
    assert len(askable("gsm8k")) == 1319  # a fixed set: all of it


def test_normalisation():
    assert normalize_question("  What IS 8 + 0? ") == normalize_question("what is 8+0")
    assert normalize_question("8 + 0") != normalize_question("8 - 0")
    assert math_key("Compute 8 + 0.") == math_key("State the final answer to the following arithmetic problem: 8 + 0 =")
    assert math_key("Solve for e: 5 - 7*e = -9") == math_key("Find the value of z in the equation: 5 - 7*z = -9")
    assert math_key("Tom had 5 apples, a 5-6 split, and 9 pears.") is None


def test_overlap_finds_planted_eval_items(easy):
    seg = [Segment("step", "x")]
    gsm = load_eval_set("gsm8k", limit=3)
    planted = [
        Record("p1", easy[0].question.upper() + "  ", seg, "0", "0", "t"),      # same text, case/space
        Record("p2", "Please compute " + easy[1].meta.get("expression", "1 + 1") + " now", seg, "0", "0", "t"),
        Record("p3", gsm[2].question.replace(" ", "  "), seg, "0", "0", "t"),
        Record("ok", "What is 123456 + 654321?", seg, "0", "0", "t"),
    ]
    kept, dropped = filter_overlap(planted, eval_sets=("easy_arithmetic", "gsm8k"))
    assert dropped == ["p1", "p2", "p3"] and [r.id for r in kept] == ["ok"]
    assert find_overlap(planted[:1], eval_sets=("easy_arithmetic",))["p1"] == easy[0].id


def test_joined_sets_are_each_set_in_full_then_limited(tmp_path):
    test, val = load_eval_set("easy_arithmetic"), load_eval_set("easy_arithmetic_val")
    both = load_eval_set("easy_arithmetic+easy_arithmetic_val")
    assert [i.id for i in both] == [i.id for i in test + val]
    assert len({i.id for i in both}) == len(test) + len(val)
    assert [i.id for i in load_eval_set("easy_arithmetic_val+easy_arithmetic", limit=310)] == \
        [i.id for i in (val + test)[:310]]
    odd = tmp_path / "a+b.jsonl"                      # a file whose name has a '+' is still a file
    odd.write_text('{"question": "1 + 1 =", "answer": "2"}\n')
    assert [i.answer for i in load_eval_set(str(odd))] == ["2"]


def test_confirm_split_asks_nothing_test_or_val_asks(tmp_path):
    from agent_forge.data.evalsets import CONFIRM_SIZE
    from agent_forge.data.overlap import question_keys, unseen_items

    confirm = load_eval_set("easy_arithmetic_confirm")
    assert len(confirm) == CONFIRM_SIZE
    assert {i.family for i in confirm} == {"chain_sum", "basic_arithmetic", "simple_equations"}
    asked = {k for name in ("easy_arithmetic", "easy_arithmetic_val") for i in load_eval_set(name)
             for k in question_keys(i.question)}
    keys = [k for i in confirm for k in question_keys(i.question)]
    assert not asked.intersection(keys) and len(set(keys)) == len(keys)  # fresh, and no repeats within
    # Leaving out what a training file asks: a planted repeat (reworded) goes, the rest stays.
    seen = tmp_path / "train.jsonl"
    seen.write_text(json.dumps({"question": confirm[3].question.upper()}) + "\n"
                    + json.dumps({"question": "What is 123456 + 654321?"}) + "\n")
    kept = unseen_items(confirm[:10], [seen])
    assert [i.id for i in kept] == [i.id for i in confirm[:10] if i.id != confirm[3].id]


def test_fresh_split_is_seeded_wider_than_training_and_asks_nothing_test_or_val_asks():
    from agent_forge.data.evalsets import fresh_split_name
    from agent_forge.data.overlap import question_keys

    name = fresh_split_name(12)
    items = load_eval_set(name, limit=90)
    assert [it.question for it in items] == [it.question for it in load_eval_set(name, limit=90)]
    assert [it.question for it in items] != [it.question for it in load_eval_set(fresh_split_name(13), limit=90)]
    taken = {k for n in ("easy_arithmetic", "easy_arithmetic_val") for it in load_eval_set(n)
             for k in question_keys(it.question)}
    assert not any(taken.intersection(question_keys(it.question)) for it in items)
    chains = [it for it in items if it.family == "chain_sum"]
    assert max(len(re.findall(r"\d+", it.question)) for it in chains) >= 4  # the "easy" test split stops at 3
    assert fresh_split_name().startswith("easy_arithmetic_fresh:")
    with pytest.raises(ValueError, match="seed"):
        load_eval_set("easy_arithmetic_fresh:x1")
