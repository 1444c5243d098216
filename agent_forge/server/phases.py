"""Job kinds that run a whole phase or the chain: `cognate` (Phase 1), `evomerge` (Phase 2),
`bitnet` (Phase 4) and `run` (`forge run`, the phases in order).

A job of these kinds runs the phase's own entry point (run_cognate, run_evomerge, run_bitnet,
run_chain) on one run directory, always with resume=True, so a run made through the API is
the same as one made by `forge cognate|evomerge|bitnet|run` and pausing (SIGTERM) then
resuming continues from the phase's state file and its last checkpoint. The config is built
the way the command builds it: the preset, then `overrides` (the phase config's own fields;
for `run` the chain YAML's fields and one section per phase), then the request's checked
paths.

The server calls `check_request` (everything a worker would need, refused with a clear
message before anything starts) and `progress` (stages done from the phase's own state
file, and the training stage's last logged step); the worker calls `run`. Nothing here
imports torch until a config is built.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from agent_forge.dashboard.data import stage_progress
from agent_forge.server.checks import OverrideRejected, confine_overrides, type_errors
from agent_forge.tracking import read_metrics

PHASE_KINDS = ("cognate", "evomerge", "bitnet", "run")
CHAIN_PHASES = ("cognate", "evomerge", "quietstar", "bitnet")  # agent_forge.chain.PHASES (checked in tests)
STATE_FILES = {"cognate": "cognate_state.json", "evomerge": "evomerge_state.json", "bitnet": "bitnet_state.json",
               "run": "run_state.json", "quietstar": "pipeline_state.json"}
REPORT_FILES = {"cognate": "cognate_report.json", "evomerge": "evomerge_report.json",
                "bitnet": "bitnet_report.json", "run": "forge_report.json"}
# Fields a request sets itself (model, out, preset, device) or the server does (registry).
RESERVED = {"cognate": ("out", "registry", "device", "preset"),
            "evomerge": ("base", "out", "registry", "device", "preset"),
            "bitnet": ("model", "out", "registry", "device", "preset"),
            "run": ("model", "out", "registry", "preset", "phases")}
# Fields of a `run` job's phase sections that the chain sets itself.
SECTION_RESERVED = {"cognate": ("out", "registry", "tracking", "preset"),
                    "evomerge": ("base", "models", "make_parents", "out", "registry", "tracking", "preset"),
                    "quietstar": ("model", "out", "registry", "tracking", "preset"),
                    "bitnet": ("model", "out", "registry", "tracking", "preset")}
BAD_CONFIG = (ValueError, TypeError, KeyError, AttributeError)  # what building a config from bad JSON raises
PAUSE_NOTES = {"cognate": "paused: resume continues at the unfinished stage (training from its last checkpoint)",
               "evomerge": "paused: resume continues at the unfinished stage (the search from its saved state)",
               "bitnet": "paused: resume continues at the unfinished stage (QAT from its last checkpoint)",
               "run": "paused: resume continues at the unfinished phase and stage"}


def _make_config(phase: str, preset: str):
    """The phase's config with its preset applied (the command's starting point)."""
    if phase == "cognate":
        from agent_forge.cognate.phase import make_config
    elif phase == "evomerge":
        from agent_forge.evomerge.phase import make_config
    elif phase == "bitnet":
        from agent_forge.bitnet.phase import make_config
    elif phase == "quietstar":
        from agent_forge.quietstar.pipeline import make_config
    else:
        raise ValueError(f"no phase config for {phase!r}")
    return make_config(preset)


def _apply(phase: str, preset: str, overrides: dict, fixed: dict, label: str = "overrides"):
    """Preset, then overrides (names and types checked), then the fixed fields; ValueError if bad."""
    from agent_forge.config import update_dataclass

    where = f"{phase} config"
    base = _make_config(phase, preset)
    errors = type_errors(base, overrides, label)
    try:
        cfg = update_dataclass(base, overrides, where)  # an unknown field first: the clearer message
    except BAD_CONFIG as e:
        if errors and not str(e).startswith("unknown"):
            raise ValueError("; ".join(errors[:5])) from None
        raise
    if errors:
        raise ValueError("; ".join(errors[:5]))
    return update_dataclass(cfg, {k: v for k, v in fixed.items() if v is not None}, where)


def build_config(spec: dict):
    """The config the worker runs, from a checked job spec; ValueError / TypeError if bad."""
    kind, preset = spec["kind"], spec.get("preset") or "quick"
    overrides = dict(spec.get("overrides") or {})
    fixed = {"out": spec["out"], "registry": spec.get("registry"), "device": spec.get("device")}
    if kind == "bitnet":
        return _apply("bitnet", preset, overrides, {**fixed, "model": spec["model"]})
    if kind == "cognate":
        return _apply("cognate", preset, overrides, fixed)
    if kind == "evomerge":
        return _apply("evomerge", preset, overrides, {**fixed, "base": spec.get("model")})
    if kind == "run":
        return _chain_config(spec, preset, overrides)
    raise ValueError(f"{kind!r} is not a phase job")


def _chain_config(spec: dict, preset: str, overrides: dict):
    """ChainConfig as `forge run --config` reads it: top-level fields and one section per phase."""
    from agent_forge.chain import ChainConfig
    from agent_forge.config import update_dataclass

    sections = {k: overrides.pop(k) for k in list(overrides) if k in CHAIN_PHASES}
    errors = type_errors(ChainConfig(), overrides, "overrides")
    cfg = update_dataclass(ChainConfig(), overrides, "run config")
    if errors:
        raise ValueError("; ".join(errors[:5]))
    fixed = {"model": spec.get("model") or "default", "out": spec["out"], "preset": preset,
             "registry": spec.get("registry")}
    cfg = update_dataclass(cfg, {k: v for k, v in fixed.items() if v is not None}, "run config")
    device = spec.get("device")
    if device:
        sections = {**sections, **{p: {"device": device, **(sections.get(p) or {})} for p in cfg.selected()}}
    return dataclasses.replace(cfg, phases=sections)


# ---------------------------------------------------------------------------------------
# The server's checks


def check_request(kind: str, spec: dict, model_roots: list[Path], data_roots: list[Path]) -> dict:
    """`spec` (model and out already confined) with its overrides checked and their paths made
    absolute; raises OverrideRejected (a 400) with one clear message."""
    overrides = spec.get("overrides") or {}
    bad = sorted(set(overrides) & set(RESERVED[kind]))
    if kind == "run" and "phases" in bad:
        raise OverrideRejected("a run job takes one section per phase (overrides.evomerge, overrides.quietstar, "
                               "overrides.bitnet), as the chain YAML does, not overrides.phases")
    if bad:
        raise OverrideRejected(f"overrides may not set {', '.join(bad)}: they are request fields "
                               "(model, out, preset, device) or the server's (registry)")
    if kind == "run":
        overrides = _check_sections(overrides, spec.get("preset") or "quick", model_roots, data_roots)
    else:
        overrides = confine_overrides(kind, overrides, model_roots, data_roots)
    spec = {**spec, "overrides": overrides}
    try:
        cfg = build_config(spec)
    except BAD_CONFIG as e:
        raise OverrideRejected(str(e)) from None
    if kind == "run":
        try:
            cfg.selected()
        except ValueError as e:
            raise OverrideRejected(f"overrides.start / overrides.stop: {e}") from None
    if kind == "evomerge":
        _check_parents(spec.get("model"), overrides)
    if kind == "bitnet" or (kind == "run" and cfg.start == "bitnet"):
        _check_bitnet_input(spec["model"])
    check_out(kind, Path(spec["out"]))
    return spec


def _check_parents(model: str | None, overrides: dict) -> None:
    models, make = overrides.get("models"), overrides.get("make_parents", False)
    if make is True:
        if models:
            raise OverrideRejected("give overrides.models or overrides.make_parents, not both")
        return
    if not models or len(models) < 2:
        raise OverrideRejected("an evomerge job needs its parents: overrides.models (two or more model "
                               "directories) or overrides.make_parents: true (trained from model)")
    if model == "default":
        raise OverrideRejected("with overrides.models, model is the parents' common ancestor directory "
                               "(or leave it out); 'default' is only for make_parents")


def _check_bitnet_input(model: str) -> None:
    """The refusal BitNet's first stage would make after loading the model, made here from its
    forge_meta.json: another phase's output is not BitNet's input."""
    try:
        phase = json.loads((Path(model) / "forge_meta.json").read_text()).get("phase")
    except (OSError, ValueError, AttributeError):
        return
    if phase not in (None, 3):
        raise OverrideRejected(f"model {model!r} is a phase {phase} output; a bitnet job takes a Phase 3 model "
                               "(or a plain HF causal LM with no forge_meta.json)")


def _check_sections(overrides: dict, preset: str, model_roots: list[Path], data_roots: list[Path]) -> dict:
    """A `run` job's per-phase sections: each a mapping of that phase's fields, paths confined."""
    out = dict(overrides)
    for phase in CHAIN_PHASES:
        if phase not in out:
            continue
        section = out[phase]
        if not isinstance(section, dict):
            raise OverrideRejected(f"overrides.{phase} must be an object of {phase} config fields")
        bad = sorted(set(section) & set(SECTION_RESERVED[phase]))
        if bad:
            raise OverrideRejected(f"overrides.{phase} may not set {', '.join(bad)}: the chain sets them")
        try:
            section = confine_overrides(phase, section, model_roots, data_roots)
            _apply(phase, preset, section, {}, f"overrides.{phase}")
        except BAD_CONFIG as e:
            raise OverrideRejected(f"overrides.{phase}: {e}") from None
        out[phase] = section
    return out


def check_out(kind: str, out: Path) -> None:
    """Refuse (409) a run directory that holds another kind's run, or, for a new evomerge,
    bitnet or run job, any run (resume the job that made it instead). Phase 3 jobs share
    theirs: each continues the pipeline_state.json the last one left."""
    from agent_forge.server.jobs import JobError

    for other, name in STATE_FILES.items():
        if (out / name).exists() and (other != kind or kind in PHASE_KINDS):
            what = "run" if other == kind else f"{other} run"
            raise JobError(409, f"out {str(out)!r} already holds a {what}; resume its job, or choose another out")


# ---------------------------------------------------------------------------------------
# Progress, read from the run directory


def _stages_of(path: Path) -> dict:
    try:
        stages = json.loads(path.read_text()).get("stages")
    except (OSError, ValueError, AttributeError):
        return {}
    return stages if isinstance(stages, dict) else {}


def _phase_stages(run_dir: Path, phase: str) -> dict:
    """{phase, stages_done, stages_total, stage}: one phase's stages from its own state file
    (read as the dashboard reads them: Cognate's optional stages join its list)."""
    prog = stage_progress(run_dir, _stages_of(run_dir / STATE_FILES[phase]), kind=phase)
    done = prog["stages_done"]
    todo = [s for s in prog["stages_total"] if s not in done]
    return {"phase": phase, "stages_done": done, "stages_total": prog["stages_total"],
            "stage": todo[0] if todo else None}


def training_step(run_dir: Path) -> dict | None:
    """The newest training step a phase logged: {stage, step, steps} (steps: the stage's total,
    as the training loop logs it); None before any step."""
    rows = [r for r in read_metrics(run_dir) if isinstance(r.get("step"), int) and "steps_total" in r]
    if not rows:
        return None
    last = rows[-1]
    return {"stage": last.get("stage"), "step": last["step"], "steps": last["steps_total"]}


def progress(kind: str, out: str | Path, overrides: dict) -> dict:
    """Stages done / total for a phase job; for `run`, the phases, and inside the unfinished
    phase its own stages (`phase`); `training`: the newest step of the phase being trained."""
    out = Path(out)
    finished = (out / REPORT_FILES[kind]).exists()
    if kind != "run":
        own = _phase_stages(out, kind)
        return {"stages_done": own["stages_done"], "stages_total": own["stages_total"], "stage": own["stage"],
                "finished": finished, "phase": None, "training": None if finished else training_step(out)}
    phases = _chain_phases(overrides)
    done = _stages_of(out / STATE_FILES["run"])
    todo = [p for p in phases if p not in done]
    current = _phase_stages(out / todo[0], todo[0]) if todo else None
    return {"stages_done": [p for p in phases if p in done], "stages_total": phases,
            "stage": todo[0] if todo else None, "finished": finished, "phase": current,
            "training": training_step(out / todo[0]) if todo else None}


def _chain_phases(overrides: dict) -> list[str]:
    start, stop = overrides.get("start", "quietstar"), overrides.get("stop", "bitnet")
    try:
        return list(CHAIN_PHASES[CHAIN_PHASES.index(start):CHAIN_PHASES.index(stop) + 1])
    except ValueError:
        return []


# ---------------------------------------------------------------------------------------
# The worker's side


def run(spec: dict, on_stage: Callable, progress_cb: Callable) -> dict:
    """Run (resume) the job's phase or chain in its run directory; returns the phase's report."""
    kind, cfg = spec["kind"], build_config(spec)
    if kind == "bitnet":
        from agent_forge.bitnet.phase import run_bitnet

        return run_bitnet(cfg, resume=True, on_stage=on_stage, progress=progress_cb)
    if kind == "cognate":
        from agent_forge.cognate.phase import run_cognate

        return run_cognate(cfg, resume=True, on_stage=on_stage, progress=progress_cb)
    if kind == "evomerge":
        from agent_forge.evomerge.phase import run_evomerge

        return run_evomerge(cfg, resume=True, on_stage=on_stage, progress=progress_cb)
    from agent_forge.chain import run_chain

    return run_chain(cfg, resume=True, on_phase=lambda n, e, r: on_stage(f"phase {n}", e, r), on_stage=on_stage,
                     progress=progress_cb)


def phase_errors() -> tuple[type[Exception], ...]:
    """The errors a phase raises for a problem the user must fix (printed as one line)."""
    from agent_forge.bitnet.phase import BitNetPhaseError
    from agent_forge.chain import ChainError
    from agent_forge.cognate.phase import CognatePhaseError
    from agent_forge.evomerge.phase import EvoMergePhaseError
    from agent_forge.quietstar.pipeline import PipelineError

    return BitNetPhaseError, ChainError, CognatePhaseError, EvoMergePhaseError, PipelineError
