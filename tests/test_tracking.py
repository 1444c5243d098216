"""Tracker: local metrics store always, W&B offline / disabled, secrets kept out."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from agent_forge.tracking import METRICS_FILE, SUMMARY_FILE, Tracker, read_metrics, redact


@pytest.fixture(autouse=True)
def _quiet_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def _log_two_stages(tracker: Tracker) -> list[dict]:
    sent = []
    for stage in ("bake", "rl"):
        for step in range(3):
            metrics = {"loss": 1.0 / (step + 1), "acc": torch.tensor(0.5 + step / 10),
                       "per_strategy": {"step": step / 4, "doubt": 0.25}}
            tracker.log(metrics, step=step, stage=stage)
            sent.append((stage, step, metrics))
    return sent


def _check_local(run_dir, sent) -> None:
    rows = read_metrics(run_dir)
    assert len(rows) == len(sent)
    for row, (stage, step, metrics) in zip(rows, sent):
        assert (row["stage"], row["step"]) == (stage, step)
        assert row["loss"] == metrics["loss"]
        assert row["acc"] == pytest.approx(float(metrics["acc"]))
        assert row["per_strategy"] == metrics["per_strategy"]
        assert isinstance(row["time"], float)
    assert [r["step"] for r in read_metrics(run_dir, stage="rl")] == [0, 1, 2]


def test_disabled_mode_writes_local_store(tmp_path):
    run_dir = tmp_path / "run"
    with Tracker(run_dir, mode="disabled", config={"lr": 1e-4}) as tracker:
        sent = _log_two_stages(tracker)
        _check_local(run_dir, sent)  # readable while the run is still open
        tracker.summary({"final_acc": 0.7})
        tracker.summary({"steps": 6})
    assert json.loads((run_dir / SUMMARY_FILE).read_text()) == {"final_acc": 0.7, "steps": 6}
    assert not (run_dir / "wandb").exists()


def test_offline_mode_writes_wandb_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, mode="offline", config={"lr": 1e-4, "teacher": {"api_key": "sk-or-v1-abcdefghijklmnop"}})
    assert tracker.wandb_run is not None
    sent = _log_two_stages(tracker)
    tracker.summary({"final_acc": 0.7})
    tracker.finish()
    tracker.finish()  # second call is harmless
    _check_local(run_dir, sent)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    keys = (b"bake/loss", b"rl/per_strategy/doubt", b"rl/step", b"summary/final_acc")
    deadline = time.monotonic() + 20  # W&B's service process may still be writing the file (seen under load)
    while True:
        data = b"".join(p.read_bytes() for p in offline[0].glob("run-*.wandb"))
        if all(k in data for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key  # W&B really received the stage-prefixed metrics
    everything = b"".join(p.read_bytes() for p in run_dir.rglob("*") if p.is_file())
    assert b"abcdefghijklmnop" not in everything  # the key never reached disk


def test_wandb_failure_warns_once_and_keeps_local_store(tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="no wandb today") as caught:
        tracker = Tracker(tmp_path / "run", mode="offline")
        tracker.log({"loss": 1.0}, step=0, stage="bake")
        tracker.log({"loss": float("nan")}, step=1, stage="bake")
        tracker.finish()
    assert len(caught) == 1
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["loss"] == 1.0 and math.isnan(rows[1]["loss"])


def test_read_metrics_skips_partial_and_bad_lines(tmp_path):
    assert read_metrics(tmp_path) == []
    (tmp_path / METRICS_FILE).write_text(
        '{"stage": "bake", "step": 0, "loss": 1}\nnot json\n{"stage": "rl", "step": 0}\n{"stage": "bake", "st'
    )
    assert read_metrics(tmp_path) == [{"stage": "bake", "step": 0, "loss": 1}, {"stage": "rl", "step": 0}]
    assert read_metrics(tmp_path, stage="rl") == [{"stage": "rl", "step": 0}]


def test_redact():
    config = {"lr": 0.1, "openrouter_api_key": "abc", "teacher": {"token": "t", "key": "sk-proj-1234567890ab"},
              "thinking_tokens": ["<step>"], "models": ["a", "hf_abcdefghijkl"], "password": 123}
    assert redact(config) == {"lr": 0.1, "openrouter_api_key": "***", "teacher": {"token": "t", "key": "***"},
                              "thinking_tokens": ["<step>"], "models": ["a", "***"], "password": "***"}


def test_bad_mode_and_reserved_names(tmp_path):
    with pytest.raises(ValueError, match="tracking mode"):
        Tracker(tmp_path, mode="cloud")
    with Tracker(tmp_path, mode="disabled") as tracker, pytest.raises(ValueError, match="reserved"):
        tracker.log({"time": 3.0}, step=0, stage="eval")
