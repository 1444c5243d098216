"""`forge cognate`: the Phase 1 command, and the summary it prints from the run's report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from agent_forge.evaluation.metrics import difference_verdict
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
    """(what, measured) rows: every model's validation loss (with its 95% interval over the
    blocks) against the unigram baseline on the same blocks, halting, throughput, diversity
    against its 0.3 target, the merge check and the controls, paired where compared."""
    ev = report["stages"]["evaluate"]
    unigram = ev["unigram_val_loss"]
    every = ev.get("unigram_val_loss_all")  # runs before the paired comparisons: none
    rows = [("unigram baseline (val loss, nats)",
             f"{unigram:.3f}" + (f" on the {ev['eval_blocks']} evaluated blocks ({every:.3f} on all validation "
                                 f"blocks)" if every is not None else "")), batch_row(report)]
    for name, m in ev["models"].items():
        rows.append((f"{name}: val loss", f"{loss_text(m['val_loss'], m.get('val_loss_ci95'))} "
                                          f"({unigram_verdict(m)}), halting {m['mean_halting_steps']:.2f}/"
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
    rows.append(merge_row(ev["merge"]))
    rows += control_rows(ev.get("controls") or {}, ev["models"])
    for name, path in report["models"].items():
        rows.append((f"model: {name}", path))
    rows.append(("time", f"{report['total_seconds']:.0f} s"))
    return rows


def loss_text(loss: float, ci) -> str:
    """A loss in nats with its 95% interval when measured: "2.322 [2.301, 2.343]"."""
    return f"{loss:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def diff_text(diff: dict) -> str:
    """A paired loss difference in nats with its interval: "-1.317 [-1.352, -1.282] nats"."""
    ci = diff.get("ci95")
    return f"{diff['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + " nats"


def unigram_verdict(m: dict) -> str:
    """Whether a model's loss is below the unigram baseline's, paired over the same blocks."""
    if "vs_unigram" not in m:  # runs before the paired comparison: the point estimates
        return f"{'beats' if m['beats_unigram'] else 'does NOT beat'} unigram"
    diff = m["vs_unigram"]
    word = difference_verdict(diff, "beats", "does NOT beat", "cannot be told from")
    return f"{word} unigram: {diff_text(diff)}"


def merge_row(merge: dict) -> tuple[str, str]:
    """The 50/50 merge's loss and, paired, how far it is from the better of its parents."""
    text = f"val loss {loss_text(merge['merged_val_loss'], merge.get('merged_val_loss_ci95'))}"
    if "vs_better_parent" in merge:
        diff = merge["vs_better_parent"]
        word = difference_verdict(diff, "below", "above", "not told apart from")
        text += f"; {word} the better parent ({diff['parent']}): {diff_text(diff)}"
    return f"50/50 merge of {' + '.join(merge['parents'])}", text


def control_rows(controls: dict, models: dict) -> list[tuple[str, str]]:
    """The controls the run trained: the independent-trunk merge, the plain transformer
    against the best specialisation, each paired over the same blocks when measured so."""
    rows = []
    if "independent_merge_val_loss" in controls:
        diff = controls.get("shared_minus_independent")
        better = (difference_verdict(diff, "better", "NOT better (worse)", "NOT shown better") if diff
                  else "better" if controls["shared_trunk_merges_better"] else "NOT better")
        rows.append(("merge of two independent trunks (control)",
                     f"val loss {controls['independent_merge_val_loss']:.3f} (shared-trunk merge {better}"
                     + (f": {diff_text(diff)}" if diff else "") + ")"))
    if "transformer_val_loss" in controls:
        rows.append(("same-size plain transformer (control)", transformer_text(controls, models)))
    return rows


def transformer_text(controls: dict, models: dict) -> str:
    """The plain transformer's loss against the best specialisation's (the lower point
    estimate), paired over the blocks in runs that measured it so."""
    plain = controls["transformer_val_loss"]
    loss, best = min((m["val_loss"], n) for n, m in models.items() if n != "foundation")
    text = (f"val loss {loss_text(plain, controls.get('transformer_val_loss_ci95'))}: "
            f"the best specialisation ({best}, {loss:.3f})")
    diff = controls.get("best_minus_transformer")
    if diff:
        verdict = difference_verdict(diff, "beats", "does NOT beat", "cannot be told from")
        return f"{text} {verdict} it: {diff_text(diff)}"
    return f"{text} {'beats' if loss < plain else 'does NOT beat'} it"


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
