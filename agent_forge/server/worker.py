"""A job's worker process: runs one slice of the Phase 3 pipeline, or a whole phase or the
chain (cognate, evomerge, bitnet, run: see phases.py), on one run directory.

The server starts `python -m agent_forge.server.worker SPEC_JSON` in a new process group
and never trains itself. Each kind of job is a range of pipeline stages on the same run
directory, so a run made through the API looks exactly like one made by
`forge bake-quietstar` (pipeline_state.json, metrics.jsonl, step1/checkpoints ...) and the
dashboard reads both the same way:

    step1         validate_input, vocab, data, step1
    step2         step2                      (needs step1 done)
    anti_theater  anti_theater               (needs step1 done; a rerun replaces the old result)
    complete      every stage not yet done   (the same as `forge bake-quietstar --resume`)

    evomerge      `forge evomerge --resume` (every stage not yet done)
    bitnet        `forge bitnet --resume`
    run           `forge run --resume` (every phase not yet done, inside it every stage)

The worker always resumes: finished stages are skipped and a training stage continues from
its last checkpoint. Pausing is SIGTERM to the process group; work since the last
checkpoint is redone on resume.

Exit codes: 0 done, 1 error (a phase's own error as one line "worker: error: ...", anything
else with its traceback), 3 the stage is not available in this version (Step 2 before
`forge rl` lands in the pipeline).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

KIND_STAGES: dict[str, tuple[str, ...]] = {
    "step1": ("validate_input", "vocab", "data", "step1"),
    "step2": ("step2",),
    "anti_theater": ("anti_theater",),
}
RERUN = {"anti_theater": ("anti_theater",)}
EXIT_UNAVAILABLE = 3
FIXED_FIELDS = ("model", "out", "registry", "device")


class StageUnavailable(RuntimeError):
    """The pipeline's stage is a placeholder in this version."""


def build_config(spec: dict):
    """PipelineConfig from a job spec: preset, then overrides, then the server-checked paths."""
    from agent_forge.config import update_dataclass
    from agent_forge.quietstar.pipeline import make_config

    cfg = make_config(spec.get("preset") or "quick")
    cfg = update_dataclass(cfg, spec.get("overrides") or {}, "pipeline config")
    fixed = {k: spec.get(k) for k in FIXED_FIELDS if spec.get(k) is not None}
    return update_dataclass(cfg, fixed, "pipeline config")


def _printer(every: int = 20):
    def show(step: int, total: int, row: dict) -> None:
        if step == total or step % max(1, total // every) == 0:
            loss = row.get("loss")
            print(f"step {step}/{total}" + (f" loss {loss:.4f}" if isinstance(loss, float) else ""), flush=True)

    return show


def run_stages(cfg, names: tuple[str, ...], rerun: tuple[str, ...] = ()) -> dict:
    """Run the named stages (pipeline order) that are not yet done in cfg.out, recorded as
    `forge bake-quietstar` records them (seconds, and a stage killed midway marked resumed)."""
    from agent_forge.quietstar.pipeline import STAGES, Context, PipelineError, PipelineState, run_stage
    from agent_forge.stages import resume_refusal, run_stages as run_recorded
    from agent_forge.tracking import Tracker

    def run_available(name: str, fn, ctx) -> dict:
        result = run_stage(name, fn, ctx)
        if result.get("status") == "not_implemented":
            raise StageUnavailable(result.get("note") or f"stage {name} is not available")
        return result

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = PipelineState(out, resume=True)
    changes = state.adopt_config(cfg.to_dict())
    if changes:
        raise PipelineError(resume_refusal(out, changes))
    for name in rerun:
        state.data["stages"].pop(name, None)
    tracker = Tracker(out, mode=cfg.tracking, config=cfg.to_dict())
    ctx = Context(cfg, out, state, tracker, _printer(), True)
    try:
        run_recorded([(n, fn) for n, fn in STAGES if n in names], ctx, state, _on_stage, run_one=run_available)
    finally:
        tracker.finish()
    return state.data


def _on_stage(name: str, event: str, result) -> None:
    done = event == "done" and isinstance(result, dict) and "stage_seconds" in result
    print(f"stage {name} done in {result['stage_seconds']}s" if done else f"stage {name} {event}", flush=True)


def run_job(spec: dict) -> None:
    from agent_forge.server.phases import PHASE_KINDS

    if spec["kind"] in PHASE_KINDS:
        from agent_forge.server.phases import run

        run(spec, _on_stage, _printer())
        return
    from agent_forge.quietstar.pipeline import CONFIG_FILE  # the full config, for the dashboard's progress bars

    cfg = build_config(spec)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    kind = spec["kind"]
    if kind == "complete":
        from agent_forge.quietstar.pipeline import run_pipeline

        run_pipeline(cfg, resume=True, on_stage=_on_stage, progress=_printer())
    else:
        run_stages(cfg, KIND_STAGES[kind], RERUN.get(kind, ()))


def _on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds `finally` blocks: the tracker closes cleanly


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m agent_forge.server.worker SPEC_JSON", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    spec = json.loads(argv[0])
    print(f"worker: job {spec.get('job_id')} kind {spec['kind']} out {spec['out']}", flush=True)
    from agent_forge.server.phases import phase_errors

    errors = phase_errors()
    try:
        run_job(spec)
    except StageUnavailable as e:
        print(f"worker: not available: {e}", flush=True)
        return EXIT_UNAVAILABLE
    except errors as e:
        print(f"worker: error: {e}", flush=True)
        return 1
    print("worker: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
