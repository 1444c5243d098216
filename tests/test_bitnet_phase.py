"""`forge bitnet`: the QAT loss and schedule against plain formulas, exact resume, the phase
end to end on a tiny model, and the refusals (failed handoff, already ternary, wrong phase)."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from agent_forge.bitnet.phase import STAGES, STATE_FILE, BitNetPhaseError, make_config, run_bitnet
from agent_forge.bitnet.qat import (QATConfig, QATTrainer, distill_loss, hidden_distill_loss, strength_at,
                                    strengths_at)
from agent_forge.models import safetensors_header, save_model
from agent_forge.registry import Registry
from agent_forge.vocab import add_thinking_tokens, thinking_token_ids

from conftest import Crash, crash_at, make_tiny_model, make_tiny_tokenizer


def test_strength_schedule_is_min_step_over_n():
    assert [strength_at(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert strength_at(0, 0) == 1.0  # no warm-in: ternary from the first step


def test_progressive_schedule_by_hand():
    """Two layer groups over a 4-step warm-in: the first ramps in steps 0-2, the second in 2-4."""
    forward = [strengths_at(s, 4, 2, "forward") for s in range(6)]
    assert forward == [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [1.0, 0.5], [1.0, 1.0], [1.0, 1.0]]
    assert [strengths_at(s, 4, 2, "backward") for s in range(6)] == [f[::-1] for f in forward]
    assert [strengths_at(s, 4, 3, "none") for s in range(6)] == [[strength_at(s, 4)] * 3 for s in range(6)]
    assert strengths_at(0, 0, 3, "forward") == [1.0, 1.0, 1.0]  # no warm-in: ternary from the first step
    with pytest.raises(ValueError, match="qat.progressive"):
        strengths_at(0, 4, 2, "sideways")


def test_bad_progressive_schedule_fails_in_the_config():
    with pytest.raises(ValueError, match="qat.progressive"):
        make_config("smoke", qat={"progressive": "sideways"})
    with pytest.raises(ValueError, match="weight_scale must be one of absmean, mse"):
        make_config("smoke", weight_scale="absmax")
    assert make_config("smoke", weight_scale="mse").weight_scale == "mse"
    with pytest.raises(ValueError, match="qat.init must be one of nearest, gptq"):
        make_config("smoke", qat={"init": "optimal"})
    with pytest.raises(ValueError, match="strength_warmup"):
        make_config("smoke", qat={"init": "gptq"})  # the smoke preset warms lambda in over 2 steps
    assert make_config("smoke", qat={"init": "gptq", "strength_warmup": 0}).qat.init == "gptq"


def test_layer_groups_follow_the_decoder_layers_in_numeric_order():
    from transformers import LlamaConfig, LlamaForCausalLM

    from agent_forge.bitnet.convert import bitlinears, convert_to_bitnet, layer_groups

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                                         num_attention_heads=2, num_key_value_heads=1))
    convert_to_bitnet(model)
    names = {id(m): n for n, m in bitlinears(model)}
    groups = layer_groups(model)
    assert len(groups) == 12 and sum(map(len, groups)) == len(names)
    for i, group in enumerate(groups):  # 10 and 11 come after 2, not after 1
        assert len(group) == 7 and all(names[id(m)].startswith(f"model.layers.{i}.") for m in group)


def test_qat_progressive_sets_each_layer_by_the_schedule(tmp_path):
    """While QAT runs forward-progressive, the first decoder layer is quantised before the second."""
    from agent_forge.bitnet.convert import layer_groups

    student, teacher, tok = _student_teacher()
    groups = layer_groups(student)
    seen = []
    cfg = _qat(tmp_path, steps=5, strength_warmup=4, progressive="forward")
    trainer = QATTrainer(student, teacher, tok, cfg, tmp_path / "q")
    trainer.run(_examples(tok), progress=lambda step, total, row: seen.append(
        ([g[0].strength for g in groups], all(m.strength == g[0].strength for g in groups for m in g))))
    assert [s for s, _ in seen[:4]] == [strengths_at(step, 4, 2, "forward") for step in range(4)]
    assert all(uniform for _, uniform in seen)
    rows = [h for h in trainer.history if "loss" in h]
    assert [r["strength"] for r in rows[:3]] == [0.0, 0.25, 0.5]  # logged: the mean over groups
    assert all(m.strength == 1.0 for g in groups for m in g)  # the trained model is fully ternary


def test_answer_agreement_by_hand():
    """Answers read from the answer slot: 7 == 7.0, an unclosed block is no answer, and no answer
    matches only no answer."""
    from agent_forge.bitnet.phase import answer_agreement
    from agent_forge.data.evalsets import EvalItem
    from agent_forge.inference import Generation

    items = [EvalItem(id=str(i), question=f"q{i}", answer="7", family="f") for i in range(5)]
    ours = [{"id": "0", "on": "7", "closed_on": True}, {"id": "1", "on": "7", "closed_on": True},
            {"id": "2", "on": "5", "closed_on": False}, {"id": "3", "on": "8", "closed_on": True},
            {"id": "4", "on": "8", "closed_on": True}]

    def gen(text, closed=True, completion=None):
        completion = f"[thinking]t[/endthinking]{text}" if completion is None else completion
        return Generation(prompt="", full_text="", completion=completion, thinking="t", answer_text=text,
                          closed=closed, n_new_tokens=1, seconds=0.0, mode="on")

    # closed but not well-formed: a second opener inside the block (a broken model's output)
    theirs = [gen("7.0"), gen("6"), gen("9", closed=False, completion="[thinking]t"), gen("8"),
              gen("x", completion="[thinking][thinking]t[/endthinking]x")]
    r = answer_agreement(items[::-1], ours, theirs[::-1])  # matched by id, not by position
    assert r["agreed"] == [True, False, True, True, False][::-1] and r["n"] == 5  # in the order given
    assert r["agreement"] == 3 / 5 and r["ci95"][0] < 0.6 < r["ci95"][1]
    assert r["gguf_accuracy_on"] == 1 / 5 and r["gguf_closed_rate"] == 4 / 5 and r["gguf_well_formed_rate"] == 3 / 5


def test_agreement_row_says_when_its_interval_spans_the_target():
    """91 of 100 meets 90% by the point estimate only (Wilson [83.8, 95.2]); 99 of 100 settles it."""
    from agent_forge.bitnet.commands import _agreement_rows
    from agent_forge.evaluation.metrics import wilson_interval

    def row(k, n=100):
        agree = {"measured": True, "agreement": k / n, "ci95": list(wilson_interval(k, n)), "n": n, "target": 0.9,
                 "target_met": k / n >= 0.9, "gguf_accuracy_on": 0.1, "gguf_closed_rate": 1.0}
        return _agreement_rows(agree)[0][1]

    assert "91.0% [83.8, 95.2] of 100: met by the point estimate; its 95% interval spans 90%" in row(91)
    assert "85.0% [76.7, 90.7] of 100: MISSED by the point estimate; its 95% interval spans 90%" in row(85)
    assert "of 100: met; " in row(99) and "of 100: MISSED; " in row(60)


def test_relative_drop_row_carries_its_interval():
    from agent_forge.bitnet.commands import _drop_text

    after = {"relative_drop": 0.857, "relative_drop_ci95": [0.75, 0.95], "drop_target_met": False}
    assert _drop_text(after, 0.10) == "85.7% [75.0, 95.0]: MISSED"
    near = {"relative_drop": 0.05, "relative_drop_ci95": [-0.06, 0.17], "drop_target_met": True}
    assert _drop_text(near, 0.10) == "5.0% [-6.0, 17.0]: met by the point estimate; its 95% interval spans 10%"
    old = {"relative_drop": 0.5, "drop_target_met": False}  # a report from before the interval
    assert _drop_text(old, 0.10) == "50.0%: MISSED"


def test_distill_loss_matches_plain_formulas():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [2, -100, -100, 7, 0]])
    loss, parts = distill_loss(s, t, labels, kd_weight=0.7, lm_weight=0.3, top_k=None)
    kls, ces = [], []
    for b in range(2):
        for i in range(5):
            if labels[b, i] == -100:
                continue
            p, logq = t[b, i].softmax(-1), s[b, i].log_softmax(-1)
            kls.append(float((p * (p.log() - logq)).sum()))
            ces.append(float(-logq[labels[b, i]]))
    kd, lm = sum(kls) / len(kls), sum(ces) / len(ces)
    assert parts["kd"] == pytest.approx(kd, rel=1e-5) and parts["lm"] == pytest.approx(lm, rel=1e-5)
    assert float(loss) == pytest.approx(0.7 * kd + 0.3 * lm, rel=1e-5)



def test_hidden_distill_loss_matches_a_plain_loop():
    """Per layer, per unmasked token: |h_s - h_t|^2 / |h_t|^2; the mean over tokens, then layers."""
    torch.manual_seed(1)
    hs = [torch.randn(2, 4, 6) for _ in range(3)]
    ht = [torch.randn(2, 4, 6) * (i + 1) for i in range(3)]
    ht[1][0, 0] *= 1000  # a huge activation weighs as one token, not as a million
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    per_layer = []
    for s, t in zip(hs, ht):
        vals = [float(((s[b, i] - t[b, i]) ** 2).sum() / (t[b, i] ** 2).sum())
                for b in range(2) for i in range(4) if mask[b, i]]
        per_layer.append(sum(vals) / len(vals))
    assert float(hidden_distill_loss(hs, ht, mask)) == pytest.approx(sum(per_layer) / 3, rel=1e-5)
    assert float(hidden_distill_loss(ht, ht, mask)) == 0.0
    assert float(hidden_distill_loss(hs, ht, torch.zeros_like(mask))) == 0.0


def test_qat_hidden_term_is_logged_and_pulls_layer_outputs_to_the_teacher(tmp_path):
    """hidden_weight > 0: the term is in each step's row and, with the logit terms off,
    training on it alone lowers it (so its gradient reaches the ternary layers)."""
    student, teacher, tok = _student_teacher()
    cfg = _qat(tmp_path, steps=10, strength_warmup=0, kd_weight=0.0, lm_weight=0.0, hidden_weight=1.0, lr=3e-3)
    trainer = QATTrainer(student, teacher, tok, cfg, tmp_path / "q")
    trainer.run(_examples(tok))
    rows = [h for h in trainer.history if "loss" in h]
    assert all("hidden" in r and r["loss"] == pytest.approx(r["hidden"], rel=1e-5) for r in rows)
    assert rows[-1]["hidden"] < rows[0]["hidden"]
    student2, teacher2, _ = _student_teacher()
    plain = QATTrainer(student2, teacher2, tok, _qat(tmp_path, steps=2), tmp_path / "p")
    plain.run(_examples(tok))
    assert not any("hidden" in h for h in plain.history)

def _examples(tok, n=12):
    from agent_forge.data.schema import Record, Segment
    from agent_forge.quietstar.bake_data import encode_records

    recs = [Record(str(i), f"{i} + 2 = ?", [Segment("step", f"{i} + 2 = {i + 2}")], str(i + 2), str(i + 2), "t")
            for i in range(n)]
    return encode_records(recs, tok, max_len=64)[0]


def _student_teacher(seed=0):
    from agent_forge.bitnet.convert import convert_to_bitnet

    tok = make_tiny_tokenizer()
    teacher = make_tiny_model("llama", len(tok), seed=seed)
    add_thinking_tokens(teacher, tok)
    student = make_tiny_model("llama", len(tok), seed=seed)
    add_thinking_tokens(student, tok)
    student.load_state_dict(teacher.state_dict())
    convert_to_bitnet(student)
    return student, teacher, tok


def test_reload_check_passes_our_file_and_catches_another_models(tmp_path):
    """The reload check compares the saved directory with our model answering in the same
    batch: our own file gives the same text on every question; a file of another model (seed 1)
    fails both the logits and the text (these tiny models write different text per question)."""
    from agent_forge.bitnet.export import save_hf_bitnet
    from agent_forge.bitnet.phase import _reload_check
    from agent_forge.data.evalsets import EvalItem

    ours, _, tok = _student_teacher(0)
    other, _, _ = _student_teacher(1)
    save_hf_bitnet(ours.eval(), tok, tmp_path / "bn", meta={"phase": 4})
    items = [EvalItem(id=str(i), question=f"What is {i} + {3 * i}?", answer=str(4 * i), family="f")
             for i in range(4)]
    same = _reload_check(tmp_path / "bn", ours, tok, 24, items)
    assert same["logits_match"] and same["same_text_rate"] == 1.0 and same["probes"] == 4, same
    wrong = _reload_check(tmp_path / "bn", other.eval(), tok, 24, items)
    assert not wrong["logits_match"] and wrong["same_text_rate"] < 1.0, wrong


def _qat(tmp_path, steps=4, **over):
    args = dict(steps=steps, batch_size=2, lr=1e-3, warmup_steps=1, strength_warmup=2, save_every=2,
                mixed_precision="no")
    return QATConfig(**{**args, **over})


def test_qat_lowers_the_distillation_loss_and_ends_fully_ternary(tmp_path):
    student, teacher, tok = _student_teacher()
    trainer = QATTrainer(student, teacher, tok, _qat(tmp_path, steps=12, strength_warmup=0), tmp_path / "q")
    result = trainer.run(_examples(tok))
    assert result["steps"] == 12 and result["tokens_seen"] > 0
    rows = [h for h in trainer.history if "loss" in h]
    assert rows[-1]["loss"] < rows[0]["loss"]
    from agent_forge.bitnet.convert import bitlinears
    assert all(m.strength == 1.0 for _, m in bitlinears(trainer.loop.unwrapped()))


def test_qat_curve_points_reach_the_tracker(tmp_path):
    """eval_every: the evaluation runs at those steps, lands in the result's curve and in the
    metrics store (a point once named a reserved field and stopped the run at its first point)."""
    from agent_forge.tracking import Tracker, read_metrics

    student, teacher, tok = _student_teacher()
    calls = []

    def evaluate(step, model):
        calls.append((step, model.training))
        return {"val_accuracy_on": step / 10}

    with Tracker(tmp_path / "run", mode="disabled") as tracker:
        trainer = QATTrainer(student, teacher, tok, _qat(tmp_path, steps=4, eval_every=2), tmp_path / "q",
                             tracker=tracker, evaluate=evaluate)
        result = trainer.run(_examples(tok))
    assert [c[0] for c in calls] == [2, 4]
    assert [(p["step"], p["val_accuracy_on"]) for p in result["curve"]] == [(2, 0.2), (4, 0.4)]
    logged = [r for r in read_metrics(tmp_path / "run") if r["stage"] == "bitnet_curve"]
    assert [(r["step"], r["val_accuracy_on"]) for r in logged] == [(2, 0.2), (4, 0.4)]


def test_qat_curve_point_at_a_checkpoint_step_survives_a_crash(tmp_path):
    """The evaluation at a checkpoint step is in that checkpoint: a run killed after it and
    resumed keeps the point (it was once lost, the step-40 point of the hour run)."""
    student, teacher, tok = _student_teacher()
    cfg = _qat(tmp_path, steps=4, eval_every=2)
    crashed = QATTrainer(student, teacher, tok, cfg, tmp_path / "q", evaluate=lambda step, m: {"val": step})
    with pytest.raises(Crash):
        crashed.run(_examples(tok), progress=crash_at(3))  # checkpoint and point at step 2
    student2, teacher2, _ = _student_teacher()
    resumed = QATTrainer(student2, teacher2, tok, cfg, tmp_path / "q", evaluate=lambda step, m: {"val": step})
    assert [p["step"] for p in resumed.run(_examples(tok), resume=True)["curve"]] == [2, 4]


def test_qat_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    student, teacher, tok = _student_teacher()
    full = QATTrainer(student, teacher, tok, _qat(tmp_path), tmp_path / "full")
    full.run(_examples(tok))
    student2, teacher2, _ = _student_teacher()
    crashed = QATTrainer(student2, teacher2, tok, _qat(tmp_path), tmp_path / "crash")
    with pytest.raises(Crash):
        crashed.run(_examples(tok), progress=crash_at(3))  # checkpoint at step 2, dies after step 3
    student3, teacher3, _ = _student_teacher()
    resumed = QATTrainer(student3, teacher3, tok, _qat(tmp_path), tmp_path / "crash")
    result = resumed.run(_examples(tok), resume=True)
    assert result["steps"] == 4
    a, b = full.loop.unwrapped().state_dict(), resumed.loop.unwrapped().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed.tokens_seen == full.tokens_seen


# ---------------------------------------------------------------------------------------
# The phase end to end


def _phase3_dir(tmp_path, passed=True, phase=3):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    meta = {"phase": phase, "thinking_tokens": thinking_token_ids(tok),
            "metrics": {"baking_accuracy": 0.9, "anti_theater_passed": passed}}
    return save_model(model, tok, tmp_path / f"p3-{passed}-{phase}", meta)


def _config(tmp_path, model, out="bn", **over):
    return make_config("smoke", model=str(model), out=str(tmp_path / out), tracking="disabled",
                       registry=str(tmp_path / "reg.sqlite"), **over)


def test_smoke_phase_runs_every_stage_and_measures(tmp_path, forge_home):
    report = run_bitnet(_config(tmp_path, _phase3_dir(tmp_path)))
    st = report["stages"]
    assert list(st) == [name for name, _ in STAGES]
    out = tmp_path / "bn"
    meta = json.loads((out / "model" / "forge_meta.json").read_text())
    assert meta["phase"] == 4 and meta["metrics"]["ratio_vs_fp32"] == st["save"]["ratio_vs_fp32"]
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["quant_method"] == "bitnet"
    # paired before/after on the same questions; the interval brackets the change
    ch = st["after"]["change"]
    assert ch["n"] == st["before"]["n"] == st["after"]["n"] == 8
    assert ch["ci95_points"][0] <= ch["points"] <= ch["ci95_points"][1]
    reload = st["save"]["reload"]
    assert reload["logits_match"] and reload["rounding_logit_diff"] == reload["max_abs_logit_diff"], reload
    # the reload and our model answer the first test questions in the same batch: with the
    # same weights, every answer must be the same (a file check, free of batch layout)
    assert reload["probes"] == 4 and reload["same_answer_rate"] == reload["same_text_rate"] == 1.0, reload
    assert 0.0 <= reload["well_formed_rate"] <= reload["closed_rate"] <= 1.0
    assert 0.0 <= st["after"]["well_formed_rate"] <= st["after"]["closed_rate"] and st["after"]["thinking"]
    # the storage's own cost: the input model with only the kept matrices (the embedding,
    # its tied head) rounded to the stored float8, on the same questions
    cost = st["store_cost"]
    assert cost["measured"] and cost["store_dtype"] == "float8_e4m3fn" and cost["change"]["n"] == 8
    assert "model.embed_tokens.weight" in cost["rounded"] and not any("proj" in n for n in cost["rounded"])
    header, _ = safetensors_header(out / "model" / "model.safetensors")
    assert header["model.embed_tokens.weight"]["dtype"] == "F8_E4M3"  # one byte a value on disk
    assert 0 <= st["save"]["sparsity"]["overall"] <= 1 and st["save"]["ratio_vs_fp32"] > 1
    assert all(r["tokens_per_s"] > 0 for r in st["speed"]["rows"])
    reg = Registry(tmp_path / "reg.sqlite")
    entry = reg.get_model(st["register"]["model_id"])
    assert entry.phase == 4 and st["handoff"]["ok"], st["handoff"]
    assert not st["validate_input"]["forced"]
    # the tiny tokenizer has no BPE merges, so no GGUF: the agreement stage says why
    # (tests/test_bitnet_gguf.py runs it with llama.cpp on a tokenizer that has them)
    assert not st["agreement"]["measured"] and "no merges" in st["agreement"]["why"]
    from agent_forge.bitnet.commands import summary_rows
    rows = dict(summary_rows(report))
    assert "no merges" in rows["not measured"] and not any("GGUF gives" in k for k in rows)  # said once
    assert "on 4 test questions, one batch: same answer as ours 100.0% (same text 100.0%)" in rows["reload with plain transformers"]
    assert "llama.cpp" not in rows["test accuracy, thinking on: ternary"]


def test_llamacpp_rounding_phase_checks_the_file_per_token(tmp_path, forge_home):
    """act_quant llamacpp: the model trains and is measured with llama.cpp's activation blocks;
    the HF file holds the same weights (exact against our model rounding per token, as the
    file runs) and the reload row states the rounding's own difference."""
    import dataclasses

    cfg = _config(tmp_path, _phase3_dir(tmp_path), act_quant="llamacpp")
    cfg = dataclasses.replace(cfg, eval_samples=4, speed_tokens=2)
    cfg.qat.steps = 2
    report = run_bitnet(cfg)
    reload = report["stages"]["save"]["reload"]
    assert reload["logits_match"] and reload["rounding_logit_diff"] > 100 * max(reload["max_abs_logit_diff"], 1e-6)
    assert reload["same_answer_rate"] == reload["same_text_rate"] == 1.0, reload  # ours also rounding per token, as the file runs
    meta = json.loads((tmp_path / "bn" / "model" / "forge_meta.json").read_text())
    assert meta["bitnet"]["act_quant"] == "llamacpp" and report["stages"]["handoff"]["ok"]
    from agent_forge.bitnet.commands import summary_rows
    rows = dict(summary_rows(report))
    assert "from the trained rounding" in rows["reload with plain transformers"]
    assert "llama.cpp's blocks" in rows["test accuracy, thinking on: ternary"]
    with pytest.raises(ValueError, match="act_quant must be one of token, llamacpp"):
        _config(tmp_path, "x", act_quant="block")


