"""commands.py / stats.py: the typer commands end to end on small inputs."""

import json

import typer
from typer.testing import CliRunner

from agent_forge.data.commands import data_app
from agent_forge.data.schema import Record, Segment, read_records
from agent_forge.data.stats import dataset_stats

runner = CliRunner()


def _app():
    app = typer.Typer()
    app.add_typer(data_app, name="data")
    return app


def test_build_gym_then_stats(tmp_path):
    out = tmp_path / "d.jsonl"
    res = runner.invoke(_app(), ["data", "build", "--source", "gym", "--n", "40", "--out", str(out),
                                 "--families", "chain_sum,simple_equations"])
    assert res.exit_code == 0, res.output
    recs = list(read_records(out))
    assert len(recs) == 40 and {r.family for r in recs} == {"chain_sum", "simple_equations"}
    res = runner.invoke(_app(), ["data", "stats", str(out), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["records"] == 40 and s["source"] == {"gym": 40} and s["strategy_records"]["step"] == 40


def test_unknown_source_fails(tmp_path):
    res = runner.invoke(_app(), ["data", "build", "--source", "nope", "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2


def test_stats_counts_by_hand():
    recs = [Record("a", "q", [Segment("step", "1 + 1 = 2"), Segment("doubt", "2 - 1 = 1")], "2", "2", "gym",
                   family="f", cost_usd=0.5),
            Record("b", "q", [Segment("step", "x"), Segment("step", "y")], "1", "1", "api", teacher="m", cost_usd=0.25)]
    s = dataset_stats(recs)
    assert s["strategy_records"]["step"] == 2 and s["strategy_segments"]["step"] == 3
    assert s["strategy_records"]["doubt"] == 1 and s["strategy_share"]["doubt"] == 0.5
    assert s["source"] == {"gym": 1, "api": 1} and s["teacher"] == {"m": 1}
    assert s["cost_usd"] == 0.75 and s["segments_mean"] == 2.0
