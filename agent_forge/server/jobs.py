"""Job records and their worker processes.

A job is one row of the registry's `runs` table (kind "job:<kind>"), so jobs survive a
server restart: on start, jobs the old server left "running" are marked "paused" with a
note, and their orphaned workers are stopped; `resume` continues them from the last
checkpoint. Workers are separate processes (`agent_forge.server.worker`) in their own
process group; the server only starts, watches and signals them.

Kinds: slices of Phase 3 (step1, step2, anti_theater, complete; worker.py) and whole
phases or the chain (cognate, evomerge, bitnet, run; phases.py).

Statuses: running -> completed | failed (worker exit code), running -> paused (pause),
paused | failed -> running (resume), anything not finished -> cancelled (cancel).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from agent_forge.registry import Registry
from agent_forge.server import phases
from agent_forge.server.checks import PATH_FIELDS, OverrideRejected, confine_overrides, type_errors
from agent_forge.server.paths import PathRejected, confine

QUIETSTAR_KINDS = ("step1", "step2", "anti_theater", "complete")
KINDS = QUIETSTAR_KINDS + phases.PHASE_KINDS
RESUMABLE = ("step1", "step2", "complete") + phases.PHASE_KINDS  # an anti-theater run has no checkpoints
NEEDS_STEP1 = ("step2", "anti_theater")
KIND_PREFIX = "job:"
ACTIVE = ("queued", "running")
RESERVED_OVERRIDES = ("model", "out", "registry", "device", "preset")
# Phase 3 overrides the worker reads files from (evalsets names or paths; checks.PATH_FIELDS)
DATASET_FIELDS = tuple(k for k, how in PATH_FIELDS["quietstar"].items() if how == "dataset")
DATASET_LIST_FIELDS = tuple(k for k, how in PATH_FIELDS["quietstar"].items() if how == "datasets")
WORKER_MODULE = "agent_forge.server.worker"
SECRET_ENV = ("FORGE_API_TOKEN",)


class JobError(Exception):
    """A request the job manager refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class JobSettings:
    registry: Path
    out_roots: list[Path]  # where run directories may be written
    model_roots: list[Path]  # where input models (and eval JSONL files) may be read
    max_running: int = 2
    python: str = sys.executable
    stop_timeout_s: float = 20.0
    extra_env: dict = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def step2_available() -> bool:
    """Step 2 jobs need the RL trainer (agent_forge.quietstar.rl); found without importing torch."""
    from importlib.util import find_spec

    return find_spec("agent_forge.quietstar.rl") is not None


def validate_overrides(preset: str, overrides: dict) -> None:
    """Raise JobError(400) for unknown fields or wrong types, before any worker starts."""
    from agent_forge.config import update_dataclass
    from agent_forge.quietstar.pipeline import make_config

    bad = sorted(set(overrides) & set(RESERVED_OVERRIDES))
    if bad:
        raise JobError(400, f"overrides may not set {', '.join(bad)}: they are request fields")
    try:
        base = make_config(preset)
        update_dataclass(base, overrides, "pipeline config")
    except ValueError as e:
        raise JobError(400, str(e)) from None
    errors = type_errors(base, overrides, "overrides")
    if errors:
        raise JobError(400, "; ".join(errors[:5]))


