"""`forge registry ...`: look at the model registry from the shell.

Tables for people by default, JSON (`--json`) for scripts. The lead wires this in with
`app.add_typer(registry_app, name="registry")`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from agent_forge.registry import Registry

registry_app = typer.Typer(help="Inspect the model registry (FORGE_HOME/registry.sqlite).", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DbOpt = Annotated[Optional[Path], typer.Option("--db", help="Registry file (default: FORGE_HOME/registry.sqlite).")]


def _metrics_text(metrics: dict, limit: int = 4) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:limit]]
    return ", ".join(items) + (" ..." if len(metrics) > limit else "")


def _when(iso: str) -> str:
    return iso[:19].replace("T", " ")


_STATUS_STYLE = {"passed": "green", "failed": "red", "completed": "green", "running": "cyan"}


def _status(status: str) -> str:
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def registry_list(json_out: JsonOpt = False, phase: Annotated[Optional[int], typer.Option(help="Only this phase.")] = None,
                  db: DbOpt = None) -> None:
    """List registered models."""
    models = Registry(db).list_models(phase=phase)
    if json_out:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    table = Table(title=f"Models ({len(models)})")
    for col in ("id", "name", "phase", "parent", "handoff", "metrics", "path", "created"):
        table.add_column(col, overflow="fold")
    for m in models:
        table.add_row(str(m.id), m.name, str(m.phase), "" if m.parent_id is None else str(m.parent_id),
                      _status(m.handoff_status), _metrics_text(m.metrics), m.path, _when(m.created))
    Console().print(table)


def registry_show(model_id: Annotated[int, typer.Argument(help="Model id.")], json_out: JsonOpt = False,
                  db: DbOpt = None) -> None:
    """Show one model: metrics, lineage and its last handoff report."""
    registry = Registry(db)
    try:
        model = registry.get_model(model_id)
    except KeyError as exc:
        typer.echo(str(exc.args[0]), err=True)
        raise typer.Exit(1) from None
    lineage = _lineage(registry, model.parent_id)
    if json_out:
        typer.echo(json.dumps({**model.to_dict(), "lineage": lineage}, indent=2))
        return
    table = Table(title=f"Model {model.id}: {model.name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key in ("phase", "path", "created", "handoff_status"):
        table.add_row(key, str(getattr(model, key)))
    table.add_row("lineage", " <- ".join(f"{p['id']}:{p['name']}" for p in lineage) or "(none)")
    for key, value in model.metrics.items():
        table.add_row(f"metrics.{key}", json.dumps(value))
    for check in (model.handoff_report or {}).get("checks", []):
        mark = "PASS" if check.get("ok") else check.get("severity", "error").upper()
        table.add_row(f"handoff.{check.get('name')}", f"{mark}  {check.get('message', '')}")
    Console().print(table)


def _lineage(registry: Registry, parent_id: int | None) -> list[dict]:
    """Ancestors, nearest first; stops at a missing id or a cycle."""
    out, seen = [], set()
    while parent_id is not None and parent_id not in seen:
        seen.add(parent_id)
        try:
            parent = registry.get_model(parent_id)
        except KeyError:
            break
        out.append({"id": parent.id, "name": parent.name, "phase": parent.phase})
        parent_id = parent.parent_id
    return out


def registry_runs(json_out: JsonOpt = False, kind: Annotated[Optional[str], typer.Option(help="Only this kind.")] = None,
                  db: DbOpt = None) -> None:
    """List runs (jobs) and their state."""
    runs = Registry(db).list_runs(kind=kind)
    if json_out:
        typer.echo(json.dumps([r.to_dict() for r in runs], indent=2))
        return
    table = Table(title=f"Runs ({len(runs)})")
    for col in ("id", "kind", "status", "model", "state", "started", "updated"):
        table.add_column(col, overflow="fold")
    for r in runs:
        table.add_row(str(r.id), r.kind, _status(r.status), "" if r.model_id is None else str(r.model_id),
                      _metrics_text(r.state), _when(r.started), _when(r.updated))
    Console().print(table)


def registry_check(
    model: Annotated[str, typer.Argument(help="Model directory or spec to validate.")],
    to_phase: Annotated[int, typer.Option("--to", help="Handoff into this phase: 3 or 4.")] = 4,
    min_fitness_gain: Annotated[Optional[float], typer.Option(help="2->3: required fitness gain (fraction).")] = None,
    min_baking_accuracy: Annotated[float, typer.Option(help="3->4: required baking accuracy.")] = 0.85,
    no_anti_theater: Annotated[bool, typer.Option("--no-anti-theater", help="3->4: do not require it.")] = False,
    model_id: Annotated[Optional[int], typer.Option(help="Record the verdict on this registry model.")] = None,
    json_out: JsonOpt = False, db: DbOpt = None,
) -> None:
    """Run a phase-handoff validation; exit code 1 when it fails."""
    from agent_forge.handoff import format_result, record_handoff, validate_phase2_to_3, validate_phase3_to_4

    if to_phase == 3:
        result = validate_phase2_to_3(model, min_fitness_gain=min_fitness_gain)
    elif to_phase == 4:
        result = validate_phase3_to_4(model, min_baking_accuracy, require_anti_theater=not no_anti_theater)
    else:
        raise typer.BadParameter("handoffs exist into phase 3 and 4", param_hint="--to")
    if model_id is not None:
        record_handoff(Registry(db), model_id, result)
    typer.echo(json.dumps(result.to_dict(), indent=2) if json_out else format_result(result))
    if not result.ok:
        raise typer.Exit(1)


def registry_lineage(model_id: Annotated[int, typer.Argument(help="Model id.")], json_out: JsonOpt = False,
                     db: DbOpt = None) -> None:
    """The family tree of a model back to its inputs: every parent (several for a merge)."""
    from rich.tree import Tree

    from agent_forge.dashboard.lineage import lineage

    tree = lineage(Registry(db), model_id)
    if tree is None:
        typer.echo(f"no model with id {model_id} in {Registry(db).path}", err=True)
        raise typer.Exit(1)
    if json_out:
        typer.echo(json.dumps(tree, indent=2, default=str))
        return

    def add(branch, node: dict) -> None:
        mark = "" if node.get("handoff_status") in (None, "pending") else f", handoff {node['handoff_status']}"
        label = f"{node['id']}: {node['name']} (phase {node['phase']}{mark}) {node.get('path') or ''}"
        child = branch.add(label + (" ..." if node.get("truncated") else ""))
        for parent in node.get("parents", []):
            add(child, parent)

    root = Tree(f"lineage of model {model_id}")
    add(root, tree)
    Console().print(root)


registry_app.command("list")(registry_list)
registry_app.command("lineage")(registry_lineage)
registry_app.command("show")(registry_show)
registry_app.command("runs")(registry_runs)
registry_app.command("check")(registry_check)
