"""A rich display for long runs: one line per stage, a bar with ETA for training steps."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageDisplay:
    """Feed it `on_stage(name, event, result)` and `on_step(step, total, row)` callbacks."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.task = None
        self.stage = ""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def on_stage(self, name: str, event: str, result) -> None:
        self.stage = name
        if event == "start":
            self.console.log(f"[cyan]stage[/] {name} ...")
        elif event == "done":
            secs = (result or {}).get("stage_seconds")
            since = " since the resume" if (result or {}).get("stage_resumed") else ""
            self.console.log(f"[green]stage[/] {name} done in {secs}s{since}")
            self._close_task()
        else:
            self.console.log(f"[dim]stage {name}: {event}[/]")

    def on_step(self, step: int, total: int, row: dict) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.stage, total=total, info="")
        info = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k in ("loss", "reward", "kl", "best", "diversity") and v is not None)
        self.progress.update(self.task, completed=step, total=total, info=info)

    def _close_task(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None


def print_rows(console: Console, title: str, rows) -> None:
    """A command's (what, measured) summary as a table; the values print as text, never as
    rich markup (a value like "[llamacpp]" stays), and paths under the working directory as
    relative ones (the chain records absolute paths so a resume works from anywhere)."""
    from pathlib import Path

    from rich.markup import escape
    from rich.table import Table

    here = f"{Path.cwd()}/"
    table = Table(title=title, show_header=False)
    for what, value in rows:
        table.add_row(what, escape(str(value).replace(here, "")))
    console.print(table)
