"""Phase 4: decode speed measurement and the 4 -> out handoff (plain transformers loading a
packed BitNet directory). The BitNet directories are written here by hand, following
transformers' packed layout, so these tests do not depend on agent_forge.bitnet's export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file, save_file

from agent_forge.bitnet.speed import decode_speed, speed_table
from agent_forge.bitnet.export_check import validate_phase4
from agent_forge.handoff import format_result
from agent_forge.vocab import add_thinking_tokens, get_vocab

QUANT_CONFIG = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
                "use_rms_norm": False, "rms_norm_eps": 1e-6}


def _checks(result) -> dict:
    return {c.name: c for c in result.checks}


# ---------------------------------------------------------------------------------------
# decode_speed / speed_table


def test_decode_speed_generates_exactly_new_tokens_even_past_eos(monkeypatch):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    prompts = ["hello", "2 + 3 ="]
    # make the token the model writes first an EOS: without forcing, generation stops at once
    ids = tok(prompts[0], return_tensors="pt")["input_ids"]
    first = int(model(input_ids=ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first
    lengths = []
    real_generate = model.generate

    def counting_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", counting_generate)
    result = decode_speed(model, tok, prompts, new_tokens=6, warmup=1, repeats=3)
    assert lengths == [6] * (len(prompts) * 4)  # (1 warmup + 3 timed) runs x 2 prompts
    assert result["tokens_per_s"] > 0 and len(result["runs"]) == 3 and all(r > 0 for r in result["runs"])
    assert sorted(result["runs"])[1] == result["tokens_per_s"]
    assert (result["new_tokens"], result["prompts"], result["threads"]) == (6, 2, torch.get_num_threads())
    assert not model.training


def test_decode_speed_rejects_bad_arguments():
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    with pytest.raises(ValueError):
        decode_speed(model, tok, [])
    with pytest.raises(ValueError):
        decode_speed(model, tok, ["x"], repeats=0)


def test_speed_table_ratios():
    rows = {"fp32": {"tokens_per_s": 20.0}, "bitnet": {"tokens_per_s": 50.0, "runs": [50.0]},
            "bf16": {"tokens_per_s": 10.0}}
    table = speed_table(rows, baseline="fp32")
    assert [r["name"] for r in table] == ["fp32", "bitnet", "bf16"]
    assert [r["tokens_per_s"] for r in table] == [20.0, 50.0, 10.0]
    assert [r["ratio"] for r in table] == pytest.approx([1.0, 2.5, 0.5])
    with pytest.raises(KeyError):
        speed_table(rows, baseline="int8")


# ---------------------------------------------------------------------------------------
# A hand-made BitNet directory


def _pack(q: torch.Tensor) -> torch.Tensor:
    """Ternary (out, in) -> uint8 (ceil(out/4), in): row i*rows + r goes to bits 2i..2i+1 of
    packed row r, as value + 1 (transformers.integrations.bitnet.pack_weights' layout)."""
    rows = (q.shape[0] + 3) // 4
    codes = (q + 1).to(torch.uint8)
    packed = torch.zeros((rows, *q.shape[1:]), dtype=torch.uint8)
    for i in range(4):
        block = codes[i * rows:(i + 1) * rows]
        packed[:block.shape[0]] |= block << (2 * i)
    return packed


def _write_bitnet(out, model, tok, meta: dict):
    """Pack every attention/MLP linear; the embedding and (tied) head stay full precision."""
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.detach()
            s = w.abs().mean().clamp(min=1e-5)
            state[f"{name}.weight"] = _pack((w / s).round().clamp(-1, 1).to(torch.int8))
            # transformers' BitLinear DIVIDES its output by weight_scale: store 1 / mean|W|
            state[f"{name}.weight_scale"] = torch.tensor([1.0 / s.item()])
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.quantization_config = dict(QUANT_CONFIG)
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "forge_meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def bitnet(tmp_path_factory):
    """(directory, meta, ternary reference model): a valid Phase 4 output of a tiny llama."""
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    ids = add_thinking_tokens(model, tok)
    original = sum(p.numel() for p in model.parameters())
    meta = {"phase": 4, "parent": "phase3-model", "thinking_tokens": ids, "vocab": get_vocab().to_dict(),
            "metrics": {}, "bitnet": {"original_params": original}}
    out = _write_bitnet(tmp_path_factory.mktemp("bitnet") / "m", model, tok, meta)
    with torch.no_grad():  # the same model with dequantized ternary weights, for the logits test
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                s = module.weight.abs().mean().clamp(min=1e-5)
                module.weight.copy_((module.weight / s).round().clamp(-1, 1) * s)
    return out, meta, model


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "copy")


def _reported(out, meta, fp32_off: float = 1.0, bf16_off: float = 1.0, header: bool = True):
    size = (out / "model.safetensors").stat().st_size
    if not header:  # tensor data only: the 8-byte length and the JSON header left out
        size -= 8 + int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    n = meta["bitnet"]["original_params"]
    return {"total_bytes": size, "ratio_vs_fp32": 4 * n / size * fp32_off, "ratio_vs_bf16": 2 * n / size * bf16_off}


def test_packer_matches_transformers():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    q = torch.randint(-1, 2, (16, 5), dtype=torch.int8)
    assert torch.equal(_pack(q), pack_weights(q.clone()))
    with torch.compiler.set_stance("force_eager"):  # unpack_weights is @torch.compile'd
        assert torch.equal(unpack_weights(_pack(q), torch.float32), q.float())


