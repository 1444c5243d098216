"""`forge evomerge`: the Phase 2 command, and the summary it prints from the run's report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from agent_forge.figures import met, pct, spans
from agent_forge.progress import print_rows


def evomerge_cmd(models: Optional[str] = typer.Option(None, help="comma-separated parent models "
                                                      "(HF dirs or hub ids) of one architecture and tokenizer"),
                 out: Path = typer.Option(..., help="output directory (model/, evomerge_report.json, fitness.png)"),
                 make_parents: bool = typer.Option(False, "--make-parents",
                                                   help="first fine-tune --base into one specialist per family"),
                 base: Optional[str] = typer.Option(None, help="the parents' common ancestor (TIES/DARE base); "
                                                    "with --make-parents the model they are trained from"),
                 control: bool = typer.Option(False, help="also train one model on all the parents' families "
                                              "with their summed budget (parents made by --make-parents) "
                                              "and compare the champion with it"),
                 preset: str = typer.Option("quick", help="smoke (seconds), quick (<= 15 min CPU), standard (GPU)"),
                 config: Optional[Path] = typer.Option(None, help="YAML overriding EvoMergeConfig fields"),
                 strategy: Optional[str] = typer.Option(None, help="search: ga (the design's) or cma (CMA-ES)"),
                 generations: Optional[int] = typer.Option(None),
                 tracking: Optional[str] = typer.Option(None, help="W&B mode: offline, disabled, online"),
                 resume: bool = typer.Option(False, help="continue a killed run in --out")):
    """Phase 2: evolve merges of several models into a champion, measured on held-out data."""
    from agent_forge.cli import fail, run_phase_command
    from agent_forge.evomerge.phase import EvoMergePhaseError, make_config, run_evomerge

    parents = tuple(m.strip() for m in models.split(",") if m.strip()) if models else None
    if not parents and not make_parents:
        fail("give --models A,B[,C...] or --make-parents (with --base, default: the built-in model)")
    search = {k: v for k, v in (("strategy", strategy), ("generations", generations)) if v is not None}
    try:
        cfg = make_config(preset, config, models=parents, out=str(out), base=base, tracking=tracking,
                          make_parents=make_parents or None, control=control or None)
        if search:
            from agent_forge.config import update_dataclass

            cfg = update_dataclass(cfg, {"search": search}, "evomerge config")
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    run_phase_command(run_evomerge, cfg, resume, EvoMergePhaseError, print_summary)


def _fit(f: dict) -> str:
    reused = ", scored by an earlier run of these weights" if f.get("details", {}).get("cached") else ""
    return f"{pct(f['value'])} [{pct(f['low'])}, {pct(f['high'])}] (n={f['n']}{reused})"


def _relative_gain_text(g: dict) -> str:
    """The relative gain with its paired bootstrap interval (reports before it had none), and
    the verdict: met needs the point estimate at the target and the gain's interval above 0;
    an interval that holds the target is said, as the sample does not settle that side."""
    ci, target = g.get("relative_gain_ci95"), g["target_relative"]
    text = f"{100 * g['relative_gain']:+.1f}%" + ("" if not ci else f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]")
    text += f": {met(g['target_met'])}"
    if not g["target_met"] and g["relative_gain"] >= target and g["ci95_points"][0] <= 0:
        text += " (the point estimate reaches it, but the gain's interval reaches 0)"
    return text + spans(ci, target)


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(what, measured) rows for the terminal and the README; the target says met or MISSED."""
    st = report["stages"]
    rows = []
    kind = "trace likelihood" if report["config"]["fitness"]["loglik_weight"] >= 1 else "fitness"
    for i, p in enumerate(st.get("baseline", {}).get("parents", [])):
        rows.append((f"parent {i + 1} (validation {kind})", f"{p['path']}: {_fit(p)}"))
    plan = st.get("parents", {}).get("memory")
    if plan:
        held = plan["need_bytes"] if plan["mode"] == "in memory" else plan["streamed_need_bytes"]
        rows.append(("memory plan", f"parents {plan['mode']}: about {held / 1e9:.1f} GB held, "
                                    f"{plan['free_bytes'] / 1e9:.1f} GB free at the start"))
    changes = st.get("parents", {}).get("adapted")
    if changes:
        rows.append((f"sized for {st['parents']['n_params'] / 1e6:.0f}M-parameter parents",
                     ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())))
    search = st.get("search")
    if search:
        for h in search["history"]:
            rows.append((f"generation {h['generation']} (validation {kind})",
                         f"best {pct(h['best'])}, mean {pct(h['mean'])}, diversity {h['diversity']:.2f}, "
                         f"{h.get('n_evaluated', 0)} newly evaluated, {h.get('cache_hits', 0)} cached"))
        rows.append(("champion recipe", search["best"].get("label", "") + " " + _combo(search["best"])))
    test = st.get("test")
    if test:
        g = test["gain"]
        rows += [("best parent (test accuracy)", _fit(test["best_parent"])),
                 ("champion (test accuracy)", _fit(test["champion"])),
                 ("gain (paired, test)", f"{g['points']:+.1f} points [{g['ci95_points'][0]:+.1f}, "
                                         f"{g['ci95_points'][1]:+.1f}], McNemar p={g['mcnemar_p']:.2g}"),
                 (f"relative gain (target >= {100 * g['target_relative']:.0f}%)", _relative_gain_text(g))]
        if test.get("budget_warning"):
            rows.append(("WARNING", test["budget_warning"]))
        if "control" in test:
            c = test["gain_vs_control"]
            rows += [("control: one model on all families (test)", _fit(test["control"])),
                     ("champion vs control (paired)", f"{c['points']:+.1f} points [{c['ci95_points'][0]:+.1f}, "
                                                      f"{c['ci95_points'][1]:+.1f}]")]
    hand = st.get("handoff")
    if hand:
        rows.append(("Phase 2 -> 3 handoff", "passed" if hand["ok"] else "FAILED"))
    rows.append(("time", f"{report['total_seconds']:.0f} s"))
    return rows


def _combo(genome: dict) -> str:
    return f"{genome['interp']}+{genome['taskvec']}+{genome['layers']}"


def print_summary(console: Console, report: dict) -> None:
    print_rows(console, f"forge evomerge: {report['out']}", summary_rows(report))
