"""SQLite model registry: which model came from which, where it lives, what it scored.

Every phase, the job server and the CLI write here, sometimes from several processes at
once, so the database runs in WAL mode (readers never block the writer), every
connection waits up to `BUSY_TIMEOUT_S` for a lock instead of failing with "database is
locked", and every write is one short `BEGIN IMMEDIATE` transaction (the write lock is
taken up front, so two writers cannot deadlock upgrading read locks).

One connection per operation keeps the class safe to share between threads and to use
after `fork`; opening an SQLite file costs well under a millisecond.

The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` takes version i to
i + 1. Append to the list, never edit an entry that has shipped.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from agent_forge.config import forge_home  # re-exported: one definition of FORGE_HOME

BUSY_TIMEOUT_S = 30.0
HANDOFF_STATUSES = ("pending", "passed", "failed")
RUN_STATUSES = ("queued", "running", "paused", "completed", "failed", "cancelled")

MIGRATIONS: list[str] = [
    # 0 -> 1: models and runs
    """
    CREATE TABLE models (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        phase INTEGER NOT NULL,
        parent_id INTEGER REFERENCES models(id),
        path TEXT NOT NULL,
        metrics TEXT NOT NULL DEFAULT '{}',
        handoff_status TEXT NOT NULL DEFAULT 'pending',
        handoff_report TEXT,
        created TEXT NOT NULL
    );
    CREATE INDEX models_phase ON models(phase);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        config TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL,
        started TEXT NOT NULL,
        updated TEXT NOT NULL,
        model_id INTEGER REFERENCES models(id)
    );
    CREATE INDEX runs_kind ON runs(kind);
    """,
    # 1 -> 2: lineage with several parents (a Phase 2 merge has N); parent_id stays the first
    """
    CREATE TABLE model_parents (
        model_id INTEGER NOT NULL REFERENCES models(id),
        parent_id INTEGER NOT NULL REFERENCES models(id),
        position INTEGER NOT NULL,
        PRIMARY KEY (model_id, parent_id)
    );
    """,
]


def default_registry_path() -> Path:
    """FORGE_HOME/registry.sqlite; FORGE_HOME is $FORGE_HOME, else the user cache dir."""
    return forge_home() / "registry.sqlite"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (strict JSON has no NaN), odd types become str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _clean(value.item())
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(_clean(value or {}), sort_keys=True, allow_nan=False)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


@dataclass(frozen=True)
class ModelEntry:
    id: int
    name: str
    phase: int
    parent_id: int | None
    path: str
    metrics: dict
    handoff_status: str
    handoff_report: dict | None
    created: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunEntry:
    id: int
    kind: str
    config: dict
    state: dict
    status: str
    started: str
    updated: str
    model_id: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def _model(row: sqlite3.Row) -> ModelEntry:
    d = dict(row)
    d["metrics"] = _loads(d["metrics"]) or {}
    d["handoff_report"] = _loads(d["handoff_report"])
    return ModelEntry(**d)


def _run(row: sqlite3.Row) -> RunEntry:
    d = dict(row)
    d["config"] = _loads(d["config"]) or {}
    d["state"] = _loads(d["state"]) or {}
    return RunEntry(**d)


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")


class Registry:
    """The model registry at `path` (default: FORGE_HOME/registry.sqlite)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_registry_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    # -- connections and schema -----------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; the write lock is taken at BEGIN."""
        conn = self._open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._open()
        try:
            yield conn
        finally:
            conn.close()

    def _enable_wal(self) -> None:
        """Switch the file to WAL (persistent). Two processes switching a fresh file at once
        can deadlock inside SQLite, which then returns "locked" at once without waiting on
        busy_timeout, so retry with jitter until BUSY_TIMEOUT_S has passed."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                with self._read() as conn:
                    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    def _migrate(self) -> None:
        self._enable_wal()
        with self._write() as conn:  # re-read the version under the lock: another process may have migrated
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"registry {self.path} has schema version {version}, newer than this "
                    f"agent_forge knows ({len(MIGRATIONS)}); upgrade agent_forge"
                )
            for number in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    # -- models ---------------------------------------------------------------------

    def register_model(self, name: str, phase: int, path: str | Path, parent_id: int | None = None,
                       metrics: dict | None = None, handoff_status: str = "pending") -> int:
        _check(handoff_status, HANDOFF_STATUSES, "handoff status")
        # A local path is stored absolute: the registry is shared by every checkout and run
        # folder, and "runs/demo/model" names a different model in each. Hub ids stay as given.
        stored = str(Path(path).resolve()) if Path(path).exists() else str(path)
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO models (name, phase, parent_id, path, metrics, handoff_status, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, int(phase), parent_id, stored, _dumps(metrics), handoff_status, _now()),
            )
            return int(cur.lastrowid)

    def add_parents(self, model_id: int, parent_ids: list[int]) -> None:
        """Record every parent of a model made from several (a merge), in order; the first
        is also the model's `parent_id`."""
        with self._write() as conn:
            for position, parent in enumerate(parent_ids):
                conn.execute("INSERT OR REPLACE INTO model_parents (model_id, parent_id, position) VALUES (?, ?, ?)",
                             (model_id, parent, position))
            if parent_ids:
                conn.execute("UPDATE models SET parent_id = ? WHERE id = ?", (parent_ids[0], model_id))

    def parents(self, model_id: int) -> list[int]:
        """All parents of a model: the recorded list, else its single `parent_id`."""
        with self._read() as conn:
            rows = conn.execute("SELECT parent_id FROM model_parents WHERE model_id = ? ORDER BY position",
                                (model_id,)).fetchall()
            if rows:
                return [int(r[0]) for r in rows]
            row = conn.execute("SELECT parent_id FROM models WHERE id = ?", (model_id,)).fetchone()
        return [int(row[0])] if row and row[0] is not None else []

    def find_by_path(self, path: str | Path, phase: int | None = None) -> int | None:
        """The newest model stored at `path` (resolved), in `phase` if given: how a phase
        finds its input's row to record lineage."""
        where = Path(path).resolve()
        return next((m.id for m in reversed(self.list_models(phase)) if Path(m.path).resolve() == where), None)

    def get_model(self, model_id: int) -> ModelEntry:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
        if row is None:
            raise KeyError(f"no model with id {model_id} in {self.path}")
        return _model(row)

    def list_models(self, phase: int | None = None) -> list[ModelEntry]:
        query, args = "SELECT * FROM models", ()
        if phase is not None:
            query, args = query + " WHERE phase = ?", (int(phase),)
        with self._read() as conn:
            return [_model(r) for r in conn.execute(query + " ORDER BY id", args)]

    def update_handoff(self, model_id: int, status: str, report: dict | None = None) -> None:
        _check(status, HANDOFF_STATUSES, "handoff status")
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE models SET handoff_status = ?, handoff_report = ? WHERE id = ?",
                (status, None if report is None else _dumps(report), model_id),
            )
            if cur.rowcount == 0:
                raise KeyError(f"no model with id {model_id} in {self.path}")

    def update_metrics(self, model_id: int, metrics: dict) -> None:
        """Merge `metrics` into the model's stored metrics (read and write under one lock)."""
        with self._write() as conn:
            row = conn.execute("SELECT metrics FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is None:
                raise KeyError(f"no model with id {model_id} in {self.path}")
            merged = {**(_loads(row[0]) or {}), **metrics}
            conn.execute("UPDATE models SET metrics = ? WHERE id = ?", (_dumps(merged), model_id))

    # -- runs -----------------------------------------------------------------------

    def start_run(self, kind: str, config: dict | None = None, model_id: int | None = None,
                  status: str = "running") -> int:
        _check(status, RUN_STATUSES, "run status")
        now = _now()
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO runs (kind, config, state, status, started, updated, model_id)"
                " VALUES (?, ?, '{}', ?, ?, ?, ?)",
                (kind, _dumps(config), status, now, now, model_id),
            )
            return int(cur.lastrowid)

    def update_run(self, run_id: int, state: dict | None = None, status: str | None = None,
                   model_id: int | None = None) -> None:
        """Replace the run's state (when given), set status / model; always bumps `updated`."""
        sets, args = ["updated = ?"], [_now()]
        if state is not None:
            sets.append("state = ?")
            args.append(_dumps(state))
        if status is not None:
            _check(status, RUN_STATUSES, "run status")
            sets.append("status = ?")
            args.append(status)
        if model_id is not None:
            sets.append("model_id = ?")
            args.append(model_id)
        with self._write() as conn:
            cur = conn.execute(f"UPDATE runs SET {', '.join(sets)} WHERE id = ?", (*args, run_id))
            if cur.rowcount == 0:
                raise KeyError(f"no run with id {run_id} in {self.path}")

    def get_run(self, run_id: int) -> RunEntry:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run with id {run_id} in {self.path}")
        return _run(row)

    def list_runs(self, kind: str | None = None, status: str | None = None) -> list[RunEntry]:
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        query = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        with self._read() as conn:
            return [_run(r) for r in conn.execute(query + " ORDER BY id", args)]
