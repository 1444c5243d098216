"""overlap.py: every askable eval item is indexed, both sides are keyed alike, and GSM8K
figures of a model trained on GSM8K test templates are flagged wherever they are printed."""

import pytest
from rich.console import Console

from agent_forge.data.evalsets import EASY_SIZE, MAX_ASKED, load_eval_set
from agent_forge.data.overlap import (DEFAULT_EVAL_SETS, eval_sets_for, find_overlap, gsm8k_contamination,
                                      question_keys, question_stem)
from agent_forge.data.schema import Record, Segment


def _record(rid: str, question: str) -> Record:
    return Record(rid, question, [Segment("step", "x")], "0", "0", "t")


@pytest.mark.parametrize("name", ["easy_arithmetic", "easy_arithmetic_val"])
def test_items_beyond_the_default_size_are_indexed(name):
    """`--limit` and the standard preset ask up to MAX_ASKED items, not just the first 300."""
    items = load_eval_set(name, limit=MAX_ASKED)
    first = {k for it in items[:EASY_SIZE] for k in question_keys(it.question)}
    far = next(it for it in reversed(items) if not first.intersection(question_keys(it.question)))
    hits = find_overlap([_record("copy", far.question.upper())], eval_sets=(name,))
    assert items.index(far) >= EASY_SIZE
    assert set(hits) == {"copy"} and hits["copy"] in {it.id for it in items[EASY_SIZE:]}


def _choice_layouts(stem: str, choices: list[str]) -> list[str]:
    letters = "ABCDE"
    return [
        stem + "\n" + "\n".join(f"{l}. {c}" for l, c in zip(letters, choices)),        # as the eval set
        stem + " " + " ".join(f"({l}) {c}" for l, c in zip(letters, choices)),         # inline
        stem + "\nOptions:\n" + "\n".join(f"{l}) {c}" for l, c in zip(letters, choices)),
    ]


@pytest.mark.parametrize("name", ["arc_challenge", "commonsense_qa"])
def test_multiple_choice_item_copied_with_its_choices_is_caught(name):
    item = load_eval_set(name, limit=8)[5]
    stem = item.question.split("\nA. ")[0]
    copies = [_record(f"c{k}", text) for k, text in enumerate(_choice_layouts(stem, item.choices))]
    copies.append(_record("stem", stem.lower()))
    other = load_eval_set(name, limit=8)[6]
    copies.append(_record("other", _choice_layouts(other.question.split("\nA. ")[0], item.choices)[0]))
    hits = find_overlap(copies, eval_sets=(name,))
    assert hits == {"c0": item.id, "c1": item.id, "c2": item.id, "stem": item.id, "other": other.id}


def test_question_stem_splits_only_a_lettered_run():
    assert question_stem("Which is blue?\nA. sky\nB. grass") == "Which is blue?"
    assert question_stem("Pick one (A) red (B) blue (C) green") == "Pick one"
    assert question_stem("Solve for A: 5 - 7*A = -9") == "Solve for A: 5 - 7*A = -9"
    assert question_stem("Plan (A) failed, so") == "Plan (A) failed, so"  # one marker is no list
    assert question_keys("What is 8 + 0?") == ["q:what is 8 + 0", "m:8 + 0"]


def test_a_run_also_indexes_its_own_eval_sets():
    assert eval_sets_for("easy_arithmetic", "easy_arithmetic_val") == DEFAULT_EVAL_SETS
    assert eval_sets_for("mine.jsonl", None, "gsm8k") == DEFAULT_EVAL_SETS + ("mine.jsonl",)


def test_gsm8k_contamination_rule():
    assert "gsm_symbolic" in gsm8k_contamination(("chain_sum", "gsm_symbolic"), "gsm8k")
    assert gsm8k_contamination(("chain_sum", "gsm_symbolic"), "easy_arithmetic+gsm8k")
    assert gsm8k_contamination(("chain_sum", "gsm_symbolic"), "easy_arithmetic") is None
    assert gsm8k_contamination(("chain_sum",), "gsm8k") is None