def test_a_plain_causal_lm_without_thinking_tokens_is_measured_answering_directly(tmp_path, forge_home):
    """Any HF causal LM: with no thinking tokens the after stage cannot ask for thoughts (it
    raised before); it answers directly, paired with before, and says anti-theater did not run."""
    tok = make_tiny_tokenizer()
    plain = save_model(make_tiny_model("llama", len(tok)), tok, tmp_path / "plain", {})
    cfg = dataclasses.replace(_config(tmp_path, plain), eval_samples=4, speed_tokens=2)
    cfg.qat.steps = 2
    report = run_bitnet(cfg)
    after = report["stages"]["after"]
    assert after["n"] == 4 and after["change"]["n"] == 4 and after["accuracy_off"] is None
    assert after["thinking"] is False
    assert after["anti_theater"]["passed"] is None and len(after["answers_on"]) == 4
    assert report["stages"]["qat"]["dropped_for_length"] == 0  # trained on direct-answer records
    from agent_forge.bitnet.commands import summary_rows
    rows = dict(summary_rows(report))
    assert "not run: the model has no thinking tokens" in rows["anti-theater on the ternary model"]
    assert "test accuracy, answering directly (no thinking tokens): ternary" in rows
    assert not any("thinking off" in k or "closes" in k for k in rows)
    assert "closes" not in rows["reload with plain transformers"]


