"""Dashboard building blocks every phase's page uses: numbers as text, charts, stage marks,
the run header, handoff checks, summary tables. Pages are in app.py and phase_views.py."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from agent_forge.dashboard import data
from agent_forge.figures import pct

# Each phase's stage names as a person reads them (a name not listed shows as itself).
QUIETSTAR_LABELS = {"validate_input": "input check", "vocab": "vocabulary", "data": "data",
                    "step1": "Step 1 bake", "step2": "Step 2 RL", "trace_baking": "trace baking",
                    "anti_theater": "anti-theater", "ab_test": "A/B test", "fresh_split": "fresh split",
                    "general": "general tasks", "save": "save", "register": "register", "handoff": "handoff"}
EVOMERGE_LABELS = {"parents": "parents", "baseline": "baseline (validation)", "search": "search",
                   "test": "test split", "save": "save", "plot": "plot", "register": "register",
                   "handoff": "handoff 2→3"}
BITNET_LABELS = {"validate_input": "input check", "data": "data", "before": "before (test)", "qat": "QAT",
                 "after": "after (test)", "save": "save", "speed": "speed", "agreement": "GGUF agreement",
                 "register": "register", "handoff": "handoff"}
COGNATE_LABELS = {"data": "curriculum", "foundation": "trunk", "specialise_reasoning": "reasoning",
                  "specialise_memory": "memory", "specialise_speed": "speed",
                  "control_independent": "control: 2nd trunk", "control_transformer": "control: transformer",
                  "evaluate": "evaluate", "register": "register"}
STAGE_LABELS = {"quietstar": QUIETSTAR_LABELS, "evomerge": EVOMERGE_LABELS, "bitnet": BITNET_LABELS,
                "cognate": COGNATE_LABELS}


def interval(low, high) -> str:
    return "-" if low is None or high is None else f"[{pct(low)}, {pct(high)}]"


def chart(title: str, frame, empty: str) -> None:
    st.markdown(f"**{title}**")
    if frame is None:
        st.caption(empty)
    else:
        st.line_chart(frame, height=220)


def stage_marks(prog: dict, labels: dict) -> str:
    done = set(prog["stages_done"])
    pending = [s for s in prog["stages_total"] if s not in done]
    marks = [f"{'✓' if s in done else ('▶' if pending and s == pending[0] and not prog['finished'] else '·')} "
             f"{labels.get(s, s)}" for s in prog["stages_total"]]
    return "**Stages:** " + " &nbsp; ".join(marks)


def stages_bar(prog: dict) -> None:
    """The phase's stage marks and an "n / N done" bar."""
    st.markdown(stage_marks(prog, STAGE_LABELS.get(prog.get("kind"), {})))
    n_done, n_total = len(prog["stages_done"]), max(len(prog["stages_total"]), 1)
    st.progress(min(1.0, n_done / n_total), text=f"Stages: {n_done} / {len(prog['stages_total'])} done")


def summary_table(rows: list[tuple[str, str]], empty: str) -> None:
    """The (what, measured) rows a phase command printed, or why there are none yet."""
    st.subheader("Summary")
    if rows:
        st.dataframe([{"what": k.strip(), "measured": v} for k, v in rows], hide_index=True, width="stretch")
    else:
        st.caption(empty)


def handoff_checks(title: str, hand: dict | None) -> None:
    st.subheader(title)
    if not hand:
        st.caption("not checked yet")
        return
    (st.success if hand.get("ok") else st.error)("handoff passed" if hand.get("ok") else "handoff failed")
    for check in hand.get("checks") or []:
        st.markdown(f"{'✓' if check.get('ok') else '✗'} **{check.get('name')}**: {check.get('message', '')}")


def run_header(run_dir: Path, registry: str | None) -> None:
    status = data.run_status(run_dir)
    jobs = data.jobs_for_run(registry, run_dir)
    st.header(f"Run: {run_dir.name}")
    age = time.time() - data.last_modified(run_dir)
    job = f"; API job {jobs[0]['id']} {jobs[0]['status']}" if jobs else ""
    st.caption(f"{run_dir} · {data.KIND_LABELS[data.run_kind(run_dir)]} · {status}, last write {age:,.0f} s ago"
               f"{job} · read {time.strftime('%H:%M:%S')}")


