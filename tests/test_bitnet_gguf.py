"""GGUF export of the ternary model (bitnet/gguf_export.py) and the llama.cpp engine.

The write/read round trip needs only the `gguf` package and always runs. The tests that run
llama.cpp skip, saying why, when llama-cpp-python is not installed (make setup LLAMACPP=yes).
Tiny models: hidden 64 (its linears go to Q4_0 blocks of ternary codes), intermediate 256
(down_proj fills whole 256-weight TQ blocks), so both storage paths are exercised.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from agent_forge.bitnet.convert import convert_to_bitnet, set_strength
from agent_forge.bitnet.gguf_export import GGUFExportError, _rope_permute, q4_0_codes, read_tensor, write_gguf
from agent_forge.llamacpp_engine import llamacpp_status
from agent_forge.vocab import THINK_CLOSE, THINK_OPEN, add_thinking_tokens

HAVE_LLAMACPP, LLAMACPP_WHY = llamacpp_status()
needs_llamacpp = pytest.mark.skipif(not HAVE_LLAMACPP, reason=LLAMACPP_WHY)


def tiny_llama(tok, seed: int = 0):
    """A 2-layer Llama with thinking tokens; norms and embeddings scaled like a trained model's
    (random norms, hidden states of RMS ~1) so the shared act-norm is exercised for real."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.2)
    model = LlamaForCausalLM(cfg)
    add_thinking_tokens(model, tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        model.get_input_embeddings().weight.normal_(0, 1.0)
    model.config._attn_implementation = "eager"
    return model.eval()


def ternary_model(tok, act_norm="shared", seed: int = 0):
    teacher = tiny_llama(tok, seed)
    student = copy.deepcopy(teacher)
    convert_to_bitnet(student, act_norm=act_norm)
    set_strength(student, 1.0)
    return teacher, student.eval()


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2"), ("4", "2"), ("i", "s")]


def make_bpe_tokenizer():
    """conftest's byte-level tokenizer plus a few merges (llama.cpp needs a BPE with merges)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


@pytest.fixture
def tok():
    return make_bpe_tokenizer()


LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def test_q4_0_codes_read_back_by_gguf():
    """Our Q4_0 blocks against gguf's own dequantiser: every code in [-8, 7] at every position
    of a block comes back as code x f16(scale)."""
    import gguf

    q = torch.randint(-8, 8, (6, 96), generator=torch.Generator().manual_seed(0))
    blocks = q4_0_codes(q, 0.0123)
    assert blocks.shape == (6, 96 // 32 * 18)  # 2 bytes of scale + 16 of nibbles per 32 weights
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0).reshape(6, 96)
    np.testing.assert_array_equal(back, q.numpy() * np.float32(np.float16(0.0123)))


@pytest.mark.parametrize("act_norm,weight_type,arch", [("shared", "tq2_0", "bitnet"), ("shared", "tq1_0", "bitnet"),
                                                       (False, "tq2_0", "llama")])
def test_ternary_round_trip(tok, tmp_path, act_norm, weight_type, arch):
    """Every linear reads back as its exact ternary codes times f16(gamma)."""
    _, student = ternary_model(tok, act_norm)
    summary = write_gguf(student, tok, tmp_path / "m.gguf", weight_type)
    assert summary["arch"] == arch
    assert summary["tensor_types"][weight_type.upper()]["tensors"] == 2  # the two down_proj (in = 256)
    assert summary["tensor_types"]["Q4_0 (ternary codes)"]["tensors"] == 12
    for i, layer in enumerate(student.model.layers):
        for g_name, hf_name in LINEARS.items():
            values, kind = read_tensor(tmp_path / "m.gguf", f"blk.{i}.{g_name}.weight")
            q, gamma = layer.get_submodule(hf_name).ternary()
            if arch == "llama" and g_name in ("attn_q", "attn_k"):
                heads = 4 if g_name == "attn_q" else 2
                q = _rope_permute(q, heads)
            scale = np.float32(np.float16(float(gamma)))
            assert kind == (weight_type.upper() if g_name == "ffn_down" else "Q4_0")
            np.testing.assert_array_equal(values / scale, q.numpy().astype(np.float32))  # codes exact
            np.testing.assert_allclose(values, q.numpy() * float(gamma), rtol=1e-3, atol=0)


def test_norms_and_tokenizer(tok, tmp_path):
    """bitnet arch: attn_norm = the shared q/k/v act-norm, sub-norms = o/down act-norms; the
    vocabulary has the thinking tokens as user-defined text tokens, EOS as control."""
    import gguf

    _, student = ternary_model(tok)
    write_gguf(student, tok, tmp_path / "m.gguf")
    layer = student.model.layers[1]
    for name, module in (("attn_norm", layer.self_attn.q_proj), ("ffn_norm", layer.mlp.up_proj),
                         ("attn_sub_norm", layer.self_attn.o_proj), ("ffn_sub_norm", layer.mlp.down_proj)):
        got, kind = read_tensor(tmp_path / "m.gguf", f"blk.1.{name}.weight")
        assert kind == "F32"
        np.testing.assert_array_equal(got, module.rms_norm.weight.detach().numpy())
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == student.get_input_embeddings().weight.shape[0]
    for t in (THINK_OPEN, THINK_CLOSE):
        i = tok.convert_tokens_to_ids(t)
        assert tokens[i] == t and types[i] == gguf.TokenType.USER_DEFINED
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["general.architecture"].contents() == "bitnet"


def test_per_linear_norms_refused_naming_the_layer(tok, tmp_path):
    """One act-norm per linear has three norms where llama.cpp has one: one clear error, no file."""
    _, student = ternary_model(tok, act_norm=True)
    with torch.no_grad():
        student.model.layers[0].self_attn.k_proj.rms_norm.weight.mul_(1.1)
    with pytest.raises(GGUFExportError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        write_gguf(student, tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_without_merges_refused(tmp_path):
    from conftest import make_tiny_tokenizer

    plain = make_tiny_tokenizer()
    _, student = ternary_model(plain)
    with pytest.raises(GGUFExportError, match="merges"):
        write_gguf(student, plain, tmp_path / "m.gguf")


def test_wrong_type_for_model_refused(tok, tmp_path):
    teacher, student = ternary_model(tok)
    with pytest.raises(GGUFExportError, match="tq2_0"):
        write_gguf(student, tok, tmp_path / "m.gguf", "f16")
    with pytest.raises(GGUFExportError, match="f16"):
        write_gguf(teacher, tok, tmp_path / "m.gguf", "tq2_0")


def test_shared_act_norm_keeps_the_function(tok):
    """At strength 0 the shared layout computes the input model (the block norm's gains moved
    into the shared act-norm), up to the eps of the second normalisation."""
    teacher, student = ternary_model(tok)
    set_strength(student, 0.0)
    ids = tok("12+30=42 and more text", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = teacher(ids).logits, student(ids).logits
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    layer = student.model.layers[0]
    assert layer.self_attn.q_proj.rms_norm is layer.self_attn.v_proj.rms_norm
    assert layer.self_attn.o_proj.rms_norm is not layer.self_attn.q_proj.rms_norm
    assert torch.all(layer.input_layernorm.weight == 1) and not layer.input_layernorm.weight.requires_grad


def test_shared_layout_round_trips_through_transformers(tok, tmp_path):
    """The same trained layout also loads in plain transformers with our logits."""
    from agent_forge.bitnet.export import load_plain, save_hf_bitnet

    _, student = ternary_model(tok)
    save_hf_bitnet(student, tok, tmp_path / "hf")
    ids = tok("7*6=42", return_tensors="pt")["input_ids"]
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        plain = load_plain(tmp_path / "hf")
        diff = (plain(ids).logits - student(ids).logits).abs().max()
    assert diff < 1e-4


def test_speed_rows_without_llamacpp(tok, tmp_path, monkeypatch):
    """No llama-cpp-python: the GGUFs are still written, and the rows say why they are missing."""
    import agent_forge.llamacpp_engine as engine

    monkeypatch.setattr(engine, "llamacpp_status", lambda: (False, "llama-cpp-python not installed (test)"))
    teacher, student = ternary_model(tok)
    rows, info = engine.llamacpp_speed_rows(tmp_path, student, teacher, tok, ["1+1="], 4)
    assert rows == {}
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["input-f16.gguf", "input-q8_0.gguf",
                                                               "ternary-tq2_0.gguf"]
    (why,) = info["not_measured"]  # one line for the three rows, not the same reason three times
    assert "not installed" in why and all(label in why for label in info["files"]) and len(info["files"]) == 3
    assert engine.ternary_vs_q8_0(rows) == {}


# ---------------------------------------------------------------------------------------
# llama.cpp itself


def _agreement(model, llm, ids):
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    theirs = llm.logits(ids)
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    rel = float(np.abs(ours - theirs).max() / np.abs(ours).max())
    return top1, rel


@needs_llamacpp
def test_llamacpp_logits_match_ternary_model(tok, tmp_path):
    """llama.cpp on the ternary GGUF vs our in-memory ternary model, every position. llama.cpp
    quantises activations per block (Q8_0: 32, Q8_K: 256) where we do per token, so logits
    differ by that rounding: top-1 agrees at >= 90% of positions, the largest logit
    difference is under 10% of the largest logit."""
    from agent_forge.llamacpp_engine import LlamaCppModel

    _, student = ternary_model(tok)
    write_gguf(student, tok, tmp_path / "t.gguf")
    llm = LlamaCppModel(tmp_path / "t.gguf", n_ctx=256, n_threads=1)
    ids = tok(f"Question: 12+30?{THINK_OPEN}12 plus 30 is 42{THINK_CLOSE}Answer: 42\n")["input_ids"]
    top1, rel = _agreement(student, llm, ids)
    assert top1 >= 0.9 and rel < 0.1, (top1, rel)


@needs_llamacpp
def test_llamacpp_rounding_computes_what_the_gguf_computes(tok, tmp_path):
    """With act_quant llamacpp our model computes as llama.cpp computes the GGUF (inputs in
    Q8_0 blocks beside the Q4_0-coded linears of width 64, Q8_K beside down_proj's TQ2_0 rows
    of 256; gamma in fp16), so with the embedding as the GGUF stores it (fp16; the phase's
    float8 store is exact in fp16) and llama.cpp's cache in fp32, what is left is float
    summation order: far closer than the per-token rounding gets, same weights, same GGUF."""
    from agent_forge.bitnet.convert import activation_rounding
    from agent_forge.llamacpp_engine import LlamaCppModel

    _, student = ternary_model(tok)
    with torch.no_grad():
        embedding = student.get_input_embeddings().weight
        embedding.copy_(embedding.half().float())
    write_gguf(student, tok, tmp_path / "t.gguf")
    llm = LlamaCppModel(tmp_path / "t.gguf", n_ctx=256, n_threads=1, f32_cache=True)
    ids = tok(f"Question: 12+30?{THINK_OPEN}12 plus 30 is 42{THINK_CLOSE}Answer: 42\n")["input_ids"]
    top1_token, rel_token = _agreement(student, llm, ids)
    with activation_rounding(student, "llamacpp"):
        top1_blocks, rel_blocks = _agreement(student, llm, ids)
    assert top1_blocks >= top1_token and rel_blocks < 0.01 and rel_blocks < rel_token / 3, \
        (top1_token, rel_token, top1_blocks, rel_blocks)


@needs_llamacpp
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llamacpp_input_model_matches(tok, tmp_path, kind):
    """The comparison rows' GGUFs (llama arch, q/k permuted for its rotary layout) compute the input model."""
    from agent_forge.llamacpp_engine import LlamaCppModel

    teacher, _ = ternary_model(tok)
    write_gguf(teacher, tok, tmp_path / "i.gguf", kind)
    llm = LlamaCppModel(tmp_path / "i.gguf", n_ctx=256, n_threads=1)
    ids = tok("The answer to 6*7 is 42, or so they say.")["input_ids"]
    top1, rel = _agreement(teacher, llm, ids)
    # F16 weights and activations: within 1% of the largest logit; Q8_0's 8-bit blocks: within 10%
    assert top1 >= (0.95 if kind == "f16" else 0.9) and rel < (0.01 if kind == "f16" else 0.1), (top1, rel)


@needs_llamacpp
def test_llamacpp_tokenizer_and_engine(tok, tmp_path):
    """llama.cpp's own tokenizer splits text (thinking tokens included) as the HF one does, and
    the engine runs the project's generation with thoughts on and off."""
    from agent_forge.inference import generate_answers
    from agent_forge.llamacpp_engine import LlamaCppModel

    _, student = ternary_model(tok)
    write_gguf(student, tok, tmp_path / "t.gguf")
    llm = LlamaCppModel(tmp_path / "t.gguf", n_ctx=256, n_threads=1)
    text = f"Question: what is 12 + 30?\n{THINK_OPEN}add them{THINK_CLOSE}Answer: 42"
    assert llm.llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]
    for thinking in ("on", "off"):
        gens = generate_answers(llm, tok, ["What is 2 + 2?", "What is 3 + 5?"], thinking=thinking,
                                max_new_tokens=12, batch_size=8)
        assert [g.mode for g in gens] == [thinking, thinking]
        assert all(0 < g.n_new_tokens <= 12 for g in gens)
        prefix = THINK_OPEN if thinking == "on" else THINK_OPEN + THINK_CLOSE
        assert all(g.completion.startswith(prefix) for g in gens)


