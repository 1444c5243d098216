"""Typer command functions for `forge eval`, `forge anti-theater` and `forge ab`.

The lead wires them into the `forge` app (e.g. `app.command("eval")(eval_cmd)`). Each
prints a rich table, or with --json exactly ONE JSON object on stdout.
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=False)
MODEL_HELP = "hub id, HF dir, .gguf, .pt, or 'default'"
BATCH_HELP = "questions generated together (default: inference.GENERATION_BATCH, 32)"
DATA_HELP = ("gsm8k, arc_easy, arc_challenge, commonsense_qa, easy_arithmetic, easy_arithmetic_val, "
             "easy_arithmetic_confirm, gym:<family>, a .jsonl, or sets joined by + (easy_arithmetic+easy_arithmetic_val)")
SEEN_HELP = ("JSONL of questions a model trained on (its 'question' fields); eval items that ask the same "
             "question are left out (repeatable)")


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _load(model: str, device: Optional[str]):
    from agent_forge.models import ModelLoadError, load_model

    try:
        return load_model(model, device=device)
    except ModelLoadError as e:
        _fail(str(e))


def _items(data: str, limit: Optional[int], exclude_seen: Optional[list[str]] = None, quiet: bool = False):
    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.data.overlap import unseen_items

    try:
        items = load_eval_set(data, limit)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(f"cannot load eval set {data!r}: {e}")
    if exclude_seen:
        before = len(items)
        try:
            items = unseen_items(items, exclude_seen)
        except (ValueError, OSError) as e:
            _fail(f"--exclude-seen: {e}")
        if not quiet:
            console.print(f"left out {before - len(items)} of {before} items asked in {', '.join(exclude_seen)}")
    if not items:
        _fail(f"eval set {data!r} is empty")
    return items


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _batch(batch_size: int | None) -> int:
    """The CLI leaves the default to inference (imported late: `forge --help` stays fast)."""
    from agent_forge.inference import GENERATION_BATCH

    return batch_size or GENERATION_BATCH


def eval_cmd(model: str = typer.Option("default", help=MODEL_HELP),
             data: str = typer.Option("easy_arithmetic", help=DATA_HELP),
             limit: Optional[int] = typer.Option(None, help="first N items only"),
             thoughts: str = typer.Option("auto", help="on | off | auto"),
             batch_size: Optional[int] = typer.Option(None, help=BATCH_HELP),
             max_new_tokens: Optional[int] = typer.Option(None, help="default: 256 thinking, 48 otherwise"),
             device: Optional[str] = typer.Option(None, help="cpu, cuda, mps"),
             exclude_seen: Optional[list[str]] = typer.Option(None, help=SEEN_HELP),
             json_out: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Accuracy (Wilson 95% interval), per family, ms per example, thinking-token usage."""
    from agent_forge.evaluation.runner import evaluate

    if thoughts not in ("on", "off", "auto"):
        _fail("--thoughts must be on, off or auto")
    m, tok = _load(model, device)
    items = _items(data, limit, exclude_seen, quiet=json_out)
    try:
        res = evaluate(m, tok, items, thinking=thoughts, batch_size=_batch(batch_size),
                       max_new_tokens=max_new_tokens, progress=not json_out)
    except ValueError as e:
        _fail(str(e))
    out = {"model": model, "data": data, **res.to_dict()}
    if out.get("loglik"):
        out["loglik"] = {k: v for k, v in out["loglik"].items() if k != "per_example"}
    if json_out:
        print(json.dumps(out))
        return
    table = Table(title=f"forge eval: {model} on {data} (thoughts {res.mode})")
    for col in ("family", "n", "accuracy", "95% CI"):
        table.add_column(col)
    for fam, s in res.per_family.items():
        table.add_row(fam, str(s["n"]), _pct(s["accuracy"]), f"{_pct(s['ci95'][0])} - {_pct(s['ci95'][1])}")
    table.add_row("[bold]all", str(res.n), f"[bold]{_pct(res.accuracy)}",
                  f"{_pct(res.ci95[0])} - {_pct(res.ci95[1])}")
    console.print(table)
    console.print(f"ms/example {res.ms_per_example:.0f}   no answer {_pct(res.no_answer_rate)}")
    if res.usage:
        console.print(f"thinking closed {_pct(res.usage['closed_rate'])}, "
                      f"well-formed {_pct(res.usage['well_formed_rate'])}")
    if res.flexible_accuracy is not None:
        console.print(f"lm-eval flexible match (last number of reply): {_pct(res.flexible_accuracy)}")
    if res.loglik:
        console.print(f"log-likelihood choice: acc {_pct(res.loglik['acc'])}, "
                      f"acc_norm {_pct(res.loglik['acc_norm'])}")


