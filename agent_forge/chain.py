"""`forge run`: the phases as one system, each phase's output the next one's input.

    [cognate] -> evomerge -> quietstar -> bitnet

Each phase runs in `out/<phase>/` through its own command's code (so its own handoff check
gates the input, and its own state file lets it resume mid-phase); `out/run_state.json`
records each finished phase and the model it made, so `--resume` after a kill continues
at the unfinished phase (and inside it, at its unfinished stage). `out/forge_report.json`
holds every phase's report; the printed table takes each phase's own summary rows, and
`out/forge_report.html` shows that table with the plots (html_report).

Cognate makes three models from scratch that share a trunk; EvoMerge then merges those three
(task vectors against the trunk). EvoMerge, when the chain starts there, trains its parents
from the input model (`--make-parents`): one model ships offline, and a merge needs several.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from agent_forge.config import load_yaml
from agent_forge.stages import StageState, run_stages, timings

PHASES = ("cognate", "evomerge", "quietstar", "bitnet")
STATE_FILE = "run_state.json"
REPORT_FILE = "forge_report.json"


class ChainError(RuntimeError):
    """A phase stopped the chain (a failed handoff, a bad input); the message says which and why."""


@dataclass
class ChainConfig:
    start: str = "quietstar"
    """First phase: cognate, evomerge, quietstar or bitnet."""
    stop: str = "bitnet"
    """Last phase."""
    model: str = "default"
    """The first phase's input (EvoMerge: the model its parents are trained from; Cognate
    takes none, it trains from scratch)."""
    out: str = "runs/chain"
    preset: str = "quick"
    """Every phase's preset (smoke, quick, standard)."""
    force: bool = False
    """Go on past a failed handoff (recorded in the phase's report, and here)."""
    phases: dict = field(default_factory=dict)
    """Per-phase overrides, as in each command's --config: {"evomerge": {...}, "quietstar": {...}}."""
    tracking: str = "offline"
    registry: str | None = None

    def selected(self) -> list[str]:
        for name in (self.start, self.stop):
            if name not in PHASES:
                raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        i, j = PHASES.index(self.start), PHASES.index(self.stop)
        if i > j:
            raise ValueError(f"--from {self.start} comes after --to {self.stop}")
        return list(PHASES[i:j + 1])


def load_chain_config(yaml_path: str | Path | None, **overrides) -> ChainConfig:
    """A YAML with top-level chain fields and one section per phase (evomerge:, quietstar:, bitnet:)."""
    data = load_yaml(yaml_path) if yaml_path else {}
    phases = {k: data.pop(k) for k in list(data) if k in PHASES}
    cfg = ChainConfig(**data, phases=phases)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


@dataclass
class Context:
    cfg: ChainConfig
    out: Path
    state: StageState
    on_stage: Callable | None = None
    progress: Callable | None = None

    def input_for(self, phase: str) -> str:
        """The model the previous finished phase made, else the chain's input."""
        done = [p for p in PHASES[:PHASES.index(phase)] if self.state.done(p)]
        return self.state.result(done[-1])["model"] if done else self.cfg.model

    def phase_dir(self, phase: str) -> Path:
        return self.out / phase


def _phase_yaml(ctx: Context, phase: str) -> Path | None:
    """The chain YAML's section for a phase, written where that phase's command reads it."""
    section = ctx.cfg.phases.get(phase)
    if not section:
        return None
    import yaml

    path = ctx.out / f"{phase}_config.yaml"
    path.write_text(yaml.safe_dump(section))
    return path


def _resuming(path: Path, state_file: str) -> bool:
    return (path / state_file).exists()


def phase_cognate(ctx: Context) -> dict:
    from agent_forge.cognate.phase import STATE_FILE as COG_STATE, CognatePhaseError, make_config, run_cognate

    out = ctx.phase_dir("cognate")
    cfg = make_config(ctx.cfg.preset, _phase_yaml(ctx, "cognate"), out=str(out), tracking=ctx.cfg.tracking,
                      registry=ctx.cfg.registry)
    try:
        report = run_cognate(cfg, resume=_resuming(out, COG_STATE), on_stage=ctx.on_stage, progress=ctx.progress)
    except CognatePhaseError as e:
        raise ChainError(f"cognate: {e}") from e
    models = list(report["models"].values())
    return {"model": models[0], "models": models, "trunk": str(out / "foundation" / "model"),
            "report": str(out / "cognate_report.json"), "seconds": report["total_seconds"]}


def _evomerge_parents(ctx: Context) -> dict:
    """Cognate's three models against their trunk when Cognate ran; else specialists of the input."""
    if ctx.state.done("cognate"):
        made = ctx.state.result("cognate")
        return {"models": tuple(made["models"]), "base": made["trunk"], "make_parents": False}
    return {"base": ctx.input_for("evomerge"), "make_parents": True}


