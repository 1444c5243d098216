"""What the dashboard shows, read from run directories and the registry; no Streamlit here.

A run directory is what `forge bake-quietstar` (or an API job) writes: pipeline_state.json
(finished stages and their results), metrics.jsonl (one line per logged step), the config
(forge_report.json at the end, pipeline_config.json from API jobs), step1/ and step2/
checkpoints. Every reader tolerates a run that is still being written: missing or
half-written files read as empty.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent_forge.tracking import METRICS_FILE, read_metrics

STATE_FILE = "pipeline_state.json"
REPORT_FILE = "forge_report.json"
CONFIG_FILE = "pipeline_config.json"
RUN_MARKERS = (STATE_FILE, METRICS_FILE)
# agent_forge.quietstar.pipeline.STAGES, by name (kept here so reading a run never imports torch;
# tests check the two agree)
STAGE_ORDER = ("validate_input", "vocab", "data", "step1", "step2", "trace_baking", "anti_theater", "ab_test",
               "fresh_split", "general", "save", "register", "handoff")
SKIP_DIRS = {"model", "checkpoints", "data", "wandb", "step1", "step2", ".git"}
ACTIVE_SECONDS = 120.0  # a run whose files changed this recently counts as running

LOSS_KEYS = ("loss",)
REWARD_KEYS = ("reward_mean", "reward_rolling", "reward", "rolling_reward")
COHERENCE_KEYS = ("coherence_semantic", "coherence_syntactic", "coherence_predictive", "coherence_composite")
THOUGHT_KEYS = ("thought_length", "thought_diversity", "kl", "accuracy")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_run(path: Path) -> bool:
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_runs(runs_dir: str | Path, depth: int = 2) -> list[Path]:
    """Run directories at most `depth` levels under runs_dir (itself included), newest first."""
    root = Path(runs_dir)
    found, frontier = [], [root]
    for _ in range(depth + 1):
        nxt = []
        for d in frontier:
            if not d.is_dir():
                continue
            if is_run(d):
                found.append(d)
            nxt += [c for c in sorted(d.iterdir()) if c.is_dir() and c.name not in SKIP_DIRS
                    and not c.name.startswith(".")]
        frontier = nxt
    return sorted(found, key=last_modified, reverse=True)


def last_modified(run_dir: Path) -> float:
    times = [(run_dir / m).stat().st_mtime for m in (*RUN_MARKERS, REPORT_FILE) if (run_dir / m).exists()]
    return max(times, default=0.0)


def load_stages(run_dir: str | Path) -> dict:
    """{stage: result} of the finished stages."""
    stages = _read_json(Path(run_dir) / STATE_FILE).get("stages")
    return stages if isinstance(stages, dict) else {}


def load_config(run_dir: str | Path) -> dict:
    """The run's PipelineConfig as a dict: from the final report, else the API job's copy."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / REPORT_FILE).get("config")
    return config if isinstance(config, dict) else _read_json(run_dir / CONFIG_FILE)


def _last_step(records: list[dict]) -> int | None:
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    return max(steps) if steps else None


def run_progress(run_dir: str | Path) -> dict:
    """Stages done and Step 1 / Step 2 steps done against the configured totals."""
    run_dir = Path(run_dir)
    stages, config = load_stages(run_dir), load_config(run_dir)
    records = read_metrics(run_dir)
    step1 = stages.get("step1", {})
    step2 = stages.get("step2", {})
    s1_done = _last_step([r for r in records if r.get("stage") == "bake"])
    s2_done = _last_step([r for r in records if r.get("stage") == "rl"])
    s1_total = (config.get("bake") or {}).get("steps") or step1.get("steps")
    s2_total = (config.get("rl") or {}).get("steps") or step2.get("steps")
    return {"stages_done": [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER],
            "stages_total": list(STAGE_ORDER),
            "step1": {"step": step1.get("steps", s1_done) if step1 else s1_done, "steps": s1_total},
            "step2": {"step": step2.get("steps", s2_done) if step2 else s2_done, "steps": s2_total},
            "finished": (run_dir / REPORT_FILE).exists()}


def run_status(run_dir: str | Path, now: float | None = None) -> str:
    """finished | running | stopped, from the files alone (a job record, when there is one, knows better)."""
    run_dir = Path(run_dir)
    if (run_dir / REPORT_FILE).exists():
        return "finished"
    age = (now if now is not None else time.time()) - last_modified(run_dir)
    return "running" if age < ACTIVE_SECONDS else "stopped"


