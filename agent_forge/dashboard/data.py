"""What the dashboard shows, read from run directories and the registry; no Streamlit here.

A run directory is what a phase command (or an API job) writes. Three kinds (`run_kind`):

- Phase 3, `forge bake-quietstar`: pipeline_state.json (finished stages and their results),
  metrics.jsonl (one line per logged step), the config (forge_report.json at the end,
  pipeline_config.json from API jobs), step1/ and step2/ checkpoints;
- Phase 2, `forge evomerge`: evomerge_state.json (finished stages), search_state.json
  (rewritten after every evaluation while the search runs: the finished generations'
  history and the fitness cache), evomerge_report.json and fitness.png at the end;
- Phase 4, `forge bitnet`: bitnet_state.json, bitnet_report.json at the end;
- a chain, `forge run` (or `make demo`): run_state.json (finished phases and the model each
  made), one folder per phase (each a run of its own kind), forge_report.json and
  forge_report.html at the end.

Every reader tolerates a run that is still being written: missing or half-written files
read as empty.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent_forge.tracking import METRICS_FILE, read_metrics

STATE_FILE = "pipeline_state.json"
REPORT_FILE = "forge_report.json"
CONFIG_FILE = "pipeline_config.json"
# agent_forge.evomerge.phase / agent_forge.bitnet.phase file names (not imported: see STAGE_ORDER)
EVOMERGE_STATE = "evomerge_state.json"
EVOMERGE_REPORT = "evomerge_report.json"
SEARCH_STATE = "search_state.json"
FITNESS_PLOT = "fitness.png"
BITNET_STATE = "bitnet_state.json"
BITNET_REPORT = "bitnet_report.json"
COGNATE_STATE = "cognate_state.json"
COGNATE_REPORT = "cognate_report.json"
CHAIN_STATE = "run_state.json"  # agent_forge.chain.STATE_FILE; its report is forge_report.json too
CHAIN_HTML = "forge_report.html"
RUN_MARKERS = (STATE_FILE, METRICS_FILE, EVOMERGE_STATE, SEARCH_STATE, BITNET_STATE, COGNATE_STATE, CHAIN_STATE)
REPORT_FILES = (REPORT_FILE, EVOMERGE_REPORT, BITNET_REPORT, COGNATE_REPORT)
# agent_forge.quietstar.pipeline.STAGES, by name (kept here so reading a run never imports torch;
# tests check the two agree)
STAGE_ORDER = ("validate_input", "vocab", "data", "step1", "step2", "trace_baking", "anti_theater", "ab_test",
               "fresh_split", "general", "save", "register", "handoff")
# agent_forge.evomerge.phase.STAGES and agent_forge.bitnet.phase.STAGES, by name (tests check them too)
EVOMERGE_STAGE_ORDER = ("parents", "baseline", "search", "test", "save", "plot", "register", "handoff")
BITNET_STAGE_ORDER = ("validate_input", "data", "before", "store_cost", "qat", "after", "save", "speed", "agreement",
                      "register", "handoff")
# agent_forge.cognate.phase.stages() of the quick preset (its one control); a run's other
# stages (the independent-trunk control, other specialisations) join the list as they appear
COGNATE_STAGE_ORDER = ("data", "foundation", "specialise_reasoning", "specialise_memory", "specialise_speed",
                       "control_transformer", "evaluate", "register")
CHAIN_PHASES = ("cognate", "evomerge", "quietstar", "bitnet")  # agent_forge.chain.PHASES
KINDS = {"quietstar": (STATE_FILE, REPORT_FILE, STAGE_ORDER),
         "evomerge": (EVOMERGE_STATE, EVOMERGE_REPORT, EVOMERGE_STAGE_ORDER),
         "bitnet": (BITNET_STATE, BITNET_REPORT, BITNET_STAGE_ORDER),
         "cognate": (COGNATE_STATE, COGNATE_REPORT, COGNATE_STAGE_ORDER),
         "chain": (CHAIN_STATE, REPORT_FILE, CHAIN_PHASES)}
KIND_LABELS = {"quietstar": "Phase 3 Quiet-STaR", "evomerge": "Phase 2 EvoMerge", "bitnet": "Phase 4 BitNet",
               "cognate": "Phase 1 Cognate", "chain": "forge run (phases in order)"}
SKIP_DIRS = {"model", "checkpoints", "data", "wandb", "step1", "step2", ".git"}
GEN0_SIZE = 8  # generation 0 is always the 2^3 technique combinations (evomerge.genome.first_generation)
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


def run_kind(run_dir: str | Path) -> str:
    """quietstar | evomerge | bitnet | cognate | chain, from which files the run has written.

    An EvoMerge run whose first stage is still training its parents has only metrics.jsonl
    and parents/ (a Quiet-STaR run never has that folder), so parents/ counts too."""
    run_dir = Path(run_dir)
    if (run_dir / CHAIN_STATE).exists():
        return "chain"
    if any((run_dir / f).exists() for f in (EVOMERGE_STATE, EVOMERGE_REPORT, SEARCH_STATE)):
        return "evomerge"
    if any((run_dir / f).exists() for f in (BITNET_STATE, BITNET_REPORT)):
        return "bitnet"
    if any((run_dir / f).exists() for f in (COGNATE_STATE, COGNATE_REPORT)):
        return "cognate"
    if (run_dir / "parents").is_dir() and not (run_dir / STATE_FILE).exists():
        return "evomerge"
    return "quietstar"


def find_runs(runs_dir: str | Path, depth: int = 2) -> list[Path]:
    """Run directories at most `depth` levels under runs_dir (itself included), newest first."""
    root = Path(runs_dir)
    found, frontier = [], [root]
    for _ in range(depth + 1):
        nxt = []
        for d in frontier:
            if not d.is_dir():
                continue
            skip = SKIP_DIRS
            if is_run(d):
                found.append(d)
                if run_kind(d) == "evomerge":
                    skip = SKIP_DIRS | {"parents"}  # the specialists' own Step 1 runs: part of this one
            nxt += [c for c in sorted(d.iterdir()) if c.is_dir() and c.name not in skip
                    and not c.name.startswith(".")]
        frontier = nxt
    return sorted(found, key=last_modified, reverse=True)


def last_modified(run_dir: Path) -> float:
    times = [(run_dir / m).stat().st_mtime for m in (*RUN_MARKERS, *REPORT_FILES) if (run_dir / m).exists()]
    return max(times, default=0.0)


def load_stages(run_dir: str | Path) -> dict:
    """{stage: result} of the finished stages (from the run kind's state file, else its report)."""
    run_dir = Path(run_dir)
    state_file, report_file, _ = KINDS[run_kind(run_dir)]
    stages = _read_json(run_dir / state_file).get("stages")
    if not isinstance(stages, dict):
        stages = _read_json(run_dir / report_file).get("stages")
    return stages if isinstance(stages, dict) else {}


def load_report(run_dir: str | Path) -> dict:
    """The final report of the run's kind; {} until the run has finished."""
    run_dir = Path(run_dir)
    return _read_json(run_dir / KINDS[run_kind(run_dir)][1])


def load_config(run_dir: str | Path) -> dict:
    """The run's config as a dict: from the final report, else (Phase 3) the API job's copy."""
    run_dir = Path(run_dir)
    config = load_report(run_dir).get("config")
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
    if (run_dir / KINDS[run_kind(run_dir)][1]).exists():
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


# ---------------------------------------------------------------------------------------
# Phase 2: EvoMerge


def stage_progress(run_dir: str | Path, stages: dict | None = None, kind: str | None = None) -> dict:
    """Stages done, in the order they ran, and all of the run's stages: those done, then
    (until the run finishes) the phase's stages not yet run, in the phase's order. Optional
    stages (Cognate's controls) and stages a newer version added count only once they ran.
    `kind` when known (a run that has not started yet has no files to tell it by)."""
    run_dir = Path(run_dir)
    kind = kind or run_kind(run_dir)
    stages = load_stages(run_dir) if stages is None else stages
    order, finished = KINDS[kind][2], (run_dir / KINDS[kind][1]).exists()
    done = list(stages)
    total = done + ([] if finished else [s for s in order if s not in stages])
    return {"kind": kind, "stages_done": done, "stages_total": total, "finished": finished}


def _rows(value) -> list[dict]:
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


def evomerge_history(run_dir: str | Path) -> list[dict]:
    """One row per finished generation (generation, best, mean, worst, diversity,
    n_evaluated, cache_hits, seconds, ...): the search stage's result once it has finished,
    before that the live search_state.json (rewritten after every evaluation)."""
    run_dir = Path(run_dir)
    done = _rows((load_stages(run_dir).get("search") or {}).get("history"))
    return done or _rows(_read_json(run_dir / SEARCH_STATE).get("history"))


def evomerge_progress(run_dir: str | Path) -> dict:
    """Stages done / total, and the search's generations: finished of planned, and how far
    the generation being evaluated has got (None once the search stage is done):
    `evaluated` counts the recipes first evaluated in it (the cache records each recipe
    once, under the generation that first measured it; elites and repeats are cache hits),
    `population` is the generation's size (8 for generation 0)."""
    run_dir = Path(run_dir)
    stages = load_stages(run_dir)
    out = stage_progress(run_dir, stages)
    search_done = stages.get("search") or {}
    live = {} if search_done else _read_json(run_dir / SEARCH_STATE)
    history = evomerge_history(run_dir)
    cfg = live.get("config") or search_done.get("config") or (load_config(run_dir).get("search") or {})
    total = cfg.get("generations") if isinstance(cfg, dict) else None
    current = None
    if live and not search_done:
        gen = max([r["generation"] for r in history if isinstance(r.get("generation"), int)], default=-1) + 1
        cache = live.get("cache") if isinstance(live.get("cache"), dict) else {}
        evaluated = sum(1 for e in cache.values() if isinstance(e, dict) and e.get("generation") == gen)
        size = GEN0_SIZE if gen == 0 else (cfg.get("population") if isinstance(cfg, dict) else None)
        if total is None or gen < total:
            current = {"generation": gen, "evaluated": evaluated, "population": size}
    return {**out, "generations_done": len(history), "generations": total, "current": current}


def history_frame(history: list[dict], keys: tuple[str, ...] = ("best", "mean", "worst")):
    """DataFrame indexed by generation with the given columns (those present); None if empty."""
    import pandas as pd

    rows = [r for r in history if isinstance(r.get("generation"), int)]
    cols = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not rows or not cols:
        return None
    frame = pd.DataFrame([{"generation": r["generation"], **{k: r.get(k) for k in cols}} for r in rows])
    return frame.groupby("generation").last().astype(float)


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def evomerge_parents(stages: dict) -> list[dict]:
    """Each parent with its validation fitness and 95% interval (None before the baseline
    stage has measured it); `best` marks the bar the merge has to clear."""
    baseline = stages.get("baseline") or {}
    measured = _rows(baseline.get("parents"))
    paths = [r.get("path") for r in measured] or list((stages.get("parents") or {}).get("paths") or [])
    by_path = {m.get("path"): m for m in (stages.get("parents") or {}).get("made") or [] if isinstance(m, dict)}
    out = []
    for i, path in enumerate(paths):
        r = measured[i] if i < len(measured) else {}
        families = (by_path.get(path) or {}).get("families")
        out.append({"parent": i + 1, "path": path, "families": ", ".join(families) if families else None,
                    "value": _num(r.get("value")), "low": _num(r.get("low")), "high": _num(r.get("high")),
                    "n": r.get("n"), "kind": (r.get("details") or {}).get("kind"),
                    "best": bool(measured) and i == baseline.get("best_index")})
    return out


def evomerge_headline(stages: dict, history: list[dict]) -> dict:
    """The numbers a person looks for first; None where the stage has not run."""
    baseline, test, hand = stages.get("baseline") or {}, stages.get("test") or {}, stages.get("handoff")
    gain = test.get("gain") or {}
    best = history[-1] if history else {}
    return {"best_parent_val": _num(baseline.get("best_value")), "best_val": _num(best.get("best")),
            "best_val_ci": [best.get("best_low"), best.get("best_high")] if best else None,
            "best_parent_test": _num((test.get("best_parent") or {}).get("value")),
            "champion_test": _num((test.get("champion") or {}).get("value")),
            "gain_points": _num(gain.get("points")), "gain_ci_points": gain.get("ci95_points"),
            "relative_gain": _num(gain.get("relative_gain")), "relative_gain_ci": gain.get("relative_gain_ci95"),
            "target_relative": _num(gain.get("target_relative")),
            "target_met": None if not gain else bool(gain.get("target_met")),
            "handoff_ok": None if hand is None else bool(hand.get("ok"))}


def evomerge_test_rows(stages: dict) -> list[tuple[str, str]]:
    """The test split's rows of `forge evomerge`'s summary (best parent, champion, paired
    gain with its interval, target met / MISSED, the control when trained); [] before."""
    from agent_forge.evomerge.commands import summary_rows

    test = stages.get("test")
    if not test:
        return []
    report = {"stages": {"test": test}, "config": {"fitness": {"loglik_weight": 0.0}}, "total_seconds": 0}
    try:
        return [r for r in summary_rows(report) if r[0] != "time"]
    except (KeyError, TypeError, IndexError, ValueError):  # a result from another version: show what we can
        return []


def _summary(run_dir: Path, rows_fn) -> list[tuple[str, str]]:
    report = load_report(run_dir)
    if not report:
        return []
    try:
        return rows_fn(report)
    except (KeyError, TypeError, IndexError, ValueError):
        return []


def evomerge_summary(run_dir: str | Path) -> list[tuple[str, str]]:
    """The whole summary `forge evomerge` printed, from evomerge_report.json; [] before it exists."""
    from agent_forge.evomerge.commands import summary_rows

    return _summary(Path(run_dir), summary_rows)


def bitnet_summary(run_dir: str | Path) -> list[tuple[str, str]]:
    """The summary `forge bitnet` printed, from bitnet_report.json; [] before it exists."""
    from agent_forge.bitnet.commands import summary_rows

    return _summary(Path(run_dir), summary_rows)


def cognate_summary(run_dir: str | Path) -> list[tuple[str, str]]:
    """The summary `forge cognate` printed, from cognate_report.json; [] before it exists."""
    from agent_forge.cognate.commands import summary_rows

    return _summary(Path(run_dir), summary_rows)


def stage_curves(records: list[dict], key: str, prefix: str):
    """DataFrame indexed by step, one column per training stage whose name starts with
    `prefix` (the prefix dropped): e.g. each Cognate model's loss; None if nothing logged."""
    import pandas as pd

    names = sorted({r["stage"] for r in records if str(r.get("stage", "")).startswith(prefix)
                    and isinstance(r.get(key), (int, float))})
    frames = {n[len(prefix):]: curve(records, (key,), n) for n in names}
    frames = {n: f[key] for n, f in frames.items() if f is not None}
    return pd.DataFrame(frames) if frames else None


def fitness_plot(run_dir: str | Path) -> Path | None:
    path = Path(run_dir) / FITNESS_PLOT
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------
# A chain (`forge run`): its phases, each a run of its own in a sub-folder


def chain_progress(run_dir: str | Path) -> dict:
    """The chain's phases (from its report, else the phase folders written so far), the
    finished ones (run_state.json) and the one running."""
    run_dir = Path(run_dir)
    done = list(load_stages(run_dir))
    started = [p for p in CHAIN_PHASES if (run_dir / p).is_dir()]
    report = load_report(run_dir)
    phases = report.get("phases") or started
    return {"phases": list(phases), "done": [p for p in phases if p in done],
            "running": [p for p in started if p not in done], "finished": bool(report)}


def chain_summary(run_dir: str | Path) -> list[tuple[str, str]]:
    """The table `forge run` printed (every phase's own rows), from forge_report.json; []
    before the chain has finished."""
    from agent_forge.chain import chain_rows

    return _summary(Path(run_dir), chain_rows)


def chain_last_model_id(run_dir: str | Path) -> int | None:
    """The registry id of the last model the chain made (its last finished phase registered it)."""
    reports = load_report(run_dir).get("reports") or {}
    for phase in reversed(list(reports)):
        model_id = ((reports[phase].get("stages") or {}).get("register") or {}).get("model_id")
        if isinstance(model_id, int):
            return model_id
    return None