def test_refuses_a_failed_phase3_handoff_unless_forced(tmp_path, forge_home):
    model = _phase3_dir(tmp_path, passed=False)
    with pytest.raises(BitNetPhaseError, match="anti_theater_passed|--force"):
        run_bitnet(_config(tmp_path, model))
    assert not (tmp_path / "bn").exists()  # refused at the door: nothing written
    cfg = _config(tmp_path, model, out="forced", force=True)
    cfg.qat.steps = 1
    import dataclasses
    cfg = dataclasses.replace(cfg, eval_samples=4)
    report = run_bitnet(cfg)
    assert report["stages"]["validate_input"]["forced"] is True


def test_qat_needs_by_hand():
    from agent_forge.bitnet.phase import qat_needs

    qat = QATConfig(steps=16, save_every=8, batch_size=8, grad_accum=2, max_len=256)
    needs = qat_needs(qat, n_bytes=1000, vocab_size=100)
    # one checkpoint written (step 8; none at the last step) = 3 copies, + student, model, GGUFs
    assert needs.disk_bytes == int(1000 * 6 * 1.1)
    assert needs.memory_bytes == 6 * 1000 + 15 * 4 * 4 * 256 * 100  # micro-batch of 4 sequences


def test_qat_batch_size_from_free_memory_by_hand():
    from agent_forge.bitnet.phase import qat_batch_size
    from agent_forge.models import ModelSize

    def size(free):
        return ModelSize(n_params=250, n_bytes=1000, category="tiny", device="cpu", free_memory_bytes=free)

    cfg = QATConfig(batch_size=0, max_len=256, grad_accum=1)
    # needs(b) = 6 * 1000 + 15 * 4 * b * 256 * 100 = 6000 + 1536000 b; 60% of 12 MB holds b = 4, not 8
    assert qat_batch_size(cfg, size(12_000_000), 100) == 4
    assert qat_batch_size(cfg, size(10_000_000), 100) == 2
    assert qat_batch_size(cfg, size(10**12), 100) == 32  # capped
    assert qat_batch_size(cfg, size(1), 100) == 1  # the pre-flight check then refuses
    assert qat_batch_size(QATConfig(batch_size=6), size(1), 100) == 6  # given: kept


