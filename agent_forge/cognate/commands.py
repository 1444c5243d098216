"""`forge cognate`: the Phase 1 command, and the summary it prints from the run's report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from agent_forge.figures import met_within
from agent_forge.progress import print_rows


def cognate_cmd(out: Path = typer.Option(..., help="output directory (models/, cognate_report.json, ...)"),
                preset: str = typer.Option("quick", help="smoke (seconds), quick (small CPU run), standard (GPU)"),
                config: Optional[Path] = typer.Option(None, help="YAML overriding CognatePhaseConfig fields"),
                tokenizer: Optional[str] = typer.Option(None, help="'default' (SmolLM2's) or an HF tokenizer dir"),
                device: Optional[str] = typer.Option(None),
                tracking: Optional[str] = typer.Option(None, help="W&B mode: offline, disabled, online"),
                registry: Optional[str] = typer.Option(None, help="registry SQLite file (default: FORGE_HOME's)"),
                resume: bool = typer.Option(False, help="continue a killed run in --out")):
    """Phase 1: three small recursive-memory models (reasoning, memory, speed) from one trunk, measured."""
    from agent_forge.cli import fail, run_phase_command
    from agent_forge.cognate.phase import CognatePhaseError, make_config, run_cognate

    try:
        cfg = make_config(preset, config, out=str(out), tokenizer=tokenizer, device=device, tracking=tracking,
                          registry=registry)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    run_phase_command(run_cognate, cfg, resume, CognatePhaseError, print_summary)


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(what, measured) rows: every model's validation loss against the unigram baseline,
    halting, throughput, diversity against its 0.3 target, the merge check."""
    ev = report["stages"]["evaluate"]
    unigram = ev["unigram_val_loss"]
    rows = [("unigram baseline (val loss, nats)", f"{unigram:.3f}"), batch_row(report)]
    for name, m in ev["models"].items():
        rows.append((f"{name}: val loss", f"{m['val_loss']:.3f} ({'beats' if m['beats_unigram'] else 'does NOT beat'}"
                                          f" unigram), halting {m['mean_halting_steps']:.2f}/"
                                          f"{m['max_recursion_steps']} steps, "
                                          f"{m['forward_tokens_per_s'] or 0:.0f} tok/s forward"))
        if "easy_accuracy" in m:
            acc = m["easy_accuracy"]
            lo, hi = acc["ci95"]
            rows.append((f"{name}: easy arithmetic accuracy",
                         f"{100 * acc['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={acc['n']})"))
    div = ev["diversity"]
    ci = div.get("ci95")  # runs before the interval: none
    interval = "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    verdict = met_within(ev["diversity_target_met"], ci, 0.3, shown="0.3")
    rows.append(("diversity (target > 0.3)", f"{div['diversity']:.3f}{interval}: {verdict} (disagreement "
                                             f"{div['mean_disagreement']:.3f}, halting distance "
                                             f"{div['mean_halting_distance']:.3f})"))
    merge = ev["merge"]
    rows.append((f"50/50 merge of {' + '.join(merge['parents'])}", f"val loss {merge['merged_val_loss']:.3f}"))
    rows += control_rows(ev.get("controls") or {}, ev["models"])
    for name, path in report["models"].items():
        rows.append((f"model: {name}", path))
    rows.append(("time", f"{report['total_seconds']:.0f} s"))
    return rows


def control_rows(controls: dict, models: dict) -> list[tuple[str, str]]:
    """The controls the run trained: the independent-trunk merge, the plain transformer
    against the best specialisation."""
    rows = []
    if "independent_merge_val_loss" in controls:
        rows.append(("merge of two independent trunks (control)",
                     f"val loss {controls['independent_merge_val_loss']:.3f} (shared-trunk merge "
                     f"{'better' if controls['shared_trunk_merges_better'] else 'NOT better'})"))
    if "transformer_val_loss" in controls:
        plain = controls["transformer_val_loss"]
        best = min((m["val_loss"], n) for n, m in models.items() if n != "foundation")
        verdict = "beats" if best[0] < plain else "does NOT beat"
        rows.append(("same-size plain transformer (control)",
                     f"val loss {plain:.3f}: the best specialisation ({best[1]}, {best[0]:.3f}) {verdict} it"))
    return rows


def batch_row(report: dict) -> tuple[str, str]:
    """Batch and sequence length, and where they came from (config, or the free memory)."""
    batch, seq, sizing = report.get("batch_size"), report.get("seq_len"), report.get("sizing")
    text = f"{batch} x {seq} tokens"
    if sizing:
        text += (f" ({' and '.join(sizing['chosen'])} chosen from {sizing['free_bytes'] / 2**30:.1f} GiB free on "
                 f"{sizing['device']}: a step measured at {sizing['fixed_bytes'] / 2**20:.0f} MiB + "
                 f"{sizing['bytes_per_token'] / 2**10:.0f} KiB per token, predicted peak "
                 f"{sizing['predicted_bytes'] / 2**20:.0f} MiB)")
    return "batch (sequences x tokens)", text


def print_summary(console: Console, report: dict) -> None:
    print_rows(console, f"forge cognate: {report['out']}", summary_rows(report))