def _report(preset: str, eval_dataset: str, val_dataset: str = "easy_arithmetic_val") -> dict:
    from agent_forge.quietstar.pipeline import make_config

    cfg = make_config(preset, eval_dataset=eval_dataset, val_dataset=val_dataset).to_dict()
    ablation = {"name": "ablation", "n": 40, "accuracy_on": 0.6, "ci95_on": [0.45, 0.74], "accuracy_off": 0.1,
                "ci95_off": [0.04, 0.23], "p": 1e-4, "value": 50.0, "threshold": 2.0, "passed": True}
    ab = {"rounds": 2, "baseline": {"per_round": [0.2, 0.3]}, "candidate": {"per_round": [0.6, 0.5]},
          "per_round_diff": [{"points": 40.0, "ci95_points": [20.0, 60.0], "mcnemar_p": 1e-3}],
          "diff_points": 38.0, "diff_ci_points": [25.0, 50.0], "mcnemar": {"p": 1e-4}, "winner": "candidate"}
    stages = {"step1": {"accuracy_thinking_on": 0.5, "ci95_on": [0.4, 0.6]},
              "anti_theater": {"passed": True, "tests": [ablation]}, "ab_test": ab}
    return {"model": "m", "preset": preset, "config": cfg, "stages": stages, "total_seconds": 60}


def _printed(report: dict) -> list[str]:
    from agent_forge.report import print_summary

    console = Console(record=True, width=200)
    print_summary(console, report)
    return console.export_text().splitlines()


def test_gsm8k_figure_after_gsm_symbolic_training_is_never_printed_unflagged():
    """The standard preset trains on gsm_symbolic (GSM8K test templates)."""
    lines = _printed(_report("standard", "gsm8k"))
    figures = [ln for ln in lines if "TEST" in ln or "A/B:" in ln]
    assert len(figures) == 5 and all("CONTAMINATED" in ln for ln in figures)
    assert any("GSM8K CONTAMINATED" in ln and "gsm_symbolic" in ln for ln in lines)
    assert not any("CONTAMINATED" in ln for ln in lines if "val:" in ln)  # validation is not GSM8K
    val_lines = _printed(_report("standard", "easy_arithmetic", val_dataset="gsm8k"))
    assert all("CONTAMINATED" in ln for ln in val_lines if "val:" in ln)
    assert not any("CONTAMINATED" in ln for ln in val_lines if "TEST" in ln)


@pytest.mark.parametrize("preset,eval_dataset", [("quick", "gsm8k"), ("standard", "easy_arithmetic")])
def test_no_flag_without_both_gsm8k_and_its_templates(preset, eval_dataset):
    assert not any("CONTAMINATED" in ln for ln in _printed(_report(preset, eval_dataset)))


def test_exclude_seen_file_with_a_bad_line_is_named(tmp_path):
    from agent_forge.data.overlap import unseen_items

    seen = tmp_path / "train.jsonl"
    seen.write_text('{"question": "What is 1 + 1?"}\n{"question": "What is 2 + 2?"\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not valid JSON"):
        unseen_items(load_eval_set("easy_arithmetic", limit=3), [seen])


def test_filtered_build_reaches_its_size_and_equals_filter_then_take():
    """build_gym_records(exclude=asked_by()) == build more, drop what an eval set asks, take
    the first share of each family: the slow, obvious version."""
    from agent_forge.data.overlap import asked_by, filter_overlap
    from agent_forge.data.procedural import DEFAULT_FAMILIES, build_gym_records

    stats = {}
    fast = build_gym_records(80, seed=4, stats=stats, exclude=asked_by())
    kept, dropped = filter_overlap(build_gym_records(400, seed=4))
    slow = [r for fam in DEFAULT_FAMILIES for r in [x for x in kept if x.family == fam][:20]]
    assert len(fast) == 80 and stats["eval_overlap"] > 0
    assert sorted(r.id for r in fast) == sorted(r.id for r in slow)
    assert filter_overlap(fast)[1] == []
