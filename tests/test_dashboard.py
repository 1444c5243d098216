"""Dashboard data loading and the Streamlit page (AppTest) on a run written by the real writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_forge.dashboard import data
from agent_forge.registry import Registry
from agent_forge.tracking import Tracker

APP = str(Path(data.__file__).with_name("app.py"))


def make_run(root: Path, bake_steps: int = 12, rl_steps: int = 5, finished: bool = True) -> Path:
    """A run dir as the pipeline writes it: metrics.jsonl via Tracker, pipeline_state.json, a checkpoint."""
    from agent_forge.quietstar.pipeline import PipelineState

    run = root / "runs" / "demo"
    with Tracker(run, mode="disabled") as tr:
        for s in range(1, bake_steps + 1):
            tr.log({"loss": 3.0 / s, "grad_norm": 1.0, "lr": 1e-4, "sec_per_step": 0.1}, step=s, stage="bake")
        tr.log({"token_accuracy": 0.5, "acc_step": 0.4}, step=bake_steps, stage="bake_eval")
        for s in range(1, rl_steps + 1):
            tr.log({"reward_mean": 0.1 * s, "reward_rolling": 0.05 * s, "coherence_semantic": 0.5,
                    "coherence_syntactic": 0.6, "coherence_predictive": 0.7, "coherence_composite": 0.59,
                    "thought_length": 12.0, "kl": 0.01}, step=s, stage="rl")
    (run / "pipeline_config.json").write_text(json.dumps({"bake": {"steps": 20}, "rl": {"steps": 10}}))
    state = PipelineState(run, resume=False)
    state.record("validate_input", {"ok": True})
    state.record("step1", {"steps": bake_steps, "baking_accuracy": 0.873, "accuracy_thinking_on": 0.625,
                           "accuracy_thinking_off": 0.5,
                           "usage": {"n": 16, "token_rate": {"[thinking]": 1.0, "<step>": 0.75, "<doubt>": 0.25},
                                     "well_formed_rate": 0.5, "closed_rate": 0.75}})
    if finished:
        state.record("anti_theater", {"tests": [
            {"name": "divergence", "value": 0.41, "threshold": 0.3, "passed": True},
            {"name": "ablation", "value": 1.5, "threshold": 2.0, "passed": False}],
            "passed": False, "recommendation": "roll back", "sentence": "Ablation too small."})
        state.record("ab_test", {"baseline": {"name": "base", "per_round": [0.5, 0.25]},
                                 "candidate": {"name": "cand", "per_round": [0.75, 0.5]},
                                 "diff_points": 25.0, "diff_ci_points": [5.0, 45.0], "mcnemar": {"p": 0.03},
                                 "winner": "candidate", "sentence": "cand wins"})
        state.record("handoff", {"ok": False, "checks": [{"name": "baking_accuracy", "ok": True, "message": "fine"},
                                                         {"name": "anti_theater_passed", "ok": False,
                                                          "message": "roll back"}]})
    ckpt = run / "step1" / "checkpoints" / "step-0000008"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 8}))
    return run


def test_stage_order_matches_the_pipeline():
    from agent_forge.quietstar.pipeline import STAGES

    assert data.STAGE_ORDER == tuple(name for name, _ in STAGES)


def test_find_runs_and_progress(tmp_path):
    run = make_run(tmp_path, bake_steps=12, rl_steps=5, finished=False)
    (tmp_path / "runs" / "not-a-run").mkdir()
    assert data.find_runs(tmp_path / "runs") == [run]
    prog = data.run_progress(run)
    assert prog["step1"] == {"step": 12, "steps": 20}  # from step1's result
    assert prog["step2"] == {"step": 5, "steps": 10}  # from the rl metrics vs the config
    assert prog["stages_done"] == ["validate_input", "step1"] and not prog["finished"]
    assert data.run_status(run) == "running"
    assert data.run_status(run, now=data.last_modified(run) + 10 * data.ACTIVE_SECONDS) == "stopped"
    assert [c["step"] for c in data.checkpoints(run)] == [8]


def test_curves_keep_the_newest_value_of_a_redone_step(tmp_path):
    records = [{"stage": "bake", "step": 1, "loss": 3.0}, {"stage": "bake", "step": 2, "loss": 2.0},
               {"stage": "bake", "step": 2, "loss": 1.5}, {"stage": "rl", "step": 1, "reward_mean": 0.2}]
    frame = data.curve(records, ("loss", "absent"), "bake")
    assert list(frame.columns) == ["loss"] and frame["loss"].tolist() == [3.0, 1.5]
    assert data.curve(records, ("loss",), "rl") is None


def test_headline_and_usage(tmp_path):
    stages = data.load_stages(make_run(tmp_path))
    h = data.headline(stages)
    assert h["baking_accuracy"] == 0.873 and h["anti_theater_passed"] is False and h["ab_winner"] == "candidate"
    assert data.token_usage(stages) == {"[thinking]": 1.0, "<step>": 0.75, "<doubt>": 0.25}
    assert data.ab_rounds(stages)["cand"].tolist() == [75.0, 50.0]
    assert h["accuracy_thinking_on"] == 0.625 and h["accuracy_source"] == "validation"
    # a rolled-back Step 2 never supplies the headline; a kept one does (its validation figure)
    stages["step2"] = {"accuracy_thinking_on": 0.3, "kept": False}
    assert data.headline(stages)["accuracy_thinking_on"] == 0.625
    stages["step2"] = {"accuracy_thinking_on": 0.7, "val_accuracy_after": 0.7, "kept": True, "model_dir": "m"}
    assert data.headline(stages)["accuracy_thinking_on"] == 0.7
    # once anti-theater has measured the final model on the test set, that is the headline
    stages["anti_theater"]["tests"][1].update(accuracy_on=0.66, accuracy_off=0.04, n=150)
    h = data.headline(stages)
    assert (h["accuracy_thinking_on"], h["accuracy_thinking_off"], h["accuracy_source"]) == (0.66, 0.04, "test")


def test_registry_readers_never_create_a_file(tmp_path):
    missing = tmp_path / "none.sqlite"
    assert data.registry_models(missing) == [] and not missing.exists()
    reg = Registry(tmp_path / "reg.sqlite")
    reg.register_model("quietstar:demo", 3, tmp_path / "m", metrics={"baking_accuracy": 0.9})
    assert [m["name"] for m in data.registry_models(reg.path)] == ["quietstar:demo"]


@pytest.fixture
def app_env(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    reg = Registry(tmp_path / "reg.sqlite")
    reg.register_model("quietstar:demo", 3, run / "model", metrics={"baking_accuracy": 0.873},
                       handoff_status="failed")
    monkeypatch.setenv("FORGE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FORGE_REGISTRY", str(reg.path))
    return run


def _count(node, kind: str) -> int:
    children = getattr(node, "children", None)
    own = 1 if getattr(node, "type", None) == kind else 0
    return own + (sum(_count(c, kind) for c in children.values()) if isinstance(children, dict) else 0)


def test_app_shows_the_run(app_env):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value.startswith("Agent Forge")
    assert at.header[0].value == "Run: demo"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Baking accuracy"] == "87.3%" and metrics["Accuracy, thinking on"] == "62.5%"
    assert metrics["Anti-theater"] == "FAILED" and metrics["A/B winner"] == "candidate"
    assert metrics["Handoff 3→4"] == "failed"
    assert any("PASS  divergence: 0.410 (needs > 0.3)" == s.value for s in at.success)
    assert any("FAIL  ablation: 1.500 (needs > 2.0)" == e.value for e in at.error)
    progress = [p.proto.text for p in at.get("progress")]
    assert "Step 1: prompt baking: 12 / 20 steps" in progress and "Step 2: Quiet-STaR RL: 5 / 10 steps" in progress
    # loss, token accuracy, reward, coherence, thought length, accuracy/diversity/KL, usage bars, A/B bars
    assert _count(at._tree, "vega_lite_chart") == 8
    subheaders = [s.value for s in at.subheader]
    for title in ("Curves", "Thinking-token usage", "Anti-theater validation", "A/B test", "Checkpoints"):
        assert title in subheaders
    assert at.toggle[0].value is True  # the run's files are fresh, so live refresh starts on


def test_app_without_runs(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FORGE_RUNS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("FORGE_REGISTRY", str(tmp_path / "none.sqlite"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "No runs under" in at.info[0].value