def phase_evomerge(ctx: Context) -> dict:
    from agent_forge.evomerge.phase import STATE_FILE as EVO_STATE, EvoMergePhaseError, make_config, run_evomerge

    out = ctx.phase_dir("evomerge")
    cfg = make_config(ctx.cfg.preset, _phase_yaml(ctx, "evomerge"), **_evomerge_parents(ctx), out=str(out),
                      tracking=ctx.cfg.tracking, registry=ctx.cfg.registry)
    try:
        report = run_evomerge(cfg, resume=_resuming(out, EVO_STATE), on_stage=ctx.on_stage, progress=ctx.progress)
    except EvoMergePhaseError as e:
        raise ChainError(f"evomerge: {e}") from e
    return {"model": str(out / "model"), "report": str(out / "evomerge_report.json"),
            "seconds": report["total_seconds"]}


def phase_quietstar(ctx: Context) -> dict:
    from agent_forge.quietstar.pipeline import PipelineError, make_config, run_pipeline

    out = ctx.phase_dir("quietstar")
    cfg = make_config(ctx.cfg.preset, _phase_yaml(ctx, "quietstar"), model=ctx.input_for("quietstar"),
                      out=str(out), tracking=ctx.cfg.tracking, registry=ctx.cfg.registry)
    try:
        report = run_pipeline(cfg, resume=_resuming(out, "pipeline_state.json"), on_stage=ctx.on_stage,
                              progress=ctx.progress)
    except PipelineError as e:
        raise ChainError(f"quietstar: {e}") from e
    return {"model": str(out / "model"), "report": str(out / "forge_report.json"),
            "seconds": report.get("total_seconds")}


def phase_bitnet(ctx: Context) -> dict:
    from agent_forge.bitnet.phase import STATE_FILE as BIT_STATE, BitNetPhaseError, make_config, run_bitnet

    out = ctx.phase_dir("bitnet")
    cfg = make_config(ctx.cfg.preset, _phase_yaml(ctx, "bitnet"), model=ctx.input_for("bitnet"), out=str(out),
                      force=ctx.cfg.force or None, tracking=ctx.cfg.tracking, registry=ctx.cfg.registry)
    try:
        report = run_bitnet(cfg, resume=_resuming(out, BIT_STATE), on_stage=ctx.on_stage, progress=ctx.progress)
    except BitNetPhaseError as e:
        raise ChainError(f"bitnet: {e}") from e
    return {"model": str(out / "model"), "report": str(out / "bitnet_report.json"),
            "seconds": report["total_seconds"], "forced": report["stages"]["validate_input"].get("forced", False)}


RUNNERS = {"cognate": phase_cognate, "evomerge": phase_evomerge, "quietstar": phase_quietstar, "bitnet": phase_bitnet}


def anchored(cfg: ChainConfig) -> ChainConfig:
    """`out` and a local input model as absolute paths: the phases record the paths they are
    given, and a resume from another working directory must still find them."""
    model = str(Path(cfg.model).resolve()) if cfg.model != "default" and Path(cfg.model).exists() else cfg.model
    return replace(cfg, out=str(Path(cfg.out).resolve()), model=model)


def run_chain(cfg: ChainConfig, resume: bool = False, on_phase: Callable | None = None,
              on_stage: Callable | None = None, progress: Callable | None = None) -> dict:
    """Run (or resume) the selected phases in order; returns the report in out/forge_report.json."""
    phases = cfg.selected()
    cfg = anchored(cfg)
    out = Path(cfg.out)
    if (out / STATE_FILE).exists() and not resume:
        raise ChainError(f"{out} already holds a chain run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    state = StageState(out, resume, STATE_FILE)
    ctx = Context(cfg, out, state, on_stage, progress)
    run_stages([(p, RUNNERS[p]) for p in phases], ctx, state, on_phase)
    per, total = timings(state)
    report = {"phases": phases, "config": asdict(cfg), "results": state.data["stages"], "timings": per,
              "total_seconds": total,
              "reports": {p: json.loads(Path(state.result(p)["report"]).read_text()) for p in phases}}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    from agent_forge.html_report import write_html_report

    report["html"] = str(write_html_report(out, report))
    return report


def chain_rows(report: dict) -> list[tuple[str, str]]:
    """Each phase's own summary rows under its name: one table for the whole chain."""
    from agent_forge.bitnet.commands import summary_rows as bitnet_rows
    from agent_forge.cognate.commands import summary_rows as cognate_rows
    from agent_forge.evomerge.commands import summary_rows as evomerge_rows
    from agent_forge.report import summary_rows as quietstar_rows

    rows_of = {"cognate": cognate_rows, "evomerge": evomerge_rows, "quietstar": quietstar_rows, "bitnet": bitnet_rows}
    rows = []
    for phase in report["phases"]:
        rows.append((f"[bold]{phase}[/]", f"{report['results'][phase]['model']}"))
        rows += [(f"  {k}", v) for k, v in rows_of[phase](report["reports"][phase])]
    rows.append(("chain time", f"{report['total_seconds']:.0f} s"))
    return rows
