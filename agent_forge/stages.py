"""Resumable stages: how every phase command (`forge bake-quietstar`, `forge bitnet`) runs.

A phase is a list of named stages. Each stage's result is written to `out/<state file>`
the moment it finishes, so `--resume` after a kill skips what is done and continues from
the first unfinished stage (and a training stage from its own last checkpoint).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

Stage = tuple[str, Callable[[Any], dict]]
# Settings a resume may change: where the run computes, how it is tracked and registered, and
# `force`, which only the input gate reads. Any other change would leave a report whose
# finished stages were computed under one setting and the rest under another.
RESUME_FREE = ("device", "tracking", "registry", "force")


class StageState:
    """Completed stages and their results, rewritten atomically after each stage."""

    def __init__(self, out: Path, resume: bool, file: str = "pipeline_state.json"):
        self.path = Path(out) / file
        self.data = json.loads(self.path.read_text()) if resume and self.path.exists() else {"stages": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def result(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def adopt_config(self, config: dict) -> list[str]:
        """Keep the settings the run began with in the state; on a resume, what differs from
        them (`config_changes`). A state from before settings were kept adopts these."""
        config = json.loads(json.dumps(config, default=str))
        saved = self.data.get("config")
        if saved is None:
            self.data["config"] = config
            return []
        return config_changes(saved, config)

    def begin(self, stage: str) -> bool:
        """Mark `stage` as running; True when an earlier run had started it (killed midway),
        so this run resumes it and its seconds count from the resume only. Written only once a
        stage has been recorded: a run refused by its first stage leaves nothing behind."""
        resumed = self.data.get("running") == stage
        self.data["running"] = stage
        if self.path.exists():
            self._write()
        return resumed

    def record(self, stage: str, result: dict) -> None:
        self.data["stages"][stage] = result
        self.data.pop("running", None)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def config_changes(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """'field: old -> new' for each setting that differs (nested fields dotted), except the
    top-level ones in RESUME_FREE."""
    changes = []
    for key in sorted(set(saved) | set(new)):
        if not prefix and key in RESUME_FREE:
            continue
        old, now = saved.get(key), new.get(key)
        if isinstance(old, dict) and isinstance(now, dict):
            changes += config_changes(old, now, f"{prefix}{key}.")
        elif old != now:
            changes.append(f"{prefix}{key}: {old!r} -> {now!r}")
    return changes


def resume_refusal(out: Path, changes: list[str]) -> str:
    """The one-line error for a resume whose settings differ from the run's."""
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    return (f"{out} was started with other settings ({shown}); --resume continues a run only with the "
            "settings it began with: pass the same --preset, --config and options, or choose another --out")


@dataclass
class PhaseContext:
    """What every stage of a phase reads: the phase's settings, its folder, the resumable
    state, the tracker, the progress callback, whether this run resumes, and a per-process
    cache of what stages load once (models, tokenizer, evaluation items)."""

    cfg: Any
    out: Path
    state: StageState
    tracker: object
    progress: Callable | None = None
    resume: bool = False
    cache: dict = field(default_factory=dict)


def run_stages(stages: list[Stage], ctx, state: StageState, on_stage: Callable | None = None,
               run_one: Callable | None = None, after: Callable[[str], None] | None = None) -> None:
    """Run each stage not yet done, in order, recording its result and its seconds.
    `run_one(name, fn, ctx)` wraps a stage (turning errors into the phase's own);
    `after(name)` runs once a stage is recorded (e.g. deleting its resume checkpoints)."""
    for name, fn in stages:
        if state.done(name):
            notify(on_stage, name, "skipped (done)", state.result(name))
            continue
        notify(on_stage, name, "start", None)
        t0, resumed = time.time(), state.begin(name)
        result = run_one(name, fn, ctx) if run_one is not None else fn(ctx)
        result["stage_seconds"] = round(time.time() - t0, 1)
        if resumed:
            result["stage_resumed"] = True
        state.record(name, result)
        if after is not None:
            after(name)
        notify(on_stage, name, "done", result)


def notify(cb, name: str, event: str, result) -> None:
    if cb is not None:
        cb(name, event, result)


def timings(state: StageState) -> tuple[dict, float]:
    """(seconds per stage, total seconds) of the recorded stages."""
    stages = state.data["stages"]
    per = {k: v.get("stage_seconds") for k, v in stages.items()}
    return per, round(sum(v or 0 for v in per.values()), 1)


def resumed_note(stages: dict) -> str:
    """What a total time leaves out: the part of a resumed stage run before its kill."""
    names = [k for k, v in stages.items() if isinstance(v, dict) and v.get("stage_resumed")]
    return f" (resumed: {', '.join(names)} counted from the resume)" if names else ""


def stage_runner(phase_error: type[Exception], user_errors: tuple[type[Exception], ...],
                 lr_field: str | None = None, name_stage: bool = False) -> Callable:
    """A `run_one(name, fn, ctx)` for run_phase: the errors a user can act on (`user_errors`)
    become one `phase_error` (prefixed "stage NAME: " with name_stage); a stopped training
    (FloatingPointError from the NaN / explosion guard) says how to resume when the phase
    names its learning-rate field."""
    def run_one(name: str, fn: Callable, ctx) -> dict:
        try:
            return fn(ctx)
        except user_errors as e:
            raise phase_error(f"stage {name}: {e}" if name_stage else str(e)) from e
        except FloatingPointError as e:
            if lr_field is None:
                raise
            raise phase_error(f"stage {name} stopped: {e}. Rerun with --resume after lowering {lr_field} in "
                              "--config; training restarts from the last checkpoint.") from e
    return run_one


def run_phase(stages: list[Stage], out: Path, state_file: str, resume: bool, make_ctx: Callable,
              error: type[Exception], tracking: str, config: dict, on_stage: Callable | None = None,
              run_one: Callable | None = None) -> StageState:
    """A phase command's run: refuse to overwrite a run without `resume`, open the state and
    the tracker, run the stages. A run refused before any stage was recorded leaves no
    directory behind. `make_ctx(state, tracker)` builds the phase's context."""
    import shutil

    from agent_forge.tracking import Tracker

    out = Path(out)
    if (out / state_file).exists() and not resume:
        raise error(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    state = StageState(out, resume, state_file)
    changes = state.adopt_config(config)
    if changes:
        raise error(resume_refusal(out, changes))
    tracker = Tracker(out, mode=tracking, config=config)
    try:
        run_stages(stages, make_ctx(state, tracker), state, on_stage, run_one=run_one)
    except error:
        tracker.finish()
        if created and not state.path.exists():  # refused at the door
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        tracker.finish()
    return state
