"""Model registry: round trips, migrations, and two processes writing at once."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from agent_forge import registry as reg
from agent_forge.registry import Registry, forge_home


def test_forge_home_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    assert forge_home() == tmp_path / "home"
    assert Registry().path == tmp_path / "home" / "registry.sqlite"
    monkeypatch.delenv("FORGE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # platformdirs on Linux
    assert forge_home() == tmp_path / "xdg" / "agent-forge"


def test_wal_and_schema_version(tmp_path):
    r = Registry(tmp_path / "r.sqlite")
    assert r.schema_version == len(reg.MIGRATIONS)
    conn = sqlite3.connect(r.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_model_round_trip(tmp_path):
    r = Registry(tmp_path / "r.sqlite")
    parent = r.register_model("champion", 2, tmp_path / "p2", metrics={"fitness_gain": 0.25})
    child = r.register_model("baked", 3, tmp_path / "p3", parent_id=parent,
                             metrics={"baking_accuracy": 0.9, "loss": float("nan")})
    m = r.get_model(child)
    assert (m.name, m.phase, m.parent_id, m.path) == ("baked", 3, parent, str(tmp_path / "p3"))
    assert m.metrics == {"baking_accuracy": 0.9, "loss": None}  # NaN stored as JSON null
    assert m.handoff_status == "pending" and m.handoff_report is None
    assert [x.id for x in r.list_models()] == [parent, child]
    assert [x.id for x in r.list_models(phase=3)] == [child]
    r.update_handoff(child, "failed", {"checks": [{"name": "tokens", "ok": False}]})
    m = r.get_model(child)
    assert m.handoff_status == "failed" and m.handoff_report["checks"][0]["name"] == "tokens"
    r.update_metrics(child, {"anti_theater_passed": True})
    assert r.get_model(child).metrics == {"baking_accuracy": 0.9, "loss": None, "anti_theater_passed": True}
    json.dumps(r.get_model(child).to_dict(), allow_nan=False)


def test_errors(tmp_path):
    r = Registry(tmp_path / "r.sqlite")
    with pytest.raises(KeyError, match="no model with id 7"):
        r.get_model(7)
    with pytest.raises(KeyError):
        r.update_handoff(7, "passed")
    with pytest.raises(ValueError, match="handoff status"):
        r.register_model("m", 3, "x", handoff_status="great")
    with pytest.raises(sqlite3.IntegrityError):  # foreign keys are enforced
        r.register_model("orphan", 3, "x", parent_id=999)
    run = r.start_run("bake", {})
    with pytest.raises(ValueError, match="run status"):
        r.update_run(run, status="done")
    with pytest.raises(KeyError, match="no run"):
        r.get_run(run + 1)


def test_run_round_trip(tmp_path):
    r = Registry(tmp_path / "r.sqlite")
    run = r.start_run("bake", {"lr": 1e-4, "preset": "quick"})
    first = r.get_run(run)
    assert (first.kind, first.status, first.state, first.config["preset"]) == ("bake", "running", {}, "quick")
    model = r.register_model("baked", 3, "out")
    r.update_run(run, state={"step": 5}, status="paused", model_id=model)
    r.update_run(run, state={"step": 9})
    got = r.get_run(run)
    assert (got.state, got.status, got.model_id) == ({"step": 9}, "paused", model)
    assert got.updated >= first.updated
    other = r.start_run("rl", {})
    assert [x.id for x in r.list_runs()] == [run, other]
    assert [x.id for x in r.list_runs(kind="rl")] == [other]
    assert [x.id for x in r.list_runs(status="paused")] == [run]


def test_migrations_apply_once_and_in_order(tmp_path, monkeypatch):
    path = tmp_path / "r.sqlite"
    Registry(path).register_model("old", 2, "x")
    extra = "ALTER TABLE models ADD COLUMN note TEXT DEFAULT 'migrated'"
    monkeypatch.setattr(reg, "MIGRATIONS", [*reg.MIGRATIONS, extra])
    r = Registry(path)  # applies only the new step; a second apply would fail (duplicate column)
    Registry(path)
    assert r.schema_version == len(reg.MIGRATIONS)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name, note FROM models").fetchall() == [("old", "migrated")]
    conn.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    Registry(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(reg.MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Registry(path)


def _worker(path: str, tag: str, n: int, queue) -> None:
    """Each model write and run update is its own transaction, interleaving with the other process."""
    try:
        r = Registry(path)
        run = r.start_run("stress", {"tag": tag})
        ids = []
        for i in range(n):
            ids.append(r.register_model(f"{tag}-{i}", 3, f"/m/{tag}/{i}", metrics={"i": i}))
            r.update_run(run, state={"done": i + 1})
        r.update_run(run, status="completed")
        queue.put((tag, ids, None))
    except Exception as exc:  # reported to the parent, which fails the test with it
        queue.put((tag, [], repr(exc)))


@pytest.mark.timeout(120)
def test_two_processes_write_at_once(tmp_path):
    path = str(tmp_path / "shared.sqlite")  # fresh file: both processes also race to create the schema
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    n = 100
    procs = [ctx.Process(target=_worker, args=(path, tag, n, queue)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    results = [queue.get(timeout=110) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [err for _, _, err in results if err]
    assert not errors, errors
    ids = [i for _, got, _ in results for i in got]
    assert len(ids) == 2 * n and len(set(ids)) == 2 * n
    r = Registry(path)
    names = {m.name for m in r.list_models()}
    assert names == {f"{t}-{i}" for t in "ab" for i in range(n)}
    runs = r.list_runs(kind="stress")
    assert sorted(x.config["tag"] for x in runs) == ["a", "b"]
    assert all(x.status == "completed" and x.state == {"done": n} for x in runs)


def _open_at_barrier(path: str, barrier, queue) -> None:
    try:
        barrier.wait()
        Registry(path)
        queue.put(None)
    except Exception as exc:
        queue.put(repr(exc))


@pytest.mark.timeout(120)
def test_many_processes_create_the_same_fresh_file(tmp_path):
    """Regression: switching a fresh file to WAL from several processes at once deadlocks
    inside SQLite, which answers "database is locked" without waiting on busy_timeout.
    Before the retry this failed about one open in 40 (13 of 480 here)."""
    ctx = mp.get_context("fork")  # the child touches only sqlite3; fork keeps 80 opens cheap
    errors = []
    for trial in range(10):
        path = str(tmp_path / f"fresh{trial}.sqlite")
        queue, barrier = ctx.Queue(), ctx.Barrier(8)
        procs = [ctx.Process(target=_open_at_barrier, args=(path, barrier, queue)) for _ in range(8)]
        for p in procs:
            p.start()
        errors += [e for e in (queue.get(timeout=60) for _ in procs) if e]
        for p in procs:
            p.join(timeout=30)
    assert not errors, errors


def test_cli_list_and_show(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from agent_forge.registry_commands import registry_app

    monkeypatch.setenv("FORGE_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    r = Registry()
    parent = r.register_model("champion", 2, "/m/p2", metrics={"fitness_gain": 0.25})
    child = r.register_model("baked", 3, "/m/p3", parent_id=parent, metrics={"baking_accuracy": 0.875})
    r.update_handoff(child, "passed", {"checks": [{"name": "thinking_tokens", "ok": True, "message": "12 present"}]})
    runner = CliRunner()

    out = runner.invoke(registry_app, ["list", "--json"])
    assert out.exit_code == 0, out.output
    assert [m["name"] for m in json.loads(out.output)] == ["champion", "baked"]
    out = runner.invoke(registry_app, ["list", "--phase", "3"])
    assert out.exit_code == 0 and "baked" in out.output and "champion" not in out.output

    out = runner.invoke(registry_app, ["show", str(child), "--json"])
    shown = json.loads(out.output)
    assert shown["lineage"] == [{"id": parent, "name": "champion", "phase": 2}]
    assert shown["metrics"] == {"baking_accuracy": 0.875}
    out = runner.invoke(registry_app, ["show", str(child)])
    assert out.exit_code == 0 and "0.875" in out.output and "thinking_tokens" in out.output

    out = runner.invoke(registry_app, ["show", "99"])
    assert out.exit_code == 1 and "no model with id 99" in out.output

    r.start_run("bake", {"preset": "quick"})
    out = runner.invoke(registry_app, ["runs", "--json"])
    assert json.loads(out.output)[0]["config"] == {"preset": "quick"}


def test_several_parents_recorded_in_order(tmp_path):
    """A merge has N parents: all kept, in order; the first is also parent_id; a model with
    one parent answers from parent_id."""
    r = reg.Registry(tmp_path / "r.db")
    a, b, c = (r.register_model(n, 2, tmp_path / n) for n in ("a", "b", "c"))
    merged = r.register_model("champion", 2, tmp_path / "m")
    r.add_parents(merged, [c, a, b])
    assert r.parents(merged) == [c, a, b]
    assert r.get_model(merged).parent_id == c
    child = r.register_model("baked", 3, tmp_path / "x", parent_id=merged)
    assert r.parents(child) == [merged] and r.parents(a) == []


def test_version_1_registry_migrates_to_lineage(tmp_path):
    """A registry written before the lineage table keeps its rows and gains the table."""
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(reg.MIGRATIONS[0])
    conn.execute("INSERT INTO models (name, phase, path, created) VALUES ('old', 3, '/x', 'then')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    r = reg.Registry(path)
    assert r.schema_version == len(reg.MIGRATIONS) == 2
    assert r.list_models()[0].name == "old" and r.parents(1) == []


def test_lineage_command_prints_every_parent_of_a_merge(tmp_path):
    """`forge registry lineage`: the champion, its three parents and their common ancestor,
    as a tree and as JSON; an unknown id is one clear error."""
    from typer.testing import CliRunner

    from agent_forge.cli import app

    db = tmp_path / "r.db"
    r = reg.Registry(db)
    base = r.register_model("input:default", 0, tmp_path / "base")
    parents = [r.register_model(f"parent-{k}", 2, tmp_path / f"p{k}", parent_id=base) for k in range(3)]
    champion = r.register_model("champion", 2, tmp_path / "m")
    r.add_parents(champion, parents)
    baked = r.register_model("baked", 3, tmp_path / "q", parent_id=champion)
    res = CliRunner().invoke(app, ["registry", "lineage", str(baked), "--db", str(db)])
    assert res.exit_code == 0, res.output
    for name in ("baked", "champion", "parent-0", "parent-1", "parent-2", "input:default"):
        assert name in res.output
    tree = json.loads(CliRunner().invoke(app, ["registry", "lineage", str(baked), "--db", str(db), "--json"]).stdout)
    assert [p["name"] for p in tree["parents"][0]["parents"]] == ["parent-0", "parent-1", "parent-2"]
    assert all(p["parents"][0]["name"] == "input:default" for p in tree["parents"][0]["parents"])
    bad = CliRunner().invoke(app, ["registry", "lineage", "999", "--db", str(db)])
    assert bad.exit_code == 1


def test_relative_paths_are_stored_absolute_so_run_folders_do_not_collide(tmp_path, monkeypatch):
    """Two checkouts each with runs/demo/model share one registry: each run finds its own row."""
    r = Registry(tmp_path / "r.sqlite")
    ids = {}
    for clone in ("a", "b"):
        (tmp_path / clone / "runs" / "demo" / "model").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / clone)
        ids[clone] = r.register_model(f"p3-{clone}", 3, "runs/demo/model")
        assert r.get_model(ids[clone]).path == str(tmp_path / clone / "runs" / "demo" / "model")
    monkeypatch.chdir(tmp_path / "a")
    assert r.find_by_path("runs/demo/model", phase=3) == ids["a"]  # not b's, though b's is newer
    hub = r.register_model("input", 0, "HuggingFaceTB/SmolLM2-135M")  # not a local path: kept as given
    assert r.get_model(hub).path == "HuggingFaceTB/SmolLM2-135M"
