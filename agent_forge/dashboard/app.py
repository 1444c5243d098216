"""Agent Forge dashboard (Streamlit): one run at a glance, charts first, live while it trains.

Shows Phase 3 Quiet-STaR runs (`forge bake-quietstar`) here; Phase 1 Cognate (each model's
loss and halting curves, the summary), Phase 2 EvoMerge (the search's fitness per generation,
the parents, the test split, the champion's family tree) and Phase 4 BitNet runs (stages and
summary) in phase_views.py; and a chain (`forge run`, `make demo`): its phases in order, the
whole table, the last model's family tree (each phase is also a run of its own in the sidebar).

Started by `forge dashboard`, which passes the runs folder and the registry in the
FORGE_RUNS_DIR / FORGE_REGISTRY environment variables. All reading is in data.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from agent_forge.dashboard import data, lineage
from agent_forge.dashboard.phase_views import bitnet_view, cognate_view, evomerge_view
from agent_forge.dashboard.widgets import QUIETSTAR_LABELS, chart, handoff_checks, run_header, summary_table
from agent_forge.figures import pct


def sidebar(runs_dir: Path, registry: str | None):
    """Run picker and live-refresh controls; returns (run_dir or None, refresh seconds or None)."""
    st.sidebar.title("Agent Forge")
    st.sidebar.caption(f"runs: {runs_dir}")
    runs = data.find_runs(runs_dir)
    if not runs:
        st.sidebar.info("no runs yet")
        return None, None
    labels = {str(r.relative_to(runs_dir)) if r != runs_dir else r.name: r for r in runs}
    kinds = {k: data.run_kind(r) for k, r in labels.items()}
    choice = st.sidebar.selectbox("Run", list(labels), index=0,
                                  format_func=lambda k: f"{k} · {data.KIND_LABELS[kinds[k]].split(' ', 2)[-1]}")
    run_dir = labels[choice]
    running = data.run_status(run_dir) == "running"
    live = st.sidebar.toggle("Live refresh", value=running, help="re-read the run every few seconds")
    every = st.sidebar.slider("Refresh every (s)", 2, 60, 5, disabled=not live)
    st.sidebar.caption(f"registry: {registry or 'FORGE_HOME default'}")
    return run_dir, (every if live else None)


def progress_section(run_dir: Path, stages: dict) -> None:
    prog = data.run_progress(run_dir)
    done = set(prog["stages_done"])
    pending = [s for s in prog["stages_total"] if s not in done]
    marks = []
    for s in prog["stages_total"]:
        label = QUIETSTAR_LABELS.get(s, s)
        status = (stages.get(s) or {}).get("status")
        if status in ("not_implemented", "skipped"):
            marks.append(f"– {label} ({'n/a' if status == 'not_implemented' else 'skipped'})")
            continue
        mark = "✓" if s in done else ("▶" if pending and s == pending[0] and not prog["finished"] else "·")
        marks.append(f"{mark} {label}")
    st.markdown("**Stages:** " + " &nbsp; ".join(marks))
    c1, c2 = st.columns(2)
    for col, key, title in ((c1, "step1", "Step 1: prompt baking"), (c2, "step2", "Step 2: Quiet-STaR RL")):
        step, total = prog[key]["step"], prog[key]["steps"]
        note = (stages.get(key) or {}).get("status")
        with col:
            if note in ("not_implemented", "skipped"):
                why = "not available in this version" if note == "not_implemented" else "skipped (rl_enabled false)"
                st.progress(0.0, text=f"{title}: {why}")
            elif step is None:
                st.progress(0.0, text=f"{title}: not started")
            else:
                frac = min(1.0, step / total) if total else (1.0 if key in stages else 0.0)
                st.progress(frac, text=f"{title}: {step} / {total or '?'} steps")


def headline_section(stages: dict) -> None:
    h = data.headline(stages)
    cols = st.columns(6)
    cols[0].metric("Baking accuracy", pct(h["baking_accuracy"]), help="held-out teacher-forced token accuracy")
    where = f"{h['accuracy_source']} set, final model"
    cols[1].metric("Accuracy, thinking on", pct(h["accuracy_thinking_on"]), help=where)
    cols[2].metric("Accuracy, thinking off", pct(h["accuracy_thinking_off"]), help=where)
    anti = {None: "-", True: "PASSED", False: "FAILED"}[h["anti_theater_passed"]]
    cols[3].metric("Anti-theater", anti)
    diff = h["ab_diff_points"]
    cols[4].metric("A/B winner", h["ab_winner"] or "-",
                   delta=None if diff is None else f"{diff:+.1f} points")
    cols[5].metric("Handoff 3→4", {None: "-", True: "passed", False: "failed"}[h["handoff_ok"]])


def curves_section(run_dir: Path) -> None:
    records = data.read_metrics(run_dir)
    c1, c2 = st.columns(2)
    with c1:
        chart("Step 1 loss", data.curve(records, data.LOSS_KEYS, "bake"), "no Step 1 steps logged yet")
    with c2:
        acc = data.curve(records, ("token_accuracy",), "bake_eval")
        chart("Held-out token accuracy", acc, "no evaluation during Step 1 (eval_every = 0)")
    c3, c4 = st.columns(2)
    with c3:
        chart("Step 2 reward", data.curve(records, data.REWARD_KEYS, "rl"), "no Step 2 steps logged yet")
    with c4:
        coherence = data.curve(records, data.COHERENCE_KEYS, "rl")
        if coherence is not None:
            coherence = coherence.rename(columns=lambda c: c.replace("coherence_", ""))
        chart("Coherence (semantic 40% / syntactic 30% / predictive 30%)", coherence,
               "no coherence scores logged yet")
    length = data.curve(records, ("thought_length",), "rl")
    if length is not None:
        c5, c6 = st.columns(2)
        with c5:
            chart("Thought length (tokens)", length, "")
        with c6:
            chart("Step 2: accuracy, thought diversity, KL", data.curve(records, data.THOUGHT_KEYS[1:], "rl"),
                   "not logged")


def usage_section(stages: dict) -> None:
    import altair as alt
    import pandas as pd

    st.subheader("Thinking-token usage")
    usage = data.token_usage(stages)
    if not usage:
        st.caption("measured after Step 1's evaluation")
        return
    frame = pd.DataFrame({"token": list(usage), "percent": [100 * v for v in usage.values()]})
    chart = alt.Chart(frame).mark_bar().encode(
        y=alt.Y("token:N", sort=None, title=None, axis=alt.Axis(labelOverlap=False)), x=alt.X("percent:Q", title="% of generations using it",
                                                          scale=alt.Scale(domain=[0, 100])),
        tooltip=["token", alt.Tooltip("percent:Q", format=".1f")]).properties(height=24 * len(frame))
    st.altair_chart(chart, width="stretch")
    u = (stages.get("step2") or {}).get("usage") or (stages.get("step1") or {}).get("usage") or {}
    if "well_formed_rate" in u:
        st.caption(f"well-formed thinking blocks: {pct(u.get('well_formed_rate'))}, "
                   f"closed: {pct(u.get('closed_rate'))}, over {u.get('n', '?')} generations")


def anti_theater_section(stages: dict) -> None:
    st.subheader("Anti-theater validation")
    anti = stages.get("anti_theater")
    if not anti:
        st.caption("not run yet")
        return
    tests = anti.get("tests") or []
    cols = st.columns(max(1, len(tests)))
    for col, t in zip(cols, tests):
        value, threshold = t.get("value"), t.get("threshold")
        shown = f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
        text = f"{t.get('name')}: {shown} (needs {'>=' if t.get('at_least') else '>'} {threshold})"
        with col:
            (st.success if t.get("passed") else st.error)(("PASS  " if t.get("passed") else "FAIL  ") + text)
            if t.get("detail"):
                st.caption(t["detail"])
    verdict = "PASSED" if anti.get("passed") else f"FAILED: {anti.get('recommendation', 'roll back')}"
    st.markdown(f"**Verdict: {verdict}.** {anti.get('sentence', '')}")


def ab_section(stages: dict) -> None:
    st.subheader("A/B test")
    ab = stages.get("ab_test")
    if not ab:
        st.caption("not run yet")
        return
    frame = data.ab_rounds(stages)
    c1, c2 = st.columns([2, 1])
    with c1:
        if frame is not None:
            import altair as alt

            st.markdown("**Accuracy per round (%)**")
            long = frame.reset_index().melt("round", var_name="arm", value_name="accuracy")
            chart = alt.Chart(long).mark_bar().encode(
                x=alt.X("round:O"), xOffset="arm:N", y=alt.Y("accuracy:Q", title="accuracy %"),
                color=alt.Color("arm:N", legend=alt.Legend(orient="bottom")),
                tooltip=["arm", "round", alt.Tooltip("accuracy:Q", format=".1f")]).properties(height=220)
            st.altair_chart(chart, width="stretch")
    with c2:
        ci = ab.get("diff_ci_points") or [None, None]
        st.metric("Difference", f"{ab.get('diff_points', 0):+.1f} pts",
                  help="candidate minus baseline, accuracy points")
        if None not in ci:
            st.caption(f"95% CI [{ci[0]:+.1f}, {ci[1]:+.1f}] points")
        st.metric("p (per question)", f"{(ab.get('mcnemar') or {}).get('p', float('nan')):.3g}",
                  help=(ab.get("mcnemar") or {}).get("test"))
        st.metric("Winner", ab.get("winner", "-"))
    st.caption(ab.get("sentence", ""))


def checkpoints_and_handoff(run_dir: Path, stages: dict) -> None:
    c1, c2 = st.columns(2)
    with c1:
        st.subheader("Checkpoints")
        ckpts = data.checkpoints(run_dir)
        if ckpts:
            st.dataframe(ckpts, hide_index=True, width="stretch")
        else:
            st.caption("none yet (a finished step keeps its model, not its checkpoints)")
    with c2:
        handoff_checks("Handoff 3→4", stages.get("handoff"))


def run_view(run_dir: Path, registry: str | None) -> None:
    stages = data.load_stages(run_dir)
    run_header(run_dir, registry)
    progress_section(run_dir, stages)
    headline_section(stages)
    st.subheader("Curves")
    curves_section(run_dir)
    c1, c2 = st.columns(2)
    with c1:
        usage_section(stages)
    with c2:
        ab_section(stages)
    anti_theater_section(stages)
    beyond_test_section(stages)
    checkpoints_and_handoff(run_dir, stages)


def beyond_test_section(stages: dict) -> None:
    """The fresh split beside the test split, and the general tasks, as the report prints them."""
    from agent_forge.report import fresh_rows, general_rows

    rows = fresh_rows(stages.get("fresh_split") or {}) + general_rows(stages.get("general") or {})
    st.subheader("Beyond the test split")
    if not rows:
        st.caption("not run yet")
        return
    st.dataframe([{"measure": k.strip(), "value": v} for k, v in rows], hide_index=True, width="stretch")


# ---------------------------------------------------------------------------------------
# A chain (`forge run`, `make demo`): the phases in order, the whole table, the family tree


def chain_view(run_dir: Path, registry: str | None) -> None:
    run_header(run_dir, registry)
    prog = data.chain_progress(run_dir)
    marks = [f"{'✓' if p in prog['done'] else ('▶' if p in prog['running'] else '·')} {p}" for p in prog["phases"]]
    st.markdown(" → ".join(marks) or "no phase started yet")
    n_done, n_total = len(prog["done"]), max(len(prog["phases"]), 1)
    st.progress(min(1.0, n_done / n_total), text=f"Phases: {n_done} / {len(prog['phases'])} done")
    st.caption("Each phase is a run of its own, with its live curves: pick "
               + ", ".join(f"`{run_dir.name}/{p}`" for p in prog["phases"]) + " in the sidebar.")
    summary_table(data.chain_summary(run_dir), "written to forge_report.json when the last phase finishes")
    html = run_dir / data.CHAIN_HTML
    if html.is_file():
        st.download_button("forge_report.html (one page, with the plots)", html.read_bytes(),
                           file_name=html.name, mime="text/html")
    model_id = data.chain_last_model_id(run_dir)
    tree = lineage.lineage(registry, model_id) if model_id is not None else None
    if tree is not None:
        st.subheader("Lineage of the last model")
        st.markdown("\n".join(lineage.lineage_lines(tree)))


VIEWS = {"quietstar": run_view, "evomerge": evomerge_view, "bitnet": bitnet_view, "cognate": cognate_view,
         "chain": chain_view}


def registry_view(registry: str | None) -> None:
    models = data.registry_models(registry)
    if not models:
        st.caption("no models registered yet")
        return
    rows = [{"id": m["id"], "name": m["name"], "phase": m["phase"], "handoff": m["handoff_status"],
             "parent": m["parent_id"], "path": m["path"], "created": m["created"],
             **{k: v for k, v in (m["metrics"] or {}).items() if isinstance(v, (int, float, str, bool))}}
            for m in models]
    st.dataframe(rows, hide_index=True, width="stretch")


def main() -> None:
    st.set_page_config(page_title="Agent Forge", layout="wide")
    runs_dir = Path(os.environ.get("FORGE_RUNS_DIR", "runs"))
    registry = os.environ.get("FORGE_REGISTRY") or None
    run_dir, every = sidebar(runs_dir, registry)
    kind = data.run_kind(run_dir) if run_dir is not None else None
    st.title("Agent Forge" + (f" · {data.KIND_LABELS[kind]}" if kind else ""))
    tab_run, tab_registry = st.tabs(["Run", "Model registry"])
    with tab_run:
        if run_dir is None:
            st.info(f"No runs under {runs_dir}. Start one with `forge bake-quietstar --out {runs_dir}/demo` "
                    f"(Phase 3), `forge evomerge --make-parents --out {runs_dir}/merge` (Phase 2) or "
                    f"`forge bitnet --model ... --out {runs_dir}/ternary` (Phase 4).")
        else:
            st.fragment(run_every=every)(VIEWS[kind])(run_dir, registry)
    with tab_registry:
        registry_view(registry)


main()