def test_batch_size_zero_is_chosen_once_and_used(tmp_path, forge_home):
    report = run_bitnet(_config(tmp_path, _phase3_dir(tmp_path), qat={"batch_size": 0}))
    chosen = report["stages"]["validate_input"]["qat_batch_size"]
    assert chosen == 32  # a tiny model: the cap
    assert report["stages"]["qat"]["config"]["batch_size"] == chosen


def test_refuses_without_memory_before_any_work(tmp_path, forge_home, monkeypatch):
    import agent_forge.models

    monkeypatch.setattr(agent_forge.models, "free_memory", lambda device: 10_000)
    with pytest.raises(BitNetPhaseError, match="not enough memory: 0.0 GB free"):
        run_bitnet(_config(tmp_path, _phase3_dir(tmp_path)))
    assert not (tmp_path / "bn").exists()


def test_refuses_another_phases_output(tmp_path, forge_home):
    with pytest.raises(BitNetPhaseError, match="phase 2 output"):
        run_bitnet(_config(tmp_path, _phase3_dir(tmp_path, phase=2)))
    assert not (tmp_path / "bn").exists()


def test_gptq_start_runs_before_qat_and_not_again_on_resume(tmp_path, forge_home, monkeypatch):
    """qat.init gptq: the student starts from GPTQ's codes (output error below nearest
    rounding's, recorded); a run killed inside QAT resumes from its checkpoint without
    refitting them, and ends where an uninterrupted run ends."""
    import agent_forge.bitnet.gptq as gptq

    over = {"qat": {"init": "gptq", "strength_warmup": 0, "steps": 4, "batch_size": 2, "save_every": 2,
                    "warmup_steps": 1, "gptq_batches": 2}}
    model = _phase3_dir(tmp_path)
    whole = run_bitnet(_config(tmp_path, model, out="whole", **over))["stages"]["qat"]
    assert whole["gptq"]["layers"] > 0 and whole["gptq"]["batches"] == 2
    assert whole["gptq"]["output_error_gptq"] < whole["gptq"]["output_error_nearest"]
    assert whole["first"]["strength"] == 1.0
    cfg = _config(tmp_path, model, out="killed", **over)
    with pytest.raises(Crash):
        run_bitnet(cfg, progress=crash_at(3))  # inside QAT, after its step-2 checkpoint
    monkeypatch.setattr(gptq, "gptq_initialise", lambda *a, **k: pytest.fail("refitted on resume"))
    resumed = run_bitnet(cfg, resume=True)["stages"]["qat"]
    assert resumed["gptq"] == {"skipped": "resumed from a checkpoint"}
    assert resumed["last"]["loss"] == pytest.approx(whole["last"]["loss"], rel=1e-4)