@needs_llamacpp
def test_llamacpp_speed_rows(tok, tmp_path):
    """With llama.cpp: the three rows are timed like decode_speed's (same prompts, exact token count)."""
    from agent_forge.llamacpp_engine import F16_ROW, Q8_ROW, TERNARY_ROW, llamacpp_speed_rows, ternary_vs_q8_0

    teacher, student = ternary_model(tok)
    rows, info = llamacpp_speed_rows(tmp_path, student, teacher, tok, ["1+1=", "12*3="], 4)
    assert set(rows) == {TERNARY_ROW, F16_ROW, Q8_ROW} and info["not_measured"] == []
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 4 and r["prompts"] == 2 for r in rows.values())
    assert set(ternary_vs_q8_0(rows)) == {"ternary_vs_q8_0", "ahead_of_q8_0"}


@needs_llamacpp
def test_phase_measures_gguf_agreement(tok, tmp_path, forge_home, monkeypatch):
    """With llama.cpp, `forge bitnet` runs its ternary GGUF on the test questions and compares
    each answer with the PyTorch ternary model's: the agreement row of the report."""
    from agent_forge.bitnet.phase import make_config, run_bitnet
    from agent_forge.models import save_model
    from agent_forge.vocab import thinking_token_ids

    model = tiny_llama(tok)
    meta = {"phase": 3, "thinking_tokens": thinking_token_ids(tok),
            "metrics": {"baking_accuracy": 0.9, "anti_theater_passed": True}}
    src = save_model(model, tok, tmp_path / "p3", meta)
    cfg = make_config("smoke", model=str(src), out=str(tmp_path / "bn"), tracking="disabled",
                      registry=str(tmp_path / "reg.sqlite"))
    report = run_bitnet(cfg)
    agree = report["stages"]["agreement"]
    from agent_forge.bitnet.commands import summary_rows
    assert any(k.startswith("llama.cpp GGUF gives") for k, _ in summary_rows(report))
    assert agree["measured"] and agree["n"] == 8 == len(agree["agreed"])
    assert agree["agreement"] == sum(agree["agreed"]) / 8 and agree["target_met"] == (agree["agreement"] >= 0.9)
    _bench_gguf_agreement_reads_the_run(tmp_path / "bn", agree, monkeypatch)


