"""The short summary table printed at the end of `forge bake-quietstar`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


CARRYING_STAGES = ("trace_baking", "step2")  # newest first; Step 1's model is the fallback


def carried_stage(stages: dict) -> str:
    """The stage whose model goes forward: the newest that produced one and was not rolled
    back (a rolled-back stage has no "model_dir"), else Step 1."""
    return next((name for name in CARRYING_STAGES if (stages.get(name) or {}).get("model_dir")), "step1")


def carried_val_accuracy(stages: dict) -> float | None:
    """Validation accuracy (thinking on) of the model that goes forward."""
    res = stages.get(carried_stage(stages)) or {}
    return res.get("val_accuracy_after", res.get("accuracy_thinking_on"))


def headline(report: dict) -> dict:
    """The test-set numbers of the final model: from anti-theater's ablation (thinking on and
    forced off, same questions) and the A/B's greedy round (the input model)."""
    st = report.get("stages", {})
    ablation = next((t for t in st.get("anti_theater", {}).get("tests", []) if t["name"] == "ablation"), {})
    ab = st.get("ab_test", {})
    greedy = (ab.get("per_round_diff") or [{}])[0]
    return {"n": ablation.get("n"), "accuracy_on": ablation.get("accuracy_on"), "ci95_on": ablation.get("ci95_on"),
            "accuracy_off": ablation.get("accuracy_off"), "ci95_off": ablation.get("ci95_off"),
            "on_vs_off_p": ablation.get("p"),
            "input_accuracy_greedy": (ab.get("baseline") or {}).get("per_round", [None])[0],
            "candidate_accuracy_greedy": (ab.get("candidate") or {}).get("per_round", [None])[0],
            "greedy_gain_points": greedy.get("points"), "greedy_gain_ci_points": greedy.get("ci95_points"),
            "greedy_gain_p": greedy.get("mcnemar_p"),
            "ab_diff_points": ab.get("diff_points"), "ab_diff_ci_points": ab.get("diff_ci_points"),
            "ab_p": (ab.get("mcnemar") or {}).get("p"), "ab_winner": ab.get("winner")}


def summary_rows(report: dict) -> list[tuple[str, str]]:
    st = report.get("stages", {})
    s1, s2, at, ho = (st.get(k, {}) for k in ("step1", "step2", "anti_theater", "handoff"))
    h = headline(report)
    rows = [(f"TEST accuracy, thinking on (n={h['n']})", _pct(h["accuracy_on"]) + _ci(h["ci95_on"])),
            ("TEST accuracy, thinking forced off", _pct(h["accuracy_off"]) + _ci(h["ci95_off"])
             + (f"  (McNemar p={h['on_vs_off_p']:.2g})" if h["on_vs_off_p"] is not None else "")),
            ("TEST input model, answering directly", _pct(h["input_accuracy_greedy"]) + " (A/B greedy round)")]
    if h["greedy_gain_points"] is not None:
        lo, hi = h["greedy_gain_ci_points"]
        rows.append(("TEST thinking model - input (greedy)",
                     f"{h['greedy_gain_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}], p={h['greedy_gain_p']:.2g}"))
    if h["ab_diff_points"] is not None:
        lo, hi = h["ab_diff_ci_points"] or (0, 0)
        rows.append(("A/B: thinking model - input (greedy + sampled rounds)",
                     f"{h['ab_diff_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}], p={h['ab_p']:.2g}, winner: {h['ab_winner']}"))
    rows += [("val: Step 1 accuracy, thinking on", _pct(s1.get("accuracy_thinking_on")) + _ci(s1.get("ci95_on"))),
             ("Step 1 held-out token accuracy (converged?)",
              f"{_pct(s1.get('baking_accuracy'))} ({s1.get('convergence', {}).get('converged')})"),
             ("well-formed thinking (Step 1, val)", _pct((s1.get("usage") or {}).get("well_formed_rate")))]
    if s2.get("accuracy_thinking_on") is not None:
        rows.append(("val: Step 2 accuracy, thinking on", _pct(s2.get("accuracy_thinking_on")) + _ci(s2.get("ci95_on"))
                     + ("  kept" if s2.get("kept") else "  ROLLED BACK")))
    tb = st.get("trace_baking", {})
    if tb.get("val_accuracy_after") is not None:
        verdict = "kept" if tb.get("kept") else "ROLLED BACK"
        rows.append(("val: after trace baking, thinking on",
                     f"{_pct(tb['val_accuracy_after'])} ({verdict}; {tb.get('kept_traces')} verified traces)"))
    if at:
        rows.append(("anti-theater", f"{'passed' if at.get('passed') else 'FAILED'}: {at.get('recommendation', '')}"))
        rows += [(f"  {t['name']} (> {t['threshold']})", f"{t['value']:.3g} {'pass' if t['passed'] else 'FAIL'}")
                 for t in at.get("tests", [])]
    if ho:
        rows.append(("Phase 3 -> 4 handoff", "passed" if ho.get("ok") else "failed"))
    rows.append(("total time", f"{report.get('total_seconds', 0) / 60:.1f} min"))
    return rows


def print_summary(console: Console, report: dict) -> None:
    table = Table(title=f"Agent Forge Phase 3: {report.get('model')} ({report.get('preset')})", show_header=False)
    for name, value in summary_rows(report):
        table.add_row(name, value)
    console.print(table)
    console.print(f"report: {report.get('out')}/forge_report.json")
