"""`forge`: one command per verb; each calls into the package and prints what it measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

def _quiet_libraries() -> None:
    """Our progress bars say what is happening; the libraries' per-file bars add only noise."""
    import os

    os.environ.setdefault("WANDB_SILENT", "true")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


_quiet_libraries()
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Agent Forge: teach language models to think before they speak.")
console = Console()


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit; no traceback for user mistakes."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def run_phase_command(run, cfg, resume: bool, error: type[Exception], print_summary) -> dict:
    """A phase command's run with the live stage display; the phase's own refusal is one red
    line (exit 1); then its summary table."""
    from agent_forge.progress import StageDisplay

    with StageDisplay(console) as display:
        try:
            report = run(cfg, resume=resume, on_stage=display.on_stage, progress=display.on_step)
        except error as e:
            fail(str(e), code=1)
    print_summary(console, report)
    return report


def load_or_fail(spec: str, device: str | None = None):
    from agent_forge.models import ModelLoadError, load_model

    try:
        return load_model(spec, device=device)
    except ModelLoadError as e:
        fail(str(e))


@app.command()
def info(model: str = typer.Option("default", help="hub id, HF dir, .gguf, .pt, or 'default'"),
         device: Optional[str] = typer.Option(None, help="cpu, cuda, mps (default: best available)"),
         json_out: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Size report and the adaptive defaults derived from it."""
    import time

    from agent_forge.models import adaptive_defaults, measure_model
    from agent_forge.vocab import has_thinking_tokens

    t0 = time.time()
    m, tok = load_or_fail(model, device)
    size = measure_model(m)
    report = {"model": model, "load_seconds": round(time.time() - t0, 2), **size.to_dict(),
              "architecture": type(m).__name__, "vocab_size": len(tok),
              "has_thinking_tokens": has_thinking_tokens(tok), "adaptive_defaults": adaptive_defaults(size)}
    if json_out:
        print(json.dumps(report))
        return
    table = Table(title=f"forge info: {model}", show_header=False)
    for key, value in report.items():
        if key == "n_bytes" or key == "free_memory_bytes":
            value = f"{value / 2**20:,.0f} MiB"
        elif key == "n_params":
            value = f"{value / 1e6:,.1f}M"
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def bake(model: str = typer.Option(..., help="model to bake (hub id, dir, .gguf, .pt, default)"),
         data: Path = typer.Option(..., help="training records (JSONL from `forge data build`)"),
         out: Path = typer.Option(..., help="output directory"),
         mode: str = typer.Option("sft", help="sft (supervised on traces) or kl (prompt baking)"),
         optimizer: str = typer.Option("adamw", help="adamw or mugrokfast"),
         steps: Optional[int] = typer.Option(None, help="optimiser steps"),
         batch_size: Optional[int] = typer.Option(None),
         lr: Optional[float] = typer.Option(None),
         lora: bool = typer.Option(False, help="train LoRA adapters instead of all weights"),
         eval_data: str = typer.Option("easy_arithmetic", help="held-out set for metrics"),
         config: Optional[Path] = typer.Option(None, help="YAML with BakeConfig fields"),
         resume: bool = typer.Option(False, help="continue from the last checkpoint in --out"),
         device: Optional[str] = typer.Option(None)):
    """Step 1: bake reasoning strategies into the weights."""
    from agent_forge.quietstar.step1 import run_step1

    overrides = {k: v for k, v in dict(mode=mode, optimizer=optimizer, steps=steps, batch_size=batch_size,
                                       lr=lr, lora=lora).items() if v is not None}
    try:
        result = run_step1(model, data, out, overrides, config, eval_data, resume, device)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    console.print_json(json.dumps(result, default=str))


def main() -> None:  # pragma: no cover - console entry
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


@app.command("bake-quietstar")
def bake_quietstar(model: str = typer.Option("default", help="Phase 2 champion: hub id, dir, .gguf, .pt, default"),
                   out: Path = typer.Option(..., help="output directory (model/, forge_report.json, ...)"),
                   config: Optional[Path] = typer.Option(None, help="YAML overriding PipelineConfig fields"),
                   preset: str = typer.Option("quick", help="smoke (minutes), quick (make demo), standard (GPU)"),
                   eval_dataset: Optional[str] = typer.Option(None, help="held-out set name or JSONL path"),
                   eval_samples: Optional[int] = typer.Option(None),
                   ab_test_rounds: Optional[int] = typer.Option(None),
                   device: Optional[str] = typer.Option(None),
                   tracking: Optional[str] = typer.Option(None, help="W&B mode: offline, disabled, online"),
                   resume: bool = typer.Option(False, help="continue a killed run in --out")):
    """Phase 3 end to end: vocabulary, data, Step 1, Step 2, validation, A/B, registry, handoff."""
    from agent_forge.quietstar.pipeline import PipelineError, make_config, run_pipeline
    from agent_forge.report import print_summary

    try:
        cfg = make_config(preset, config, model=model, out=str(out), eval_dataset=eval_dataset,
                          eval_samples=eval_samples, ab_test_rounds=ab_test_rounds, device=device,
                          tracking=tracking)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if (out / "pipeline_state.json").exists() and not resume:
        fail(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    run_phase_command(run_pipeline, cfg, resume, PipelineError, print_summary)


from agent_forge.registry_commands import registry_app  # noqa: E402

app.add_typer(registry_app, name="registry", help="the SQLite model registry")

from agent_forge.data.commands import data_app  # noqa: E402

app.add_typer(data_app, name="data", help="build and inspect reasoning data")

from agent_forge.evaluation.commands import ab_cmd, anti_theater_cmd, eval_cmd  # noqa: E402

app.command("eval", help="Accuracy (with 95% interval) of a model on a task or JSONL file.")(eval_cmd)
app.command("anti-theater", help="Do the thoughts carry weight? Divergence, ablation, correlation, check honesty.")(anti_theater_cmd)
app.command("ab", help="Baseline vs candidate over several rounds, with paired statistics.")(ab_cmd)

from agent_forge.quietstar.rl_commands import rl_cmd  # noqa: E402
from agent_forge.server_commands import dashboard_cmd, serve_cmd  # noqa: E402

app.command("rl", help="Step 2: Quiet-STaR RL on a Step 1 model (answer mode).")(rl_cmd)
app.command("dashboard", help="Streamlit dashboard of runs and registry (127.0.0.1).")(dashboard_cmd)
app.command("serve", help="Job API (token, 127.0.0.1): start/pause/resume Phase 3 stages, cognate, evomerge, bitnet and run jobs.")(serve_cmd)

from agent_forge.bitnet.commands import bitnet_cmd  # noqa: E402

app.command("bitnet", help="Phase 4: compress a Phase 3 model to ternary (1.58-bit) weights, measured.")(bitnet_cmd)

from agent_forge.evomerge.commands import evomerge_cmd  # noqa: E402

app.command("evomerge", help="Phase 2: evolve merges of several models into a champion, measured.")(evomerge_cmd)

from agent_forge.cognate.commands import cognate_cmd  # noqa: E402

app.command("cognate", help="Phase 1: three small TRM x Titans-MAG models from one trunk, measured.")(cognate_cmd)


@app.command("run")
def run_cmd(start: str = typer.Option("quietstar", "--from", help="first phase: cognate, evomerge, quietstar, bitnet"),
            stop: str = typer.Option("bitnet", "--to", help="last phase: cognate, evomerge, quietstar, bitnet"),
            out: Path = typer.Option(..., help="output directory: one folder per phase, forge_report.json"),
            model: str = typer.Option("default", help="the first phase's input model"),
            preset: str = typer.Option("quick", help="every phase's preset: smoke, quick, standard"),
            config: Optional[Path] = typer.Option(None, help="YAML: chain fields and a section per phase"),
            force: bool = typer.Option(False, help="go on past a failed handoff (recorded)"),
            tracking: Optional[str] = typer.Option(None, help="W&B mode: offline, disabled, online"),
            resume: bool = typer.Option(False, help="continue a killed chain in --out")):
    """The phases as one system: each phase's output is the next one's input, through its handoff."""
    from agent_forge.chain import ChainError, chain_rows, load_chain_config, run_chain
    from agent_forge.progress import StageDisplay, print_rows

    try:
        cfg = load_chain_config(config, start=start, stop=stop, out=str(out), model=model, preset=preset,
                                force=force or None, tracking=tracking)
        cfg.selected()
    except (ValueError, FileNotFoundError, TypeError) as e:
        fail(str(e))
    with StageDisplay(console) as display:
        def on_phase(name, event, result):
            if event == "start":
                console.rule(f"phase {name}")
        try:
            report = run_chain(cfg, resume=resume, on_phase=on_phase, on_stage=display.on_stage,
                               progress=display.on_step)
        except ChainError as e:
            fail(str(e), code=1)
    print_rows(console, f"forge run: {out}", chain_rows(report))
    console.print(f"report: {out / 'forge_report.json'} and {report['html']} (one page, with the plots)")