def _bench_gguf_agreement_reads_the_run(run, agree, monkeypatch):
    """bench/bench_gguf_agreement.py on that run: the input model's F16 GGUF against fp32
    PyTorch on the run's own test questions, beside the run's ternary row unchanged."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_gguf_agreement as bench

    monkeypatch.setattr(bench, "RESULTS", run.parent / "agree.json")
    bench.main(["--run", str(run), "--kinds", "F16", "--ternary"])
    rows = json.loads((run.parent / "agree.json").read_text())["bn_ternary"]["rows"]
    f16 = rows["llama.cpp F16 (input model) vs PyTorch fp32"]
    assert f16["n"] == 8 and f16["agreement"] == sum(f16["agreed"]) / 8
    assert rows["llama.cpp TQ2_0 (ternary) vs PyTorch BitLinear (the run's agreement stage)"] == agree
    # llama.cpp decodes deterministically: its second pass over the GGUF reproduces the stage
    again = rows["llama.cpp TQ2_0 vs PyTorch BitLinear, per-token activations (the run's answers)"]
    assert again["agreed"] == agree["agreed"]
    blocks = rows["llama.cpp TQ2_0 vs PyTorch ternary, llama.cpp's activation blocks"]
    assert blocks["n"] == 8 and 0 <= blocks["pytorch_accuracy_on"] <= 1


def test_summary_states_the_gguf_size_against_fp32(tok, tmp_path):
    """The ternary GGUF's row: its bytes on disk and the ratio to the original model's fp32
    bytes (4 per parameter), with the tensor-type split."""
    from agent_forge.bitnet.commands import summary_rows
    from agent_forge.llamacpp_engine import TERNARY_ROW

    _, student = ternary_model(tok, "shared")
    f = write_gguf(student, tok, tmp_path / "m.gguf", "tq2_0")
    n_params = sum(p.numel() for p in tiny_llama(tok).parameters())
    sizes = {"total": 1000, "packed_linears": 0, "embeddings": 0, "head": 0, "norms": 0}
    save = {"sizes": sizes, "fp32_bytes": 4 * n_params, "ratio_vs_fp32": 4 * n_params / 1000, "ratio_vs_bf16": 1.0, "ratio_target_vs_fp32": 6,
            "size_category": "tiny", "sparsity": {"overall": 0.3}, "sparsity_target_met": True,
            "reload": {"max_abs_logit_diff": 0.0, "closed_thinking": True}}
    report = {"model": "m", "total_seconds": 1.0,
              "stages": {"save": save, "speed": {"llamacpp": {"files": {TERNARY_ROW: f}}, "best_ternary_ratio": 1.0,
                                                  "speed_target_met": False}}}
    row = dict(summary_rows(report))["ternary GGUF on disk (llama.cpp)"]
    assert f["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert row.startswith(f"{f['bytes'] / 1e6:.1f} MB ({4 * n_params / f['bytes']:.2f}x fp32, ")
    assert f"{100 * f['ternary_share']:.1f}% of linear weights TQ2_0, the rest Q4_0 codes" in row


def test_weight_repacking_follows_the_environment_then_the_cpu(monkeypatch, tmp_path):
    from agent_forge import llamacpp_engine
    from agent_forge.llamacpp_engine import weight_repacking

    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_int8 amx_tile\n")
    plain.write_text("flags\t\t: fpu avx2 avx512f\n")
    monkeypatch.delenv("FORGE_LLAMACPP_REPACK", raising=False)
    monkeypatch.setattr(llamacpp_engine, "CPUINFO", amx)
    assert weight_repacking() is False  # AMX: off
    monkeypatch.setenv("FORGE_LLAMACPP_REPACK", "1")
    assert weight_repacking() is True  # the environment decides first
    monkeypatch.delenv("FORGE_LLAMACPP_REPACK")
    monkeypatch.setattr(llamacpp_engine, "CPUINFO", plain)
    assert weight_repacking() is True
    monkeypatch.setenv("FORGE_LLAMACPP_REPACK", "0")
    assert weight_repacking() is False
    monkeypatch.delenv("FORGE_LLAMACPP_REPACK")
    monkeypatch.setattr(llamacpp_engine, "CPUINFO", tmp_path / "missing")
    assert weight_repacking() is True  # no cpuinfo to read: llama.cpp's default


@needs_llamacpp
def test_model_params_are_set_for_one_construction_only():
    import llama_cpp.llama_cpp as lib

    from agent_forge.llamacpp_engine import _model_params

    default = lib.llama_model_default_params
    with _model_params(use_extra_bufts=False):
        assert lib.llama_model_default_params().use_extra_bufts is False
    assert lib.llama_model_default_params is default and default().use_extra_bufts is True
