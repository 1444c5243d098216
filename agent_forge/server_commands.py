"""Typer command functions for `forge dashboard` and `forge serve`.

The lead wires them into the app: `app.command("dashboard")(dashboard_cmd)` and
`app.command("serve")(serve_cmd)`. Both bind to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

console = Console(stderr=True)
DASHBOARD_APP = Path(__file__).parent / "dashboard" / "app.py"
RUNS_ENV, REGISTRY_ENV = "FORGE_RUNS_DIR", "FORGE_REGISTRY"


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def dashboard_command(port: int, runs_dir: Path, registry: Optional[Path], host: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line (also used by the screenshot helper)."""
    return [sys.executable, "-m", "streamlit", "run", str(DASHBOARD_APP), "--server.address", host,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--global.developmentMode", "false"]


def dashboard_env(runs_dir: Path, registry: Optional[Path]) -> dict:
    env = {**os.environ, RUNS_ENV: str(Path(runs_dir).resolve())}
    env.pop("FORGE_API_TOKEN", None)
    if registry is not None:
        env[REGISTRY_ENV] = str(Path(registry).resolve())
    return env


def dashboard_cmd(port: int = typer.Option(8501, help="port on 127.0.0.1"),
                  registry: Optional[Path] = typer.Option(None, help="registry SQLite (default FORGE_HOME's)"),
                  runs_dir: Path = typer.Option(Path("runs"), help="folder holding run directories"),
                  host: str = typer.Option("127.0.0.1", help="address to bind; keep 127.0.0.1 unless you know why")):
    """Streamlit dashboard: runs, curves, validation, A/B, checkpoints, registry (live refresh)."""
    if not runs_dir.exists():
        console.print(f"[yellow]note:[/] {runs_dir} does not exist yet; the dashboard shows runs once it does")
    console.print(f"dashboard on http://{host}:{port}  (runs: {runs_dir}; Ctrl-C stops)")
    try:
        rc = subprocess.call(dashboard_command(port, runs_dir, registry, host), env=dashboard_env(runs_dir, registry))
    except KeyboardInterrupt:
        rc = 0
    raise typer.Exit(rc)


def serve_cmd(host: str = typer.Option("127.0.0.1", help="address to bind"),
              port: int = typer.Option(8765, help="port"),
              insecure_local: bool = typer.Option(False, "--insecure-local",
                                                  help="allow no FORGE_API_TOKEN, on 127.0.0.1 only"),
              runs_dir: Path = typer.Option(Path("runs"), help="jobs may write only under this folder"),
              model_root: Optional[List[Path]] = typer.Option(None, help="folders input models may come from "
                                                              "(repeatable; default: the runs dir and ./models)"),
              registry: Optional[Path] = typer.Option(None, help="registry SQLite (jobs are recorded there)"),
              max_running: int = typer.Option(1, help="jobs running at once")):
    """Job API: start / status / pause / resume Phase 3 slices (step1, step2, anti_theater,
    complete), whole phases (cognate, evomerge, bitnet) and the chain (run); see docs/job_api.md.

    Every route needs `Authorization: Bearer $FORGE_API_TOKEN`. Pause stops the worker; resume
    continues from the last checkpoint, so steps after it are redone."""
    import uvicorn

    from agent_forge.registry import default_registry_path
    from agent_forge.server.app import create_app
    from agent_forge.server.auth import AuthConfigError, resolve_token
    from agent_forge.server.jobs import JobManager, JobSettings

    try:
        token = resolve_token(host, insecure_local)
    except AuthConfigError as e:
        _fail(str(e))
    if token is None:
        console.print("[yellow]warning:[/] no FORGE_API_TOKEN: anyone on this machine can start jobs")
    elif len(token) < 16:
        console.print("[yellow]warning:[/] FORGE_API_TOKEN is shorter than 16 characters")
    runs_dir.mkdir(parents=True, exist_ok=True)
    roots = [Path(p).resolve() for p in (model_root or [runs_dir, Path("models")])]
    settings = JobSettings(registry=Path(registry or default_registry_path()).resolve(),
                           out_roots=[runs_dir.resolve()], model_roots=roots, max_running=max_running)
    app = create_app(JobManager(settings), token)
    console.print(f"job API on http://{host}:{port}  (runs under {settings.out_roots[0]}; registry {settings.registry})")
    uvicorn.run(app, host=host, port=port, log_level="info")
