"""bench/bench_bitnet_qat.py: a smoke run of the whole bench on a tiny saved model, its
held-out figures against a plain recomputation, and one row per (lr, scale, init)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from agent_forge.bitnet.convert import convert_to_bitnet, set_strength
from agent_forge.bitnet.qat import distill_loss
from agent_forge.models import save_model
from agent_forge.quietstar.bake_data import Example, collate, shifted
from agent_forge.vocab import add_thinking_tokens, thinking_token_ids

from conftest import make_tiny_model, make_tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_bitnet_qat as bench  # noqa: E402


def _examples(tok, n=6):
    rows = [tok(f"Question: {i} + 2?\nAnswer: {i + 2 * i}")["input_ids"] + [tok.eos_token_id] for i in range(n)]
    return [Example(input_ids=ids, labels=list(ids), group=[0] * len(ids), prompt_len=4) for ids in rows]


def test_held_out_is_the_mean_of_the_per_batch_distillation_terms():
    """held_out sets full strength and averages each batch's KL and LM terms: recomputed here
    batch by batch with the loss function itself."""
    tok = make_tiny_tokenizer()
    teacher = make_tiny_model("llama", len(tok), seed=0)
    student = make_tiny_model("llama", len(tok), seed=0)
    convert_to_bitnet(student)
    set_strength(student, 0.3)  # held_out must move it to 1.0 itself
    examples = _examples(tok)
    cfg = bench.QATConfig()
    got = bench.held_out(student, teacher, examples, tok.pad_token_id, cfg, batch=4)
    kd, lm = [], []
    set_strength(student, 1.0)
    with torch.no_grad():
        for chunk in (examples[:4], examples[4:]):
            b = collate(chunk, tok.pad_token_id)
            s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            _, parts = distill_loss(s, t, shifted(b)[0], 1.0, 1.0, cfg.kl_top_k)
            kd.append(parts["kd"])
            lm.append(parts["lm"])
    assert got["kd"] == pytest.approx(sum(kd) / 2, rel=1e-5) and got["kd"] > 0
    assert got["lm"] == pytest.approx(sum(lm) / 2, rel=1e-5)


def test_smoke_run_writes_one_row_per_setting(tmp_path, monkeypatch):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    model_dir = save_model(model, tok, tmp_path / "p3", {"phase": 3, "thinking_tokens": thinking_token_ids(tok)})
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "res.json")
    bench.main(["--model", str(model_dir), "--lrs", "1e-3", "--inits", "nearest,gptq", "--steps", "2",
                "--records", "120", "--held-out", "4", "--gptq-batches", "1", "--eval", "2"])
    rec = json.loads((tmp_path / "res.json").read_text())
    (key, entry), = rec.items()
    assert key == "p3_2_steps_seed0_inits_nearest_gptq"
    rows = entry["rows"]
    assert [(r["lr"], r["scale"], r["init"]) for r in rows] == [(1e-3, "absmean", "nearest"), (1e-3, "absmean", "gptq")]
    for r in rows:
        assert r["steps"] == 2 and r["tokens"] > 0 and r["n"] == 2 and 0.0 <= r["accuracy_on"] <= 1.0
        assert r["kd"] >= 0 and r["lm"] > 0 and r["hidden_weight"] == 0.0 and 0.0 <= r["closed_on"] <= 1.0
    # both arms start from the same converted model; only GPTQ's codes differ at the start
    assert rows[0]["kd_start"] != rows[1]["kd_start"]
    assert rows[0]["init_seconds"] < rows[1]["init_seconds"]
