"""The short summary table printed at the end of `forge bake-quietstar`."""

from __future__ import annotations

from rich.console import Console

from agent_forge.figures import ci_text, pct
from agent_forge.progress import print_rows
from agent_forge.stages import resumed_note


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
    rows = [(f"TEST accuracy, thinking on (n={h['n']})", pct(h["accuracy_on"]) + ci_text(h["ci95_on"])),
            ("TEST accuracy, thinking forced off", pct(h["accuracy_off"]) + ci_text(h["ci95_off"])
             + (f"  (McNemar p={h['on_vs_off_p']:.2g})" if h["on_vs_off_p"] is not None else "")),
            ("TEST input model, answering directly", pct(h["input_accuracy_greedy"]) + " (A/B greedy round)")]
    if h["greedy_gain_points"] is not None:
        lo, hi = h["greedy_gain_ci_points"]
        rows.append(("TEST thinking model - input (greedy)",
                     f"{h['greedy_gain_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}], p={h['greedy_gain_p']:.2g}"))
    rows += fresh_rows(st.get("fresh_split") or {})
    rounds = (st.get("ab_test") or {}).get("rounds") or 0
    if h["ab_diff_points"] is not None and rounds > 1:  # one round is the greedy row above
        lo, hi = h["ab_diff_ci_points"] or (0, 0)
        rows.append((f"A/B: thinking model - input ({rounds} rounds, per question)",
                     f"{h['ab_diff_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}], p={h['ab_p']:.2g}, winner: {h['ab_winner']}"))
    elif h["ab_winner"] is not None:
        rows.append(("A/B winner (greedy round)", str(h["ab_winner"])))
    rows += [("val: Step 1 accuracy, thinking on", pct(s1.get("accuracy_thinking_on")) + ci_text(s1.get("ci95_on"))),
             ("Step 1 held-out token accuracy (converged?)",
              f"{pct(s1.get('baking_accuracy'))} ({s1.get('convergence', {}).get('converged')})"),
             ("well-formed thinking (Step 1, val)", pct((s1.get("usage") or {}).get("well_formed_rate")))]
    if s2.get("status") == "skipped":
        rows.append(("Step 2 (Quiet-STaR RL)", "skipped: " + s2.get("note", "")))
    if s2.get("accuracy_thinking_on") is not None:
        rows.append(("val: Step 2 accuracy, thinking on", pct(s2.get("accuracy_thinking_on")) + ci_text(s2.get("ci95_on"))
                     + ("  kept" if s2.get("kept") else "  ROLLED BACK")))
    tb = st.get("trace_baking", {})
    if tb.get("status") == "skipped":
        rows.append(("trace baking", "skipped: " + tb.get("note", "")))
    if tb.get("val_accuracy_after") is not None:
        verdict = "kept" if tb.get("kept") else "ROLLED BACK"
        rows.append(("val: after trace baking, thinking on",
                     f"{pct(tb['val_accuracy_after'])} ({verdict}; {tb.get('kept_traces')} verified traces)"))
    if at:
        rows.append(("anti-theater", f"{'passed' if at.get('passed') else 'FAILED'}: {at.get('recommendation', '')}"))
        rows += [anti_theater_row(t) for t in at.get("tests", [])]
    rows += general_rows(st.get("general") or {})
    if ho:
        rows.append(("Phase 3 -> 4 handoff", "passed" if ho.get("ok") else "failed"))
    rows.append(("total time", f"{report.get('total_seconds', 0) / 60:.1f} min{resumed_note(st)}"))
    return flag_gsm8k(rows, report)


def _gain(g: dict) -> str:
    lo, hi = g["ci95_points"]
    return f"{g['points']:+.1f} points [{lo:+.1f}, {hi:+.1f}]"


def fresh_rows(fr: dict) -> list[tuple[str, str]]:
    """The fresh split beside the test split: thinking on, and the gain over the input model."""
    if "accuracy_on" not in fr:
        return []
    return [(f"FRESH accuracy, thinking on (n={fr['n']}, {fr['eval_set']})",
             pct(fr["accuracy_on"]) + ci_text(fr["ci95_on"])),
            ("FRESH thinking model - input (greedy)",
             f"{_gain(fr['gain'])}; input {pct(fr['input_accuracy'])}")]


def general_rows(gen: dict) -> list[tuple[str, str]]:
    """Per general set: answers with thinking vs the input model, closed rate, log-likelihood."""
    if "sets" not in gen:
        return []
    rows = [("general tasks (vs input model)", ("passed" if gen["passed"] else "REGRESSED")
             + ("" if gen.get("gate") else " (not gating)"))]
    for name, r in gen["sets"].items():
        ll = r.get("loglik") or {}
        rows.append((f"  {name} (n={r['n']}), thinking on",
                     f"{pct(r['accuracy_on'])} vs input {pct(r['input_accuracy'])}: {_gain(r['gain'])}; "
                     f"closed {pct(r['closed_rate'])}"))
        if ll:
            rows.append((f"  {name} log-likelihood acc", f"{pct(ll['acc'])} vs input {pct(ll['input_acc'])}: "
                         f"{_gain(ll['gain'])}"))
    return rows


def flag_gsm8k(rows: list[tuple[str, str]], report: dict) -> list[tuple[str, str]]:
    """Mark every test (TEST, A/B) or validation (val:) figure measured on GSM8K when the
    training data came from GSM8K test templates, and say why in a first row."""
    from agent_forge.data.overlap import gsm8k_contamination

    cfg = report.get("config") or {}
    families = (cfg.get("data") or {}).get("families")
    test, val = (gsm8k_contamination(families, cfg.get(k)) for k in ("eval_dataset", "val_dataset"))
    if not (test or val):
        return rows
    split = {"TEST": test, "A/B:": test, "A/B": test, "val:": val}
    return [("GSM8K CONTAMINATED", test or val)] + [
        (name, value + "  CONTAMINATED" if split.get(name.split(" ")[0]) else value) for name, value in rows]


def anti_theater_row(t: dict) -> tuple[str, str]:
    """One anti-theater test: what it needs, its value, and what qualifies it (the ablation's
    p-value, divergence's unclosed rate, which coherence parts the correlation used)."""
    alpha = t.get("alpha")
    from agent_forge.validation.anti_theater import comparison, value_text

    label = f"  {t['name']} ({comparison(t)} {t['threshold']}" + (f", p < {alpha})" if alpha is not None else ")")
    value = value_text(t, ".3g") + (f", p={t['p']:.2g}" if alpha is not None else "")
    if t.get("n_checks") is not None:
        value += f" of {t['n_checks']} checks"
    if t.get("correction_rate") is not None:
        value += f"; {pct(t['correction_rate'])} of {t['n_failed_checks']} failed ones corrected"
    if t.get("unclosed_rate") is not None:
        value += f" (unclosed {pct(t['unclosed_rate'])})"
    parts = t.get("coherence_parts")
    if parts:
        value += " (parts: " + ", ".join(f"{k} {parts[k]}" for k in ("semantic", "structure", "claims")) \
                 + f" of {parts['n']})"
    return label, f"{value} {'pass' if t['passed'] else 'FAIL'}"


def print_summary(console: Console, report: dict) -> None:
    print_rows(console, f"Agent Forge Phase 3: {report.get('model')} ({report.get('preset')})", summary_rows(report))
    console.print(f"report: {report.get('out')}/forge_report.json")