class JobManager:
    """Starts, watches, pauses, resumes and cancels worker processes; records jobs in the registry."""

    def __init__(self, settings: JobSettings):
        self.settings = settings
        self.registry = Registry(settings.registry)
        self._procs: dict[int, subprocess.Popen] = {}
        self._waiters: dict[int, threading.Thread] = {}
        self._intent: dict[int, str] = {}
        self._lock = threading.RLock()

    # -- reading ------------------------------------------------------------------------
    def _entry(self, job_id: int):
        try:
            entry = self.registry.get_run(job_id)
        except KeyError:
            raise JobError(404, f"no job {job_id}") from None
        if not entry.kind.startswith(KIND_PREFIX):
            raise JobError(404, f"no job {job_id} (run {job_id} is not an API job)")
        return entry

    def get(self, job_id: int) -> dict:
        return self._view(self._entry(job_id))

    def list(self, status: str | None = None, kind: str | None = None) -> list[dict]:
        entries = self.registry.list_runs(kind=KIND_PREFIX + kind if kind else None, status=status)
        return [self._view(e) for e in entries if e.kind.startswith(KIND_PREFIX)]

    def _view(self, entry) -> dict:
        spec, state = entry.config, entry.state
        return {"id": entry.id, "kind": entry.kind[len(KIND_PREFIX):], "status": entry.status,
                "model": spec.get("model"), "out": spec.get("out"), "preset": spec.get("preset"),
                "overrides": spec.get("overrides") or {}, "created": entry.started, "updated": entry.updated,
                "attempts": state.get("attempts", 0), "pid": state.get("pid"),
                "returncode": state.get("returncode"), "note": state.get("note"), "log": state.get("log"),
                "progress": _progress(spec) if spec.get("out") else None}

    def log_tail(self, job_id: int, lines: int) -> list[str]:
        log = self._entry(job_id).state.get("log")
        if not log or not Path(log).exists():
            return []
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
        return text.splitlines()[-lines:]

    # -- validation ---------------------------------------------------------------------
    def _check_request(self, req: dict) -> dict:
        kind = req["kind"]
        if kind not in KINDS:
            raise JobError(400, f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        if kind == "step2" and not step2_available():
            raise JobError(501, "Step 2 (Quiet-STaR RL) is not available in this version of agent_forge")
        preset = req.get("preset") or "quick"
        try:
            out = confine(req["out"], self.settings.out_roots, "out")
            model = self._check_model(kind, req.get("model"))
            spec = {"kind": kind, "model": model, "out": str(out), "preset": preset,
                    "overrides": dict(req.get("overrides") or {}), "device": req.get("device"),
                    "registry": str(self.settings.registry)}
            if out.exists() and not out.is_dir():
                raise JobError(400, f"out {str(out)!r} exists and is not a directory")
            roots = self.settings.model_roots + self.settings.out_roots
            if kind in phases.PHASE_KINDS:
                return phases.check_request(kind, spec, self.settings.model_roots, roots)
            spec["overrides"] = confine_overrides("quietstar", spec["overrides"], self.settings.model_roots, roots)
        except (PathRejected, OverrideRejected) as e:
            raise JobError(400, str(e)) from None
        phases.check_out("quietstar", out)
        if kind in NEEDS_STEP1 and "step1" not in self._stages_done(out):
            raise JobError(409, f"{kind} needs Step 1 finished in {out}; start a step1 job there first")
        validate_overrides(preset, spec["overrides"])
        return spec

    def _check_model(self, kind: str, model: str | None) -> str | None:
        """The input model, confined and existing ('default' as is); evomerge may have none, cognate has none."""
        if kind == "cognate":
            if model is not None:
                raise JobError(400, "a cognate job trains from scratch and takes no model")
            return None
        if model is None:
            if kind != "evomerge":
                raise JobError(400, f"a {kind} job needs a model")
            return None
        if model == "default":
            return model
        path = confine(model, self.settings.model_roots, "model")
        if not path.exists():
            raise JobError(400, f"model {model!r} does not exist")
        return str(path)

    @staticmethod
    def _stages_done(out: Path) -> set[str]:
        try:
            return set(json.loads((out / "pipeline_state.json").read_text())["stages"])
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def _check_capacity(self, out: str, job_id: int | None = None) -> None:
        running = [j for j in self.registry.list_runs(status="running") if j.kind.startswith(KIND_PREFIX)]
        clash = [j for j in running if j.id != job_id and j.config.get("out") and _overlap(j.config["out"], out)]
        if clash:
            raise JobError(409, f"job {clash[0].id} is already running in {clash[0].config['out']}")
        if len(running) >= self.settings.max_running:
            raise JobError(409, f"{len(running)} jobs running (the limit is {self.settings.max_running}); "
                                "pause or wait for one")

    # -- actions ------------------------------------------------------------------------
    def submit(self, req: dict) -> dict:
        spec = self._check_request(req)
        with self._lock:
            self._check_capacity(spec["out"])
            job_id = self.registry.start_run(KIND_PREFIX + spec["kind"], config=spec, status="queued")
            self._launch(job_id, spec, {})
        return self.get(job_id)

    def _launch(self, job_id: int, spec: dict, state: dict) -> None:
        out = Path(spec["out"])
        out.mkdir(parents=True, exist_ok=True)
        log = out / f"job-{job_id}.log"
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env.update({"PYTHONUNBUFFERED": "1", **self.settings.extra_env})
        cmd = [self.settings.python, "-m", WORKER_MODULE, json.dumps({**spec, "job_id": job_id})]
        with open(log, "ab") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        state = {**state, "pid": proc.pid, "log": str(log), "attempts": state.get("attempts", 0) + 1,
                 "returncode": None, "note": None, "launched": _now()}
        self.registry.update_run(job_id, state=state, status="running")
        self._procs[job_id] = proc
        waiter = threading.Thread(target=self._wait, args=(job_id, proc, state), daemon=True,
                                  name=f"forge-job-{job_id}")
        self._waiters[job_id] = waiter
        waiter.start()

    def _wait(self, job_id: int, proc: subprocess.Popen, state: dict) -> None:
        rc = proc.wait()
        with self._lock:
            intent = self._intent.pop(job_id, None)
            self._procs.pop(job_id, None)
            status = None if rc == 0 else {"pause": "paused", "cancel": "cancelled"}.get(intent)
            kind = self._kind_of(job_id)
            note = {"paused": phases.PAUSE_NOTES.get(kind, "paused: resume continues from the last checkpoint "
                                                     "(later steps are redone)"),
                    "cancelled": "cancelled"}.get(status)
            if status is None:  # it ended by itself (a job that finished as it was paused counts as done)
                status = "completed" if rc == 0 else "failed"
                note = None if rc == 0 else self._failure_note(rc, state)
            self.registry.update_run(job_id, state={**state, "returncode": rc, "note": note, "ended": _now()},
                                     status=status)

    def _kind_of(self, job_id: int) -> str:
        try:
            return self.registry.get_run(job_id).kind[len(KIND_PREFIX):]
        except KeyError:
            return ""

    def _failure_note(self, rc: int, state: dict) -> str:
        from agent_forge.server.worker import EXIT_UNAVAILABLE

        if rc == EXIT_UNAVAILABLE:
            return "the stage is not available in this version (see the log)"
        tail = []
        try:
            tail = Path(state["log"]).read_text(errors="replace").splitlines()[-3:]
        except OSError:
            pass
        return f"worker exited with code {rc}: " + " | ".join(tail)

    def _stop(self, job_id: int, intent: str) -> None:
        """Signal the worker's process group and wait until its waiter has recorded the end."""
        with self._lock:
            proc = self._procs.get(job_id)
            if proc is None:
                return
            self._intent[job_id] = intent
            _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.settings.stop_timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
        waiter = self._waiters.pop(job_id, None)
        if waiter is not None:
            waiter.join(timeout=self.settings.stop_timeout_s)

    def pause(self, job_id: int) -> dict:
        entry = self._entry(job_id)
        kind = entry.kind[len(KIND_PREFIX):]
        if entry.status != "running":
            raise JobError(409, f"job {job_id} is {entry.status}; only a running job can be paused")
        if kind not in RESUMABLE:
            raise JobError(409, f"{kind} jobs keep no checkpoints and cannot be paused; cancel instead")
        if job_id in self._procs:
            self._stop(job_id, "pause")
        else:  # left running by another server process: nothing here to signal
            self.registry.update_run(job_id, state={**entry.state, "note": "paused (no live worker)"},
                                     status="paused")
        return self.get(job_id)

    def resume(self, job_id: int) -> dict:
        entry = self._entry(job_id)
        if entry.status not in ("paused", "failed"):
            raise JobError(409, f"job {job_id} is {entry.status}; only a paused or failed job can be resumed")
        with self._lock:
            self._check_capacity(entry.config["out"], job_id)
            self._launch(job_id, entry.config, entry.state)
        return self.get(job_id)

    def cancel(self, job_id: int) -> dict:
        entry = self._entry(job_id)
        if entry.status in ("completed", "cancelled"):
            raise JobError(409, f"job {job_id} is already {entry.status}")
        if entry.status == "running" and job_id in self._procs:
            self._stop(job_id, "cancel")
        else:
            self.registry.update_run(job_id, state={**entry.state, "note": "cancelled"}, status="cancelled")
        return self.get(job_id)

    # -- server life --------------------------------------------------------------------
    def recover(self) -> list[int]:
        """Mark jobs a previous server left running as paused; stop their orphaned workers."""
        recovered = []
        for entry in self.registry.list_runs():
            if not entry.kind.startswith(KIND_PREFIX) or entry.status not in ACTIVE or entry.id in self._procs:
                continue
            pid = entry.state.get("pid")
            if pid and _is_our_worker(pid):
                _signal_group(pid, signal.SIGTERM)
            note = "interrupted: the server stopped; resume continues from the last checkpoint"
            self.registry.update_run(entry.id, state={**entry.state, "note": note}, status="paused")
            recovered.append(entry.id)
        return recovered

    def shutdown(self) -> None:
        """Pause every running job (the server is going away and cannot watch them)."""
        for job_id in list(self._procs):
            self._stop(job_id, "pause")


def _progress(spec: dict) -> dict:
    """What the Job view shows: a phase job's stages from its state file, Phase 3's (with the
    Step 1 / Step 2 step counts) as the dashboard reads them."""
    kind = spec.get("kind")
    if kind in phases.PHASE_KINDS:
        return phases.progress(kind, spec["out"], spec.get("overrides") or {})
    from agent_forge.dashboard.data import run_progress

    return run_progress(spec["out"])


def _overlap(a: str, b: str) -> bool:
    """Whether two run directories are the same or one holds the other (a chain's phase dirs)."""
    pa, pb = Path(a), Path(b)
    return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the worker leads its own session, so its group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


def _is_our_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return WORKER_MODULE.encode() in cmdline