def test_good_bitnet_dir_passes_and_loads_as_bitlinear(bitnet):
    out, meta, reference = bitnet
    result = validate_phase4(out, reported=_reported(out, meta))
    checks = _checks(result)
    assert result.ok, format_result(result)
    assert set(checks) >= {"metadata", "phase", "bitnet_config", "ternary_weights", "loads", "packed_layers",
                           "causal_lm", "thinking_tokens", "token_embeddings", "total_bytes", "ratio_vs_fp32",
                           "ratio_vs_bf16"}
    assert checks["loads"].value == 14 and checks["ternary_weights"].value == 14  # 7 linears x 2 layers
    assert "Phase 4 -> out handoff" in format_result(result) and "PASSED" in format_result(result)
    # plain transformers reproduces the ternary model (int8 activations aside): the packing
    # and the weight_scale convention above are the ones transformers reads
    from transformers import AutoModelForCausalLM

    with torch.compiler.set_stance("force_eager"):
        loaded = AutoModelForCausalLM.from_pretrained(out)
        ids = make_tiny_tokenizer()("Question: 2 + 3?", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            got, want = loaded(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_code_3_byte_fails_ternary_check(bitnet, tmp_path):
    out = _copy(bitnet[0], tmp_path)
    state = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    state[key][3, 7] = 0b01_11_01_01  # third 2-bit field is 3: "+2"
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    result = validate_phase4(out)
    check = _checks(result)["ternary_weights"]
    assert not result.ok and result.failures == [check]
    assert key in check.message and "code 3" in check.message and "1 bytes" in check.message


def test_missing_weight_scale_fails_packed_layers(bitnet, tmp_path):
    out = _copy(bitnet[0], tmp_path)
    state = load_file(out / "model.safetensors")
    del state["model.layers.0.self_attn.o_proj.weight_scale"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    result = validate_phase4(out)  # transformers loads it anyway, the scale uninitialised memory
    check = _checks(result)["packed_layers"]
    assert not check.ok and "model.layers.0.self_attn.o_proj.weight_scale missing" in check.message
    # that garbage scale may or may not make the logits non-finite; nothing else fails
    assert {c.name for c in result.failures} - {"causal_lm"} == {"packed_layers"}


def test_missing_meta_fails(bitnet, tmp_path):
    out = _copy(bitnet[0], tmp_path)
    (out / "forge_meta.json").unlink()
    result = validate_phase4(out, reported={"total_bytes": (out / "model.safetensors").stat().st_size,
                                            "ratio_vs_fp32": 3.0})
    checks = _checks(result)
    assert not result.ok and not checks["metadata"].ok and "not a Phase 4 output" in checks["metadata"].message
    assert checks["total_bytes"].ok and not checks["ratio_vs_fp32"].ok  # no original_params to recompute from
    assert checks["loads"].ok and checks["ternary_weights"].ok  # the other checks still ran


def test_phase_3_meta_fails(bitnet, tmp_path):
    out = _copy(bitnet[0], tmp_path)
    meta = dict(bitnet[1], phase=3)
    (out / "forge_meta.json").write_text(json.dumps(meta))
    result = validate_phase4(out)
    assert [c.name for c in result.failures] == ["phase"]
    assert result.failures[0].severity == "error" and "expected 4" in result.failures[0].message


@pytest.mark.parametrize("reported, failing", [
    ({"fp32_off": 0.95}, ["ratio_vs_fp32"]),
    ({"bf16_off": 0.9, "header": False}, ["ratio_vs_bf16"]),
    ({"fp32_off": 1.005, "bf16_off": 0.995}, []),  # within 1%
    ({"header": False}, []),  # sizes counted without the safetensors header (export.disk_sizes)
])
def test_reported_ratios(bitnet, reported, failing):
    out, meta, _ = bitnet
    result = validate_phase4(out, reported=_reported(out, meta, **reported))
    assert [c.name for c in result.failures] == failing
    wrong = _reported(out, meta)
    wrong["total_bytes"] = int(wrong["total_bytes"] * 1.02)
    assert "total_bytes" in [c.name for c in validate_phase4(out, reported=wrong).failures]


@pytest.mark.parametrize("diff, ok", [(0.0, True), (2e-4, True), (4.95, False), (float("nan"), False)])
def test_reload_must_match_the_evaluated_student(bitnet, diff, ok):
    """The save stage's reload comparison decides a check: an export whose reload gives other
    logits (seen on a Cognate champion: 4.95) fails the handoff."""
    out, meta, _ = bitnet
    result = validate_phase4(out, reported={**_reported(out, meta), "reload_max_abs_logit_diff": diff})
    check = _checks(result)["reload_matches_student"]
    assert check.ok is ok and result.ok is ok and check.severity == "error"


def test_plain_model_is_not_a_bitnet_model(bitnet, tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    out = tmp_path / "plain"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "forge_meta.json").write_text(json.dumps(bitnet[1]))
    result = validate_phase4(out)
    checks = _checks(result)
    assert {c.name for c in result.failures} == {"bitnet_config", "ternary_weights", "packed_layers"}
    assert "no quantization_config: not a BitNet model" in checks["bitnet_config"].message
    assert "no packed uint8 weights" in checks["ternary_weights"].message
    assert checks["loads"].ok and checks["causal_lm"].ok