def anti_theater_cmd(model: str = typer.Option(..., help=MODEL_HELP),
                     data: str = typer.Option("easy_arithmetic", help=DATA_HELP),
                     limit: Optional[int] = typer.Option(100, help="first N items only"),
                     batch_size: Optional[int] = typer.Option(None, help=BATCH_HELP),
                     device: Optional[str] = typer.Option(None),
                     json_out: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Do the thoughts carry the answer? Divergence, ablation, coherence-utility correlation.

    Exit status 1 when any test fails (the recommendation is then "roll back")."""
    from agent_forge.validation.anti_theater import run_anti_theater

    m, tok = _load(model, device)
    try:
        report = run_anti_theater(m, tok, _items(data, limit), batch_size=_batch(batch_size),
                                  progress=not json_out)
    except ValueError as e:
        _fail(str(e))
    if json_out:
        print(json.dumps({"model": model, "data": data, **report.to_dict()}))
        raise typer.Exit(0 if report.passed else 1)
    table = Table(title=f"forge anti-theater: {model} on {data}")
    for col in ("test", "value", "threshold", "passed", "detail"):
        table.add_column(col)
    for t in report.tests:
        table.add_row(t["name"], f"{t['value']:.3f}", f"> {t['threshold']}",
                      "[green]yes" if t["passed"] else "[red]no", t["detail"])
    console.print(table)
    colour = "green" if report.passed else "red"
    console.print(f"[bold {colour}]{report.recommendation}[/]: {report.sentence}")
    if not report.passed:
        raise typer.Exit(1)


def ab_cmd(baseline: str = typer.Option(..., help=MODEL_HELP),
           candidate: str = typer.Option(..., help=MODEL_HELP),
           data: str = typer.Option("easy_arithmetic", help=DATA_HELP),
           rounds: int = typer.Option(3, help="round 0 greedy, later rounds sampled with new seeds"),
           limit: Optional[int] = typer.Option(100, help="first N items only"),
           threshold: float = typer.Option(2.0, help="improvement in points needed to win"),
           batch_size: Optional[int] = typer.Option(None, help=BATCH_HELP),
           device: Optional[str] = typer.Option(None),
           exclude_seen: Optional[list[str]] = typer.Option(None, help=SEEN_HELP),
           json_out: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Baseline vs candidate over several rounds with paired significance tests."""
    from agent_forge.validation.ab import model_arm, run_ab

    items = _items(data, limit, exclude_seen, quiet=json_out)
    arms = [model_arm(name, *_load(name, device), batch_size=_batch(batch_size)) for name in (baseline, candidate)]
    report = run_ab(arms[0], arms[1], items, rounds=rounds, threshold=threshold, progress=not json_out)
    if json_out:
        print(json.dumps({"data": data, **report.to_dict()}))
        return
    table = Table(title=f"forge ab on {data}: {rounds} round(s), {len(items)} items")
    for col in ("arm", "mean accuracy", "std", "per round"):
        table.add_column(col)
    for arm in (report.baseline, report.candidate):
        table.add_row(arm["name"], _pct(arm["mean"]), f"{100 * arm['std']:.1f}",
                      ", ".join(_pct(a) for a in arm["per_round"]))
    console.print(table)
    console.print(report.sentence)
