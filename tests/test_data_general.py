"""general.py: short-thinking multiple-choice records from sets the pipeline never evaluates on."""

from collections import Counter

import pytest

from agent_forge.data.evalsets import load_eval_set, mc_question
from agent_forge.data.general import GENERAL_SETS, build_general_records, general_questions, mix
from agent_forge.data.overlap import asked_by, question_keys
from agent_forge.evaluation.answers import extract_choice
from agent_forge.vocab import get_vocab


@pytest.fixture(scope="module")
def records():
    return build_general_records(90, seed=4)


def test_equal_shares_interleaved_and_deterministic(records):
    assert len(records) == 90 and len({r.id for r in records}) == 90
    assert Counter(r.family for r in records) == {name: 30 for name in GENERAL_SETS}
    assert [r.family for r in records[:3]] == list(GENERAL_SETS)
    assert [r.id for r in build_general_records(90, seed=4)] == [r.id for r in records]
    assert [r.id for r in build_general_records(90, seed=5)] != [r.id for r in records]


def test_each_record_names_the_right_choice_and_answers_its_letter(records):
    """Reference: read each set's raw row again and find the right choice's text by hand."""
    truth = {}
    for name in GENERAL_SETS:
        for qid, stem, texts, right in general_questions(name):
            truth[f"general-{name}-{qid}"] = (stem, texts[right])
    for r in records:
        stem, right_text = truth[r.id]
        lines = r.question.split("\n")
        assert lines[0] == stem
        letter_line = next(line for line in lines[1:] if line[3:] == right_text)
        assert r.answer == r.gold == letter_line[0]
        assert len(r.thinking) == 1 and r.thinking[0].text == f"{right_text.strip()} fits best: {r.answer}"
        n = len(lines) - 1
        assert extract_choice(f" {r.answer}", n) == r.answer  # the evaluation reads the letter back


def test_layout_is_the_evaluation_sets_layout():
    item = load_eval_set("arc_easy", limit=1)[0]
    question, letters = mc_question(item.question.split("\n")[0], item.choices, item.meta["labels"])
    assert question == item.question and letters == item.meta["labels"]


def test_excluded_questions_are_skipped_and_counted(records):
    banned = {k for k in question_keys(records[0].question)}
    stats = {}
    again = build_general_records(90, seed=4, exclude=lambda q: bool(banned & set(question_keys(q))), stats=stats)
    assert records[0].id not in {r.id for r in again} and len(again) == 90
    assert stats["eval_overlap"] == 1


def test_nothing_the_general_eval_sets_ask_is_trained_on():
    built = build_general_records(300, seed=1, exclude=asked_by(("arc_easy", "commonsense_qa")))
    hit = asked_by(("arc_easy", "commonsense_qa"))
    assert not any(hit(r.question) for r in built)


def test_records_render_a_closed_short_block(records):
    from agent_forge.data.schema import render_completion

    v = get_vocab()
    for r in records[:10]:
        text = render_completion(r)
        assert text.startswith(v.open) and text.count(v.close) == 1 and text.endswith(f"{v.close} {r.answer}")


def test_mix_spreads_evenly_and_keeps_order():
    main, extra = list(range(17)), ["a", "b", "c"]
    out = mix(main, extra)
    assert [x for x in out if isinstance(x, int)] == main and [x for x in out if isinstance(x, str)] == extra
    where = [i for i, x in enumerate(out) if isinstance(x, str)]
    assert where[0] < 10 and where[-1] >= 10 and min(b - a for a, b in zip(where, where[1:])) >= 5
    tail = out[-4:]  # a held-out tail of 20% holds both kinds
    assert any(isinstance(x, str) for x in out[-7:]) and any(isinstance(x, int) for x in tail)
    assert mix(main, []) == main and mix([], extra) == extra


def test_unknown_set_is_named():
    with pytest.raises(ValueError, match="unknown general set 'mmlu'"):
        list(general_questions("mmlu"))
