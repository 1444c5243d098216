"""Phase handoff checks on tiny models saved to temporary directories."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from agent_forge.handoff import format_result, record_handoff, validate_phase2_to_3, validate_phase3_to_4
from agent_forge.registry import Registry
from agent_forge.vocab import add_thinking_tokens, get_vocab


def _save(out, model, tokenizer, meta: dict | None = None):
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if meta is not None:
        (out / "forge_meta.json").write_text(json.dumps(meta))
    return out


def _checks(result) -> dict:
    return {c.name: c for c in result.checks}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    tok = make_tiny_tokenizer()
    return _save(tmp_path_factory.mktemp("plain"), make_tiny_model("llama", len(tok)), tok)


def _phase3_dir(tmp_path, metrics: dict, vocab: str = "default", add_tokens: bool = True, resize: bool = True):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("qwen2", len(tok))  # untied head: both embedding matrices must grow
    ids = {}
    if add_tokens and resize:
        ids = add_thinking_tokens(model, tok, vocab)
    elif add_tokens:  # tokens in the tokenizer, but the model never grew rows for them
        tok.add_tokens(get_vocab(vocab).tokens, special_tokens=True)
    meta = {"phase": 3, "parent": "champion", "thinking_tokens": ids, "vocab": get_vocab(vocab).to_dict(),
            "metrics": metrics}
    return _save(tmp_path / "p3", model, tok, meta)


GOOD = {"baking_accuracy": 0.9, "anti_theater_passed": True}


# ---------------------------------------------------------------------------------------
# 2 -> 3


def test_plain_hf_model_passes_with_metadata_warning(plain_dir):
    result = validate_phase2_to_3(plain_dir, min_fitness_gain=0.2)
    checks = _checks(result)
    assert result.ok
    assert checks["loads"].ok and checks["causal_lm"].ok
    assert checks["causal_lm"].value[-1] == len(make_tiny_tokenizer())
    assert not checks["metadata"].ok and checks["metadata"].severity == "warning"
    assert result.warnings == [checks["metadata"]] and result.failures == []
    assert "WARN  metadata" in format_result(result) and "PASSED" in format_result(result)


@pytest.mark.parametrize("gain, threshold, ok", [(0.25, 0.2, True), (0.2, 0.2, True), (0.15, 0.2, False)])
def test_fitness_gain_threshold(tmp_path, gain, threshold, ok):
    tok = make_tiny_tokenizer()
    d = _save(tmp_path / "m", make_tiny_model("gpt2", len(tok)), tok, {"phase": 2, "metrics": {"fitness_gain": gain}})
    result = validate_phase2_to_3(d, min_fitness_gain=threshold)
    check = _checks(result)["fitness_gain"]
    assert (result.ok, check.ok, check.value, check.threshold) == (ok, ok, gain, threshold)
    if not ok:
        assert "0.1500 < required 0.2000" in check.message and "FAIL  fitness_gain" in format_result(result)
    assert validate_phase2_to_3(d).ok  # no threshold asked: the gain is only reported


def test_metadata_without_fitness_gain_fails_a_threshold(tmp_path):
    tok = make_tiny_tokenizer()
    d = _save(tmp_path / "m", make_tiny_model("llama", len(tok)), tok, {"phase": 1, "metrics": {}})
    result = validate_phase2_to_3(d, min_fitness_gain=0.2)
    checks = _checks(result)
    assert not result.ok and "not recorded" in checks["fitness_gain"].message
    assert not checks["phase"].ok and checks["phase"].severity == "warning"


def test_missing_and_non_causal_models_fail(tmp_path):
    result = validate_phase2_to_3(tmp_path / "nowhere")
    assert not result.ok and "cannot load" in _checks(result)["loads"].message

    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(vocab_size=258, dim=32, hidden_dim=64, n_layers=1, n_heads=4)
    d = _save(tmp_path / "bert", DistilBertModel(cfg), make_tiny_tokenizer())
    result = validate_phase2_to_3(d)
    assert not result.ok and not _checks(result)["loads"].ok
    assert "causal" in _checks(result)["loads"].message


def test_nan_weights_fail_the_forward_check(tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    result = validate_phase2_to_3(_save(tmp_path / "nan", model, tok))
    assert not result.ok and "NaN" in _checks(result)["causal_lm"].message


def test_broken_metadata_fails(tmp_path, plain_dir):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(plain_dir, d)
    (d / "forge_meta.json").write_text("{not json")
    result = validate_phase2_to_3(d)
    assert not result.ok and "unreadable" in _checks(result)["metadata"].message


# ---------------------------------------------------------------------------------------
# 3 -> 4


def test_good_phase3_output_passes(tmp_path):
    result = validate_phase3_to_4(_phase3_dir(tmp_path, GOOD))
    checks = _checks(result)
    assert result.ok, format_result(result)
    assert checks["thinking_tokens"].value == checks["thinking_tokens"].threshold == 12
    assert checks["token_embeddings"].ok and checks["phase"].ok


def test_legacy_vocab_is_read_from_metadata(tmp_path):
    result = validate_phase3_to_4(_phase3_dir(tmp_path, GOOD, vocab="legacy8"))
    assert result.ok and _checks(result)["thinking_tokens"].threshold == 8


def test_missing_tokens_are_named(tmp_path):
    d = _phase3_dir(tmp_path, GOOD, add_tokens=False)
    check = _checks(validate_phase3_to_4(d))["thinking_tokens"]
    assert not check.ok and check.value == 0
    assert "lacks 12 of 12" in check.message and "<doubt>" in check.message


def test_tokens_without_embedding_rows_fail(tmp_path):
    d = _phase3_dir(tmp_path, GOOD, resize=False)
    checks = _checks(validate_phase3_to_4(d))
    assert checks["thinking_tokens"].ok and not checks["token_embeddings"].ok
    assert ">=" in checks["token_embeddings"].message


def test_changed_token_ids_fail(tmp_path):
    d = _phase3_dir(tmp_path, GOOD)
    meta = json.loads((d / "forge_meta.json").read_text())
    meta["thinking_tokens"]["<doubt>"] += 1
    (d / "forge_meta.json").write_text(json.dumps(meta))
    check = _checks(validate_phase3_to_4(d))["thinking_tokens"]
    assert not check.ok and "<doubt>" in check.message and "differ" in check.message


@pytest.mark.parametrize("metrics, failing, words", [
    ({"baking_accuracy": 0.80, "anti_theater_passed": True}, "baking_accuracy", "0.8000 < required 0.8500"),
    ({"baking_accuracy": 87.0, "anti_theater_passed": True}, "baking_accuracy", "percentage"),
    ({"anti_theater_passed": True}, "baking_accuracy", "not recorded"),
    ({"baking_accuracy": 0.9, "anti_theater_passed": False}, "anti_theater_passed", "roll back"),
    ({"baking_accuracy": 0.9}, "anti_theater_passed", "not recorded"),
])
def test_metric_failures(tmp_path, metrics, failing, words):
    result = validate_phase3_to_4(_phase3_dir(tmp_path, metrics))
    assert [c.name for c in result.failures] == [failing]
    assert words in result.failures[0].message
    assert f"FAIL  {failing}" in format_result(result)


def test_anti_theater_can_be_waived_and_threshold_moved(tmp_path):
    d = _phase3_dir(tmp_path, {"baking_accuracy": 0.80, "anti_theater_passed": False})
    assert not validate_phase3_to_4(d).ok
    assert validate_phase3_to_4(d, min_baking_accuracy=0.75, require_anti_theater=False).ok


def test_phase3_needs_metadata_and_is_recorded(tmp_path, plain_dir):
    result = validate_phase3_to_4(plain_dir)
    assert not result.ok and _checks(result)["metadata"].severity == "error"
    r = Registry(tmp_path / "r.sqlite")
    model_id = r.register_model("plain", 3, str(plain_dir))
    record_handoff(r, model_id, result)
    stored = r.get_model(model_id)
    assert stored.handoff_status == "failed"
    assert stored.handoff_report == json.loads(json.dumps(result.to_dict()))


def test_cli_check_records_verdict(tmp_path, plain_dir):
    from typer.testing import CliRunner

    from agent_forge.registry_commands import registry_app

    db = tmp_path / "r.sqlite"
    model_id = Registry(db).register_model("baked", 3, "p3")
    d = _phase3_dir(tmp_path, GOOD)
    runner = CliRunner()
    out = runner.invoke(registry_app, ["check", str(d), "--to", "4", "--model-id", str(model_id), "--db", str(db)])
    assert out.exit_code == 0, out.output
    assert "PASSED" in out.output and Registry(db).get_model(model_id).handoff_status == "passed"
    out = runner.invoke(registry_app, ["check", str(plain_dir), "--to", "4", "--json", "--db", str(db)])
    assert out.exit_code == 1 and json.loads(out.output[out.output.index("{"):])["ok"] is False
    out = runner.invoke(registry_app, ["check", str(plain_dir), "--to", "3", "--db", str(db)])
    assert out.exit_code == 0 and "WARN  metadata" in out.output


@pytest.mark.parametrize("general, ok", [(True, True), (False, False), (None, True)])
def test_general_regression_blocks_the_handoff_when_measured(tmp_path, general, ok):
    metrics = {"baking_accuracy": 0.9, "anti_theater_passed": True}
    if general is not None:
        metrics["general_passed"] = general
    result = validate_phase3_to_4(_phase3_dir(tmp_path, metrics))
    assert result.ok is ok
    assert ("general_no_regression" in [c.name for c in result.checks]) is (general is not None)
