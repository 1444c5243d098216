"""Experiment tracking: a local metrics file that is always written, plus W&B.

`run_dir/metrics.jsonl` gets one JSON line per `log` call, flushed at once, so the
dashboard can read a run while it goes and nothing depends on W&B working. W&B runs in
offline mode by default (`wandb sync` uploads later); if it cannot start, the run goes
on with the local store and says so once.

Every stage (bake, rl, eval ...) restarts its step count at 0, but a W&B run wants one
increasing step. So W&B gets keys `stage/metric` plotted against their own `stage/step`
axis (`define_metric`), never the global step.

Configs can carry teacher API settings; anything that looks like a secret is redacted
before it reaches W&B or disk, and environment variables are never copied in.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODES = ("offline", "online", "disabled")
REDACTED = "***"
RESERVED = frozenset({"stage", "step", "time"})

_SECRET_KEY = re.compile(
    r"(api[_-]?key|secret|passw(or)?d|credential|bearer|access[_-]?token|authorization|(^|_)auth($|_))", re.I
)
_SECRET_VALUE = re.compile(r"^(sk-|hf_|ghp_|xox[bp]-)[A-Za-z0-9_\-]{8,}")


def redact(value: Any, key: str = "") -> Any:
    """Copy of a config with secret-looking keys and key-shaped strings replaced by '***'."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    if value is not None and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str) and _SECRET_VALUE.match(value):
        return REDACTED
    return value


def _plain(value: Any) -> Any:
    """JSON-ready copy: tensors / numpy scalars become Python numbers, paths become str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _flatten(metrics: dict, prefix: str) -> dict:
    """{"acc": {"step": 0.9}} under prefix "bake" -> {"bake/acc/step": 0.9}; numbers and text only."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
    return out


class Tracker:
    """Log metrics for one run to `run_dir/metrics.jsonl` and to W&B (`mode`)."""

    def __init__(self, run_dir: str | Path, project: str = "agent-forge", mode: str = "offline",
                 config: dict | None = None, name: str | None = None, system_stats: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown tracking mode {mode!r}; choose from {', '.join(MODES)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.config = redact(_plain(dict(config or {})))
        self._lock = threading.Lock()
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._stages: set[str] = set()
        self._summary: dict = {}
        self._warned = False
        self.wandb_run = self._init_wandb(project, name, system_stats)

    def _init_wandb(self, project: str, name: str | None, system_stats: bool):
        try:
            import wandb

            settings = wandb.Settings(console="off", disable_git=True, save_code=False,
                                      x_disable_stats=not system_stats)
            return wandb.init(project=project, dir=str(self.run_dir), mode=self.mode, name=name,
                              config=self.config, reinit="create_new", settings=settings)
        except Exception as exc:  # any failure: keep going with the local store only
            self._warn(f"W&B could not start ({type(exc).__name__}: {exc}); "
                       f"metrics go to {self.run_dir / METRICS_FILE} only")
            return None

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def log(self, metrics: dict, step: int, stage: str) -> None:
        """Append one line {"stage", "step", "time", **metrics} and send it to W&B.

        NaN / inf are written as Python's json writes them (NaN, Infinity): a diverging loss
        stays visible, and `read_metrics` reads them back as floats.
        """
        clash = RESERVED & set(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved for the record itself; rename them")
        record = {"stage": stage, "step": int(step), "time": time.time(), **_plain(metrics)}
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            self._log_wandb(record, stage)

    def _log_wandb(self, record: dict, stage: str) -> None:
        if self.wandb_run is None:
            return
        try:
            if stage not in self._stages:
                self._stages.add(stage)
                self.wandb_run.define_metric(f"{stage}/step")
                self.wandb_run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            body = {k: v for k, v in record.items() if k not in ("stage", "time")}
            self.wandb_run.log(_flatten(body, stage))
        except Exception as exc:
            self._warn(f"W&B logging failed ({type(exc).__name__}: {exc}); local store continues")
            self.wandb_run = None

    def summary(self, values: dict) -> None:
        """Merge final numbers into `run_dir/summary.json` (atomic write) and the W&B summary."""
        with self._lock:
            self._summary.update(_plain(values))
            tmp = self.run_dir / (SUMMARY_FILE + ".tmp")
            tmp.write_text(json.dumps(self._summary, indent=2), encoding="utf-8")
            os.replace(tmp, self.run_dir / SUMMARY_FILE)
            if self.wandb_run is not None:
                try:
                    self.wandb_run.summary.update(_flatten(self._summary, "summary"))
                except Exception as exc:
                    self._warn(f"W&B summary failed ({type(exc).__name__}: {exc})")

    def finish(self, exit_code: int = 0) -> None:
        """Close the local file and the W&B run; safe to call twice."""
        with self._lock:
            if not self._file.closed:
                self._file.close()
            run, self.wandb_run = self.wandb_run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:
                self._warn(f"W&B finish failed ({type(exc).__name__}: {exc})")

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def read_metrics(run_dir: str | Path, stage: str | None = None) -> list[dict]:
    """Lines of `run_dir/metrics.jsonl`, optionally one stage's; safe while the run writes.

    A last line without its newline is still being written and is skipped; so is any
    line that is not valid JSON. A run that has not logged yet reads as [].
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # everything after the last newline is incomplete
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (stage is None or record.get("stage") == stage):
            out.append(record)
    return out

