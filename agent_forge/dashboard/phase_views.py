"""Dashboard pages of Phases 1, 2 and 4 (Cognate, EvoMerge, BitNet); app.py holds Phase 3's,
the chain's and the registry's, and picks the page by the run's kind."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from agent_forge.dashboard import data, lineage
from agent_forge.dashboard.widgets import (EVOMERGE_LABELS, chart, handoff_checks, interval, run_header,
                                           stage_marks, stages_bar, summary_table)
from agent_forge.figures import pct


# ---------------------------------------------------------------------------------------
# Phase 2: EvoMerge


def evomerge_progress_section(prog: dict) -> None:
    st.markdown(stage_marks(prog, EVOMERGE_LABELS))
    c1, c2 = st.columns(2)
    n_done, n_total = len(prog["stages_done"]), len(prog["stages_total"])
    with c1:
        st.progress(min(1.0, n_done / n_total), text=f"Stages: {n_done} / {n_total} done")
    done, total, cur = prog["generations_done"], prog["generations"], prog["current"]
    with c2:
        text = f"Search: {done} / {total or '?'} generations"
        if cur is not None:
            text += (f" · generation {cur['generation']} running: {cur['evaluated']} new recipes evaluated"
                     f" (population {cur['population'] or '?'}; known recipes come from the cache)")
        elif not done:
            text += " · not started"
        st.progress(min(1.0, done / total) if total else 0.0, text=text)


def evomerge_headline_section(stages: dict, history: list[dict]) -> None:
    """Four numbers: the search's best on validation, the champion on test, the target, the handoff."""
    h = data.evomerge_headline(stages, history)
    cols = st.columns(4)
    delta = None
    if h["best_val"] is not None and h["best_parent_val"] is not None:
        delta = f"{100 * (h['best_val'] - h['best_parent_val']):+.1f} pts vs parent"
    ci = h["best_val_ci"] or [None, None]
    cols[0].metric("Best merge (validation)", pct(h["best_val"]), delta=delta,
                   help=f"best so far on the split the search selects on; 95% interval {interval(*ci)}; "
                        f"best parent {pct(h['best_parent_val'])}")
    gci = h["gain_ci_points"]
    cols[1].metric("Champion (test)", pct(h["champion_test"]),
                   delta=None if h["gain_points"] is None else f"{h['gain_points']:+.1f} pts vs parent",
                   help=f"best parent on the same test items: {pct(h['best_parent_test'])}"
                        + ("" if not gci else f"; paired gain 95% interval [{gci[0]:+.1f}, {gci[1]:+.1f}] points"))
    target = "" if h["target_relative"] is None else f" ≥ {100 * h['target_relative']:.0f}%"
    cols[2].metric(f"Target{target}", {None: "-", True: "met", False: "MISSED"}[h["target_met"]],
                   delta=None if h["relative_gain"] is None else f"{100 * h['relative_gain']:+.1f}% relative",
                   help="the champion's relative gain over the best parent on the test split, with the "
                        "gain's 95% interval above 0" + ("" if not h["relative_gain_ci"] else
                        f"; the relative gain's 95% interval {interval(*h['relative_gain_ci'])}"))
    cols[3].metric("Handoff 2→3", {None: "-", True: "passed", False: "failed"}[h["handoff_ok"]])


def evomerge_search_section(stages: dict, history: list[dict]) -> None:
    st.subheader("Search")
    fitness = data.history_frame(history, ("best", "mean", "worst"))
    best_parent = (stages.get("baseline") or {}).get("best_value")
    if fitness is not None and isinstance(best_parent, (int, float)):
        fitness["best parent"] = float(best_parent)
    c1, c2 = st.columns(2)
    with c1:
        chart("Validation fitness per generation (best so far, mean, worst)", fitness,
               "no generation finished yet")
    with c2:
        chart("Population diversity", data.history_frame(history, ("diversity",)), "no generation finished yet")
    if history:
        cols = ("generation", "best", "gen_best", "mean", "worst", "diversity", "n_evaluated", "cache_hits",
                "n_invalid", "seconds")
        with st.expander(f"Generations ({len(history)})"):
            st.dataframe([{k: r.get(k) for k in cols if k in r} for r in history], hide_index=True,
                         width="stretch")
    best = (stages.get("search") or {}).get("best")
    if isinstance(best, dict):
        weights = ", ".join(f"{w:.2f}" for w in best.get("weights") or [])
        st.caption(f"Champion recipe: {best.get('interp')} + {best.get('taskvec')} + {best.get('layers')}"
                   f" · weights [{weights or 'equal'}] · density {best.get('density')} · "
                   f"task-vector scale {best.get('taskvec_scale')} · made by {best.get('label') or '?'}")


