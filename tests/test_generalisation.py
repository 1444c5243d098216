"""Fresh split and general tasks: pairing, best reading, the verdict, the report and the handoff."""

import pytest

from agent_forge.evaluation.runner import EvalResult
from agent_forge.report import summary_rows
from agent_forge.validation import generalisation as G


def _result(correct, flexible=None, closed=None, loglik=None) -> EvalResult:
    rows = [{"correct": c, "flexible": (flexible or [None] * len(correct))[i],
             "closed": True if closed is None else closed[i]} for i, c in enumerate(correct)]
    ll = None if loglik is None else {"acc": sum(p == g for p, g in loglik) / len(loglik),
                                      "per_example": [{"pred": p, "gold": g} for p, g in loglik]}
    return EvalResult(accuracy=sum(correct) / len(correct), n=len(correct), ci95=[0.0, 1.0], per_family={},
                      ms_per_example=1.0, no_answer_rate=0.0, mode="x", per_example=rows, loglik=ll)


def test_compare_on_pairs_per_item_and_gives_the_input_its_best_reading(monkeypatch):
    think = _result([True, True, False, True], closed=[True, True, False, True], loglik=[(0, 0), (1, 2), (3, 3), (0, 0)])
    base = _result([False, False, False, True], flexible=[True, False, False, None], loglik=[(0, 0), (2, 2), (3, 3), (1, 0)])
    calls = iter([think, base])
    monkeypatch.setattr(G, "evaluate", lambda *a, **k: next(calls))
    out = G.compare_on([1, 2, 3, 4], None, None, None, None, max_new_tokens=8, batch_size=2, loglik=True)
    # input best reading: [T (flexible), F, F, T] -> 0.5; thinking [T, T, F, T] -> 0.75
    assert out["input_accuracy"] == 0.5 and out["accuracy_on"] == 0.75 and out["closed_rate"] == 0.75
    assert out["gain"]["points"] == pytest.approx(25.0) and out["gain"]["n"] == 4
    assert out["loglik"]["acc"] == 0.75 and out["loglik"]["input_acc"] == 0.75
    assert out["loglik"]["gain"]["points"] == pytest.approx(0.0)


def _set(points, hi, closed=1.0, ll_hi=None):
    r = {"gain": {"points": points, "ci95_points": [points - 5, hi]}, "closed_rate": closed}
    if ll_hi is not None:
        r["loglik"] = {"gain": {"points": ll_hi - 3, "ci95_points": [ll_hi - 6, ll_hi]}}
    return r


def test_general_verdict_names_every_failure():
    assert G.general_verdict({"arc_easy": _set(-1.0, 3.0, 0.97, 2.0)})["passed"]
    v = G.general_verdict({"arc_easy": _set(-20.0, -15.0, 0.15, -1.0), "commonsense_qa": _set(0.0, 4.0)})
    assert not v["passed"] and len(v["reasons"]) == 3
    assert all(r.startswith("arc_easy") for r in v["reasons"])
    assert "closed on 15%" in v["reasons"][1]


def test_report_shows_fresh_beside_test_and_the_general_rows():
    fresh = {"n": 140, "eval_set": "easy_arithmetic_fresh:7", "accuracy_on": 0.4, "ci95_on": [0.32, 0.48],
             "input_accuracy": 0.1, "gain": {"points": 30.0, "ci95_points": [21.0, 39.0]}}
    arc = {"n": 100, "accuracy_on": 0.04, "input_accuracy": 0.27, "closed_rate": 0.15,
           "gain": {"points": -23.0, "ci95_points": [-31.0, -15.0]},
           "loglik": {"acc": 0.45, "input_acc": 0.49, "gain": {"points": -4.0, "ci95_points": [-9.0, 1.0]}}}
    general = {"sets": {"arc_easy": arc}, **G.general_verdict({"arc_easy": arc}), "gate": True}
    rows = dict(summary_rows({"stages": {"fresh_split": fresh, "general": general}}))
    assert rows["FRESH accuracy, thinking on (n=140, easy_arithmetic_fresh:7)"] == "40.0% [32.0, 48.0]"
    assert rows["FRESH thinking model - input (greedy)"] == "+30.0 points [+21.0, +39.0]; input 10.0%"
    assert rows["general tasks (vs input model)"] == "REGRESSED"
    assert rows["  arc_easy (n=100), thinking on"].endswith("closed 15.0%")
    assert rows["  arc_easy log-likelihood acc"] == "45.0% vs input 49.0%: -4.0 points [-9.0, +1.0]"