def curve(records: list[dict], keys: tuple[str, ...], stage: str | None = None):
    """DataFrame indexed by step with the given metric columns (those present); None if empty."""
    import pandas as pd

    rows = [r for r in records if (stage is None or r.get("stage") == stage)]
    cols = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not rows or not cols:
        return None
    frame = pd.DataFrame([{"step": r["step"], **{k: r.get(k) for k in cols}} for r in rows])
    frame = frame.groupby("step").last()  # a resumed run re-logs steps after its checkpoint: keep the newest
    return frame.astype(float)


def token_usage(stages: dict) -> dict[str, float]:
    """Fraction of generations using each thinking token: Step 2's measurement if any, else Step 1's."""
    for name in ("step2", "step1"):
        usage = (stages.get(name) or {}).get("usage") or {}
        rate = usage.get("token_rate")
        if isinstance(rate, dict) and rate:
            return {str(k): float(v) for k, v in rate.items() if isinstance(v, (int, float))}
    return {}


def headline(stages: dict) -> dict:
    """The few numbers a person looks for first; None where the stage has not run.

    Accuracy is the final model's on the test set (anti-theater's on/off pass) once that has
    run; before, the validation accuracy of the newest stage whose model was kept.
    """
    from agent_forge.report import carried_stage, carried_val_accuracy
    from agent_forge.report import headline as test_headline

    step1 = stages.get("step1") or {}
    test = test_headline({"stages": stages})
    anti, ab, hand = stages.get("anti_theater"), stages.get("ab_test"), stages.get("handoff")
    on_test = test["accuracy_on"] is not None
    return {"baking_accuracy": step1.get("baking_accuracy"),
            "accuracy_thinking_on": test["accuracy_on"] if on_test else carried_val_accuracy(stages),
            "accuracy_thinking_off": test["accuracy_off"] if on_test
            else (stages.get(carried_stage(stages)) or {}).get("accuracy_thinking_off"),
            "accuracy_source": "test" if on_test else "validation",
            "anti_theater_passed": None if anti is None else bool(anti.get("passed")),
            "ab_winner": None if ab is None else ab.get("winner"),
            "ab_diff_points": None if ab is None else ab.get("diff_points"),
            "handoff_ok": None if hand is None else bool(hand.get("ok"))}


def ab_rounds(stages: dict):
    """Per-round accuracy of both A/B arms as a DataFrame (rounds x arms), or None."""
    import pandas as pd

    ab = stages.get("ab_test") or {}
    arms = [ab.get("baseline") or {}, ab.get("candidate") or {}]
    if not all(isinstance(a.get("per_round"), list) and a["per_round"] for a in arms):
        return None
    data = {a.get("name") or f"arm {i}": [100.0 * float(x) for x in a["per_round"]] for i, a in enumerate(arms)}
    n = min(len(v) for v in data.values())
    return pd.DataFrame({k: v[:n] for k, v in data.items()}, index=pd.Index(range(1, n + 1), name="round"))


def checkpoints(run_dir: str | Path) -> list[dict]:
    """Training checkpoints (step1/, step2/, or a bare `forge bake` run's own), oldest first."""
    run_dir = Path(run_dir)
    out = []
    for part in ("step1", "step2", "."):
        ckpt_dir = run_dir / part / "checkpoints"
        if not ckpt_dir.is_dir():
            continue
        for d in sorted(ckpt_dir.glob("step-*")):
            state = _read_json(d / "trainer_state.json")
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            out.append({"stage": "step1" if part == "." else part, "name": d.name, "step": state.get("step"),
                        "size_mb": round(size / 2**20, 2),
                        "saved": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.stat().st_mtime))})
    return out


def registry_models(path: str | Path | None) -> list[dict]:
    """Registered models (newest first); [] when the registry file does not exist (never creates one)."""
    from agent_forge.registry import Registry, default_registry_path

    path = Path(path) if path else default_registry_path()
    if not path.exists():
        return []
    return [m.to_dict() for m in reversed(Registry(path).list_models())]


def jobs_for_run(registry: str | Path | None, run_dir: str | Path) -> list[dict]:
    """API jobs recorded for this run directory, newest first."""
    from agent_forge.registry import Registry, default_registry_path

    path = Path(registry) if registry else default_registry_path()
    if not path.exists():
        return []
    target = str(Path(run_dir).resolve())
    runs = [r for r in Registry(path).list_runs() if r.kind.startswith("job:") and r.config.get("out") == target]
    return [{"id": r.id, "kind": r.kind[4:], "status": r.status, "updated": r.updated,
             "note": r.state.get("note")} for r in reversed(runs)]
