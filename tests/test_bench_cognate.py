"""bench/bench_cognate.py: its ablations remove what they say (the memory's read, the
recursion's steps) and nothing else, and the whole bench runs on the tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import bench_cognate as bench  # noqa: E402


def _ids(config, b=2, t=40):
    return torch.randint(0, config.vocab_size, (b, t), generator=torch.Generator().manual_seed(3))


def test_no_memory_equals_the_model_whose_memory_reads_are_zeroed():
    """The same weights everywhere else (seed 0), so zeroing the full model's memory output
    projection must give the ablated model's logits exactly; with the projection left alone
    the memory does change them (the comparison can fail)."""
    config = bench.shape_config("tiny", vocab=64)
    full, ablated = bench.build("cognate", config).eval(), bench.build("no_memory", config).eval()
    ids = _ids(config)
    with torch.no_grad():
        for layer in full.model.layers:
            layer.memory.out.weight.normal_()  # a memory that reads something
        before = full(input_ids=ids, use_cache=False).logits
        for layer in full.model.layers:
            layer.memory.out.weight.zero_()
        zeroed = full(input_ids=ids, use_cache=False).logits
        got = ablated(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, zeroed, rtol=0, atol=1e-6)
    assert (before - zeroed).abs().max() > 1e-3


def test_no_recursion_runs_one_step_without_ponder():
    config = bench.shape_config("tiny", vocab=64)
    full, ablated = bench.build("cognate", config).eval(), bench.build("no_recursion", config).eval()
    ids = _ids(config)
    with torch.no_grad():
        out, ref = ablated(input_ids=ids, use_cache=False), full(input_ids=ids, use_cache=False)
    assert torch.equal(out.halting_steps, torch.ones_like(out.halting_steps)) and out.ponder_cost.item() == 0.0
    assert ref.ponder_cost.item() > 0  # the real recursion does ponder
    assert not any(isinstance(m, type(full.model.recursion)) for m in ablated.modules())


def test_the_bench_runs_on_the_tiny_shape(tmp_path):
    out = tmp_path / "cognate.json"
    run = subprocess.run([sys.executable, str(BENCH / "bench_cognate.py"), "--shape", "tiny", "--vocab", "64",
                          "--batch", "2", "--seq-len", "16", "--repeats", "1", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())["tiny-b2-t16"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(bench.VARIANTS)
    assert all(r["forward_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0 for r in rows.values())
    assert all(r["peak_rss_mb"] >= r["rss_after_build_mb"] > 0 for r in rows.values())
    cognate, plain = rows["cognate"], rows["transformer"]
    assert abs(plain["non_embedding_params_m"] / cognate["non_embedding_params_m"] - 1) < 0.1  # same size
    assert rows["neither"]["params_m"] < rows["no_memory"]["params_m"] < cognate["params_m"]
    assert "transformer" in run.stdout and "x cognate" in run.stdout