def evomerge_parents_section(stages: dict) -> None:
    st.subheader("Parents")
    parents = data.evomerge_parents(stages)
    if not parents:
        st.caption("not chosen yet")
        return
    rows = [{"": "★ best" if p["best"] else "", "parent": p["parent"], "families": p["families"] or "",
             "validation fitness": pct(p["value"]), "95% interval": interval(p["low"], p["high"]),
             "n": p["n"], "measure": p["kind"] or "", "path": p["path"]} for p in parents]
    st.dataframe(rows, hide_index=True, width="stretch")
    if parents[0]["value"] is None:
        st.caption("validation fitness: measured by the baseline stage")


def evomerge_test_section(stages: dict) -> None:
    st.subheader("Test split (paired)")
    rows = data.evomerge_test_rows(stages)
    if not rows:
        st.caption("measured after the search: champion and best parent on the same test items")
        return
    st.dataframe([{"measure": k, "value": v} for k, v in rows], hide_index=True, width="stretch")
    gain = (stages.get("test") or {}).get("gain") or {}
    if "target_met" in gain:
        verdict = (f"relative gain {100 * gain.get('relative_gain', 0):+.1f}% against a target of "
                   f"{100 * gain.get('target_relative', 0):.0f}% (and an interval above 0)")
        (st.success if gain["target_met"] else st.error)(
            ("Target met: " if gain["target_met"] else "Target MISSED: ") + verdict)


def evomerge_lineage_section(stages: dict, registry: str | None) -> None:
    st.subheader("Family tree")
    tree = lineage.evomerge_family_tree(stages, registry)
    if tree is None:
        st.caption("known once the parents stage has run")
        return
    if tree.get("id") is None:
        st.caption("the champion is registered (with its parents) at the end of the run")
    c1, c2 = st.columns([3, 2])
    with c1:
        st.graphviz_chart(lineage.lineage_dot(tree))
    with c2:
        st.markdown("\n".join(lineage.lineage_lines(tree)))


def evomerge_view(run_dir: Path, registry: str | None) -> None:
    stages = data.load_stages(run_dir)
    history = data.evomerge_history(run_dir)
    run_header(run_dir, registry)
    evomerge_progress_section(data.evomerge_progress(run_dir))
    evomerge_headline_section(stages, history)
    evomerge_search_section(stages, history)
    evomerge_parents_section(stages)
    evomerge_test_section(stages)
    evomerge_lineage_section(stages, registry)
    c3, c4 = st.columns(2)
    with c3:
        plot = data.fitness_plot(run_dir)
        if plot is not None:
            st.subheader("fitness.png")
            st.image(str(plot), caption="as written by the plot stage")
    with c4:
        handoff_checks("Handoff 2→3", stages.get("handoff"))
    summary = data.evomerge_summary(run_dir)
    if summary:
        with st.expander("Summary (as `forge evomerge` printed it)"):
            st.dataframe([{"what": k, "measured": v} for k, v in summary], hide_index=True, width="stretch")


# ---------------------------------------------------------------------------------------
# Phase 4: BitNet


def bitnet_view(run_dir: Path, registry: str | None) -> None:
    stages = data.load_stages(run_dir)
    run_header(run_dir, registry)
    stages_bar(data.stage_progress(run_dir, stages))
    summary_table(data.bitnet_summary(run_dir), "written to bitnet_report.json when the run finishes")
    handoff_checks("Handoff", stages.get("handoff"))


# ---------------------------------------------------------------------------------------
# Phase 1: Cognate


def cognate_view(run_dir: Path, registry: str | None) -> None:
    """The trunk's and each specialisation's training curves, then the evaluation's summary."""
    stages = data.load_stages(run_dir)
    run_header(run_dir, registry)
    stages_bar(data.stage_progress(run_dir, stages))
    records = data.read_metrics(run_dir)
    c1, c2 = st.columns(2)
    with c1:
        chart("Training loss (LM + ponder), per model", data.stage_curves(records, "loss", "cognate_"),
              "no training step logged yet")
    with c2:
        chart("Mean halting steps, per model", data.stage_curves(records, "halting_steps", "cognate_"),
              "no training step logged yet")
    summary_table(data.cognate_summary(run_dir), "written to cognate_report.json when the run finishes")