def test_resume_after_kill_continues_from_the_first_unfinished_stage(tmp_path, forge_home):
    cfg = _config(tmp_path, _phase3_dir(tmp_path))
    with pytest.raises(Crash):
        run_bitnet(cfg, progress=crash_at(3))  # inside QAT, after its step-2 checkpoint
    state = json.loads((tmp_path / "bn" / STATE_FILE).read_text())
    assert list(state["stages"]) == ["validate_input", "data", "before", "store_cost"]
    with pytest.raises(BitNetPhaseError, match="--resume"):
        run_bitnet(cfg)
    report = run_bitnet(cfg, resume=True)
    assert report["stages"]["qat"]["steps"] == cfg.qat.steps
    # QAT's seconds count from the resume, and the time row says so
    assert report["stages"]["qat"]["stage_resumed"] and "stage_resumed" not in report["stages"]["after"]
    from agent_forge.bitnet.commands import summary_rows
    assert dict(summary_rows(report))["time"].endswith("(resumed: qat counted from the resume)")


def test_cli_bad_input_is_one_clear_error(tmp_path, forge_home):
    from agent_forge.cli import app

    result = CliRunner().invoke(app, ["bitnet", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                                      "--preset", "smoke", "--tracking", "disabled"])
    assert result.exit_code != 0 and "error" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_phase3_greedy_pass_is_replayed_only_for_the_same_weights_and_budget(tmp_path):
    """BitNet's 'before' reuses Phase 3's recorded generations only when the input model has
    the weights that made them, the same budget and batch size, and every question is there."""
    from agent_forge.bitnet.phase import BitNetConfig, phase3_greedy_on
    from agent_forge.data.evalsets import EvalItem
    from agent_forge.inference import GENERATION_BATCH, Generation, save_generations
    from agent_forge.models import update_meta, weights_digest

    model = tmp_path / "p3" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    gens = [Generation(prompt=f"Q{i}", full_text="", completion="", thinking="", answer_text=str(i), closed=True,
                       n_new_tokens=3, seconds=0.1, mode="on") for i in range(3)]
    questions = ["1 + 0 =", "1 + 1 =", "1 + 2 ="]
    key = {"model": str(tmp_path / "p3" / "step1" / "model"), "mode": "on", "max_new_tokens": 64,
           "batch_size": GENERATION_BATCH}
    save_generations(tmp_path / "p3" / "anti_theater" / "greedy_on.json", key, questions, gens)
    update_meta(model, {"phase": 3, "greedy_on": {"file": "../anti_theater/greedy_on.json", "key": key,
                                                   "weights_sha256": weights_digest(model)}})
    items = [EvalItem(id=str(i), question=q, answer=str(i + 1), family="f") for i, q in enumerate(questions)][::-1][:2]
    cfg = BitNetConfig(model=str(model), max_new_tokens=64)
    assert [g.answer_text for g in phase3_greedy_on(cfg, items)] == ["2", "1"]  # by question, in item order
    assert phase3_greedy_on(BitNetConfig(model=str(model), max_new_tokens=32), items) is None  # other budget
    assert phase3_greedy_on(cfg, items + [EvalItem(id="x", question="9 + 9 =", answer="18", family="f")]) is None
    (model / "model.safetensors").write_bytes(b"other weights")
    assert phase3_greedy_on(cfg, items) is None  # not the model that made them


def test_the_curve_config_in_configs_loads():
    from pathlib import Path

    configs = Path(__file__).parents[1] / "configs"
    cfg = make_config("quick", configs / "bitnet_curve_cpu.yaml")
    assert (cfg.qat.steps, cfg.qat.eval_every, cfg.qat.eval_samples, cfg.eval_samples) == (200, 40, 40, 100)
    blocks = make_config("quick", configs / "bitnet_curve_llamacpp_cpu.yaml")  # the same run in llama.cpp's rounding
    assert blocks.act_quant == "llamacpp" and cfg.act_quant == "token"
    assert dataclasses.asdict(blocks.qat) == dataclasses.asdict(cfg.qat) and blocks.eval_samples == cfg.eval_samples
    long = make_config("quick", configs / "bitnet_long_cpu.yaml")  # three times the steps, four times the traces
    assert (long.qat.steps, long.qat.eval_every, long.data.n_records, long.act_quant) == (600, 100, 4800, "llamacpp")
