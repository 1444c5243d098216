"""The typer command functions print one JSON object with --json, and a table otherwise."""

import json

import typer
from typer.testing import CliRunner

from agent_forge.data.evalsets import EvalItem
from agent_forge.evaluation import commands
from test_inference import MEMORY, memorised_model

ITEMS = [EvalItem(f"m{i}", q, r, "arith") for i, (q, (_, r, _)) in enumerate(MEMORY.items())]


def _app(monkeypatch):
    import agent_forge.data.evalsets as evalsets
    import agent_forge.models as models

    monkeypatch.setattr(models, "load_model", lambda spec, device=None: memorised_model())
    monkeypatch.setattr(evalsets, "load_eval_set", lambda name, limit=None: ITEMS[:limit] if limit else ITEMS)
    app = typer.Typer()
    app.command("eval")(commands.eval_cmd)
    app.command("anti-theater")(commands.anti_theater_cmd)
    app.command("ab")(commands.ab_cmd)
    return app


def test_eval_json_is_one_object(monkeypatch):
    res = CliRunner().invoke(_app(monkeypatch), ["eval", "--model", "x", "--data", "y", "--thoughts", "on",
                                                 "--max-new-tokens", "24", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["accuracy"] == 1.0 and out["n"] == 3 and len(out["ci95"]) == 2
    assert {"per_family", "ms_per_example"} <= set(out)


def test_eval_table_and_bad_thoughts(monkeypatch):
    app = _app(monkeypatch)
    res = CliRunner().invoke(app, ["eval", "--model", "x", "--data", "y", "--thoughts", "off",
                                   "--limit", "2", "--max-new-tokens", "8"])
    assert res.exit_code == 0 and "0.0%" in res.stdout
    bad = CliRunner().invoke(app, ["eval", "--thoughts", "maybe"])
    assert bad.exit_code == 2


def test_anti_theater_and_ab_json(monkeypatch):
    app = _app(monkeypatch)
    res = CliRunner().invoke(app, ["anti-theater", "--model", "x", "--data", "y", "--json"])
    out = json.loads(res.stdout)
    assert [t["name"] for t in out["tests"]] == ["divergence", "ablation", "correlation"]
    assert res.exit_code == (0 if out["passed"] else 1)
    res = CliRunner().invoke(app, ["ab", "--baseline", "x", "--candidate", "x", "--data", "y",
                                   "--rounds", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["winner"] == "tie" and out["rounds"] == 1


def test_eval_exclude_seen_leaves_out_trained_questions(monkeypatch, tmp_path):
    seen = tmp_path / "train.jsonl"
    seen.write_text(json.dumps({"question": ITEMS[0].question}) + "\n")
    res = CliRunner().invoke(_app(monkeypatch), ["eval", "--model", "x", "--data", "y", "--thoughts", "on",
                                                 "--max-new-tokens", "24", "--exclude-seen", str(seen), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n"] == len(ITEMS) - 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no question here"}\n')
    res = CliRunner().invoke(_app(monkeypatch), ["eval", "--model", "x", "--data", "y", "--exclude-seen", str(bad)])
    assert res.exit_code == 2 and "--exclude-seen" in res.output and "'question' field" in res.output
