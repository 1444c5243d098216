"""Step 1: tokenisation and masking, batches, KL terms, and exact resume."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agent_forge.data.schema import Record, Segment, render, render_prompt, write_records
from agent_forge.quietstar.bake import (Baker, BakeConfig, batch_indices, kl_loss,
                                        token_accuracy)
from agent_forge.quietstar.bake_data import ANSWER, IGNORE, OTHER, collate, encode_record
from agent_forge.training.kl import forward_kl, kl_ref_to_policy, topk_forward_kl
from agent_forge.vocab import STRATEGIES, add_thinking_tokens

from conftest import Crash, crash_at, make_tiny_model, make_tiny_tokenizer, sigkill_once_checkpointed


def arith_record(i: int) -> Record:
    r = random.Random(i)
    a, b = r.randint(1, 9), r.randint(1, 9)
    return Record(str(i), f"{a} + {b} = ?", [Segment("step", f"{a} + {b} = {a + b}"),
                                              Segment("doubt", f"{a + b} - {b} = {a}, yes")],
                  str(a + b), str(a + b), "test", family="sum")


RECORDS = [arith_record(i) for i in range(64)]


def tok_with_vocab():
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    return tok, model


def test_piecewise_encoding_equals_whole_string_and_masks_question():
    tok, _ = tok_with_vocab()
    rec = RECORDS[0]
    ex = encode_record(rec, tok, max_len=512)
    whole = tok(render(rec), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == whole
    n_prompt = len(tok(render_prompt(rec.question), add_special_tokens=False)["input_ids"])
    assert ex.prompt_len == n_prompt
    assert all(lbl == IGNORE for lbl in ex.labels[:n_prompt])  # never learn the question
    assert all(lbl != IGNORE for lbl in ex.labels[n_prompt:])
    groups = set(ex.group[n_prompt:])
    assert {STRATEGIES.index("step"), STRATEGIES.index("doubt"), ANSWER, OTHER} == groups
    answer_ids = [i for i, g in zip(ex.input_ids, ex.group) if g == ANSWER]
    assert tok.decode(answer_ids).strip() == rec.answer


def test_direct_encoding_is_the_direct_prompt_then_the_answer():
    """A tokenizer without thinking tokens: the evaluation's direct-answer prompt, unlabelled,
    then the answer and EOS as the only targets (no opener or strategy ids, which it lacks)."""
    from agent_forge.inference import build_prompt
    from agent_forge.quietstar.bake_data import encode_direct

    tok, rec = make_tiny_tokenizer(), RECORDS[0]
    ex = encode_direct(rec, tok, max_len=512)
    prompt, _ = build_prompt(tok, rec.question, "direct")
    assert ex.input_ids == tok(prompt + " " + rec.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.labels[:ex.prompt_len] == [IGNORE] * ex.prompt_len and ex.labels[ex.prompt_len:] == ex.input_ids[ex.prompt_len:]
    assert tok.decode(ex.input_ids[ex.prompt_len:-1]).strip() == rec.answer
    assert set(ex.group[ex.prompt_len:]) == {ANSWER} and None not in ex.input_ids
    assert encode_direct(rec, tok, max_len=ex.prompt_len) is None


def test_too_long_records_are_dropped():
    tok, _ = tok_with_vocab()
    assert encode_record(RECORDS[0], tok, max_len=10) is None


def test_collate_pads_right_with_ignored_labels():
    tok, _ = tok_with_vocab()
    exs = [encode_record(r, tok, max_len=512) for r in RECORDS[:3]]
    batch = collate(exs, tok.pad_token_id)
    for row, ex in enumerate(exs):
        n = len(ex.input_ids)
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE).all()


def test_batches_cover_each_epoch_once_and_split_by_rank():
    cfg = BakeConfig(batch_size=4, grad_accum=2, seed=3)
    n = 20
    first_epoch = [i for step in range(5) for micro in range(2) for i in batch_indices(step, micro, cfg, n)]
    assert sorted(first_epoch) == list(range(n))
    assert batch_indices(7, 1, cfg, n) == batch_indices(7, 1, cfg, n)  # a pure function
    whole = batch_indices(2, 0, cfg, n)
    assert batch_indices(2, 0, cfg, n, 0, 2) + batch_indices(2, 0, cfg, n, 1, 2) == whole[0::2] + whole[1::2]


def test_length_grouped_batches_are_a_seeded_permutation_with_less_padding():
    import random

    n = 300
    lengths = [random.Random(i).randint(20, 140) for i in range(n)]
    cfg = BakeConfig(batch_size=8, seed=5)
    steps = -(-n // 8)
    grouped = [batch_indices(s, 0, cfg, n, lengths=lengths) for s in range(steps)]
    plain = [batch_indices(s, 0, BakeConfig(batch_size=8, seed=5, group_by_length=False), n, lengths=lengths)
             for s in range(steps)]
    assert plain == [batch_indices(s, 0, cfg, n) for s in range(steps)]  # no lengths: the plain order
    for order in (grouped, plain):
        flat = [i for b in order for i in b]
        assert sorted(flat[:n]) == list(range(n))  # every example once per epoch

    def useful(batches):  # real tokens / padded tokens, the slow obvious way
        return sum(sum(lengths[i] for i in b) for b in batches) / sum(len(b) * max(lengths[i] for i in b)
                                                                      for b in batches)
    assert useful(grouped) > 0.9 > useful(plain)
    assert batch_indices(3, 0, cfg, n, lengths=lengths) == grouped[3]  # a pure function of (seed, step)
    assert grouped != [batch_indices(s, 0, BakeConfig(batch_size=8, seed=6), n, lengths=lengths)
                       for s in range(steps)]


def test_forward_kl_matches_definition():
    torch.manual_seed(0)
    t, s = torch.randn(5, 11), torch.randn(5, 11)
    p, q = t.softmax(-1), s.softmax(-1)
    slow = torch.tensor([sum(p[i, v] * (p[i, v].log() - q[i, v].log()) for v in range(11)) for i in range(5)])
    assert torch.allclose(forward_kl(t, s, chunk=2), slow, atol=1e-5)
    assert torch.allclose(topk_forward_kl(t, s, k=11), slow, atol=1e-5)  # k = V is exact
    assert (topk_forward_kl(t, s, k=3) <= slow + 1e-6).all()  # a lower bound otherwise
    assert torch.allclose(forward_kl(t, t), torch.zeros(5), atol=1e-6)


def test_kl_ref_to_policy_uses_only_masked_positions():
    torch.manual_seed(1)
    t, s = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0]])
    expected = forward_kl(t[mask.bool()], s[mask.bool()]).mean()
    assert torch.allclose(kl_ref_to_policy(t, s, mask), expected)


def test_kl_loss_zero_for_identical_teacher_without_prompt():
    tok, model = tok_with_vocab()
    exs = [encode_record(r, tok, max_len=512) for r in RECORDS[:2]]
    batch = collate(exs, tok.pad_token_id)
    assert kl_loss(model, model, batch, batch, top_k=None).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_loss_aligns_responses_behind_different_prompts():
    """Against a slow per-example loop: teacher sees prefix + prompt, student the prompt only."""
    tok, student = tok_with_vocab()
    teacher = make_tiny_model("llama", student.get_input_embeddings().weight.shape[0], seed=7)
    recs = [RECORDS[0], arith_record(1000)]
    s_ex = [encode_record(r, tok, max_len=512) for r in recs]
    t_ex = [encode_record(r, tok, max_len=512, prefix="Think hard, please.\n") for r in recs]
    got = kl_loss(student, teacher, collate(s_ex, tok.pad_token_id), collate(t_ex, tok.pad_token_id), None)
    rows = []
    with torch.no_grad():
        for se, te in zip(s_ex, t_ex):
            n = len(se.input_ids) - se.prompt_len
            s_log = student(torch.tensor([se.input_ids])).logits[0, se.prompt_len - 1: se.prompt_len - 1 + n]
            t_log = teacher(torch.tensor([te.input_ids])).logits[0, te.prompt_len - 1: te.prompt_len - 1 + n]
            rows.append(forward_kl(t_log, s_log))
    assert got.item() == pytest.approx(torch.cat(rows).mean().item(), rel=1e-4)


def test_sft_training_lowers_loss_and_raises_token_accuracy(tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    cfg = BakeConfig(steps=30, batch_size=8, lr=3e-3, save_every=0, max_len=512, warmup_steps=2)
    baker = Baker(model, tok, cfg, tmp_path)
    held = [encode_record(r, tok, max_len=512) for r in RECORDS[48:]]
    before = token_accuracy(model, held, tok.pad_token_id)["token_accuracy"]
    result = baker.run(RECORDS[:48], RECORDS[48:])
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    assert result.metrics["token_accuracy"] > before + 0.1
    assert set(result.metrics["per_strategy"]) == {"step", "doubt"}


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw", "mugrokfast"])
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, optimizer):
    cfg = BakeConfig(steps=6, batch_size=4, lr=1e-3, save_every=3, max_len=512, optimizer=optimizer)

    def fresh(seed=0):
        tok = make_tiny_tokenizer()
        return make_tiny_model("llama", len(tok), seed=seed), tok

    full = Baker(*fresh(), cfg, tmp_path / "full")
    full.run(RECORDS[:40], RECORDS[40:44])
    # An interrupted run: a checkpoint at step 3, step 4 trained and logged, then the process is gone.
    with pytest.raises(Crash):
        Baker(*fresh(), cfg, tmp_path / "part").run(RECORDS[:40], RECORDS[40:44], progress=crash_at(4))
    resumed = Baker(*fresh(seed=99), cfg, tmp_path / "part")  # other init: must be overwritten
    result = resumed.run(RECORDS[:40], RECORDS[40:44], resume=True)
    assert result.steps_done == 6
    a, b = _weights(full.merged_model()), _weights(resumed.merged_model())
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    logged = [json.loads(x) for x in (tmp_path / "part" / "batches.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (tmp_path / "full" / "batches.jsonl").read_text().splitlines()]
    assert logged == expected


def test_mugrokfast_bake_logs_qk_clip_figures_each_step(tmp_path):
    """What QK-clip did reaches the step log (and the tracker); AdamW steps log none of it."""
    runs = {}
    for optimizer in ("mugrokfast", "adamw"):
        tok = make_tiny_tokenizer()
        cfg = BakeConfig(steps=2, batch_size=4, save_every=0, max_len=512, optimizer=optimizer)
        runs[optimizer] = [h for h in Baker(make_tiny_model("llama", len(tok)), tok, cfg, tmp_path / optimizer)
                           .run(RECORDS[:16], RECORDS[16:20]).history if "loss" in h]
    assert [h["qk_clip_steps"] for h in runs["mugrokfast"]] == [1, 2]
    assert all(h["qk_clip_max_logit"] > 0 and h["qk_clip_heads_clipped"] >= 0 for h in runs["mugrokfast"])
    assert not any(k.startswith("qk_clip") for h in runs["adamw"] for k in h)


def _tiny_setup(tmp_path: Path) -> tuple[Path, Path]:
    from agent_forge.models import save_model

    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    save_model(model, tok, tmp_path / "tiny", {"phase": 2})
    data = tmp_path / "train.jsonl"
    write_records(data, [arith_record(i) for i in range(200)])
    return tmp_path / "tiny", data


def _bake_cmd(model_dir, data, out, steps, extra=()):
    cfg = out.parent / "bake.yaml"
    cfg.write_text(f"steps: {steps}\nbatch_size: 4\nsave_every: 2\nmax_len: 512\neval_samples: 4\n"
                   "eval_max_new_tokens: 8\nlr: 0.001\n")
    return ["bake", "--model", str(model_dir), "--data", str(data), "--out", str(out),
            "--config", str(cfg), *extra]


def _forge(args, stdout=subprocess.PIPE):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "agent_forge", *args], env=env,
                            stdout=stdout, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_9_then_resume_loses_and_repeats_nothing(tmp_path, forge_home):
    model_dir, data = _tiny_setup(tmp_path)
    steps = 40  # the kill lands at the first checkpoint (step 2): 38 steps left to resume
    ref = _forge(_bake_cmd(model_dir, data, tmp_path / "ref", steps), stdout=subprocess.DEVNULL)
    assert ref.wait(600) == 0
    victim = _forge(_bake_cmd(model_dir, data, tmp_path / "run", steps), stdout=subprocess.DEVNULL)
    sigkill_once_checkpointed(victim, tmp_path / "run" / "checkpoints")
    resumed = _forge(_bake_cmd(model_dir, data, tmp_path / "run", steps, ["--resume"]))
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    final = json.loads((tmp_path / "run" / "step1.json").read_text())
    assert final["steps"] == steps
    got = (tmp_path / "run" / "batches.jsonl").read_text().splitlines()
    want = (tmp_path / "ref" / "batches.jsonl").read_text().splitlines()
    assert got == want  # same batches, in order, none lost, none repeated


def _train_lengths(model_dir, data) -> list[int]:
    """Token counts of the training examples, encoded as run_step1 does (the grouping key)."""
    from agent_forge.data.overlap import filter_overlap
    from agent_forge.data.schema import read_records
    from agent_forge.models import load_model
    from agent_forge.quietstar.bake_data import encode_records
    from agent_forge.quietstar.step1 import split_heldout
    from agent_forge.vocab import add_thinking_tokens

    model, tok = load_model(str(model_dir))
    add_thinking_tokens(model, tok)
    train, _ = split_heldout(filter_overlap(list(read_records(data)))[0])
    examples, _ = encode_records(train, tok, max_len=BakeConfig().max_len)
    return [len(e.input_ids) for e in examples]


@pytest.mark.slow
def test_two_process_torchrun_bake(tmp_path, forge_home):
    model_dir, data = _tiny_setup(tmp_path)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "agent_forge",
           *_bake_cmd(model_dir, data, tmp_path / "dist", 4)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "dist" / "batches.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    from agent_forge.quietstar.bake import BakeConfig, batch_indices

    cfg = BakeConfig(batch_size=4)
    n_train = json.loads((tmp_path / "dist" / "step1.json").read_text())["train_records"]
    lengths = _train_lengths(model_dir, data)
    assert len(lengths) == n_train
    assert [x["examples"] for x in lines] == [batch_indices(s, 0, cfg, n_train, lengths=lengths) for s in range(4)]
    assert (tmp_path / "dist" / "model" / "model.safetensors").exists()


def test_planted_slip_is_input_but_never_a_target():
    tok, _ = tok_with_vocab()
    rec = Record("s", "62 + 16 = ?", [Segment("step", "62 + 16 = 88"), Segment("correct", "62 + 16 = 78, not 88")],
                 "78", "78", "test")
    ex = encode_record(rec, tok, max_len=512)
    slip = tok(" 62 + 16 = 88", add_special_tokens=False)["input_ids"]
    start = ex.input_ids.index(tok.convert_tokens_to_ids("<step>")) + 1
    assert ex.input_ids[start:start + len(slip)] == slip  # the model still sees the slip ...
    assert all(lbl == IGNORE for lbl in ex.labels[start:start + len(slip)])  # ... but never learns it
    fix = ex.input_ids.index(tok.convert_tokens_to_ids("<correct>"))
    assert ex.labels[fix:] == ex.input_ids[fix:]  # the repair is learned


def test_slip_caught_by_a_check_is_masked_but_the_check_is_learned():
    """The other planted-slip shape: a wrong step, the <doubt> that catches it, the repair."""
    tok, _ = tok_with_vocab()
    rec = Record("s", "12 + 7 = ?", [Segment("step", "12 + 7 = 18"), Segment("doubt", "18 - 7 = 11, not 12"),
                                     Segment("correct", "12 + 7 = 19, not 18")], "19", "19", "test")
    ex = encode_record(rec, tok, max_len=512)
    slip = tok(" 12 + 7 = 18", add_special_tokens=False)["input_ids"]
    start = ex.input_ids.index(tok.convert_tokens_to_ids("<step>")) + 1
    assert ex.input_ids[start:start + len(slip)] == slip
    assert all(lbl == IGNORE for lbl in ex.labels[start:start + len(slip)])
    check = ex.input_ids.index(tok.convert_tokens_to_ids("<doubt>"))
    assert ex.labels[check:] == ex.input_ids[check:]  # the catching check and the repair are targets
    # a step that a check follows without any repair is the model's own work: a target
    plain = Record("s", "12 + 7 = ?", [Segment("step", "12 + 7 = 19"), Segment("doubt", "19 - 7 = 12, yes")],
                   "19", "19", "test")
    ex = encode_record(plain, tok, max_len=512)
    assert IGNORE not in ex.labels[ex.prompt_len:]


def test_bad_loss_stops_and_names_the_last_checkpoint(tmp_path):
    from agent_forge.training.guards import check_loss

    check_loss(2.0, 1.5, 3, tmp_path)  # fine
    with pytest.raises(FloatingPointError, match="no checkpoint was written yet"):
        check_loss(float("nan"), 1.5, 3, tmp_path)
    tok = make_tiny_tokenizer()
    cfg = BakeConfig(steps=4, batch_size=4, save_every=2, max_len=512, lr=1e3, explode_factor=1.05,
                     max_grad_norm=1e9)
    with pytest.raises(FloatingPointError, match="step-0000002|no checkpoint"):
        Baker(make_tiny_model("llama", len(tok)), tok, cfg, tmp_path / "b").run(RECORDS[:16], RECORDS[16:20])


def test_lora_bake_trains_adapters_and_new_token_rows(tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    cfg = BakeConfig(steps=3, batch_size=4, save_every=0, max_len=512, lr=1e-2, lora=True, lora_r=4)
    baker = Baker(model, tok, cfg, tmp_path)
    trainable = [n for n, p in baker.model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("token_adapter" in n or "trainable_tokens" in n
                                                         for n in trainable)
    baker.run(RECORDS[:16], RECORDS[16:20])
    merged = baker.merged_model()
    assert not any("lora_" in n for n, _ in merged.named_parameters())  # adapters merged in
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)


def test_preflight_refuses_when_memory_is_short(tmp_path):
    from agent_forge.preflight import Needs, PreflightError, check

    with pytest.raises(PreflightError, match="not enough memory"):
        check(tmp_path, Needs(disk_bytes=0, memory_bytes=10**9), free_memory_bytes=10**8)
    with pytest.raises(PreflightError, match="not enough disk"):
        check(tmp_path, Needs(disk_bytes=10**18, memory_bytes=0), free_memory_bytes=10**9)
    assert check(tmp_path, Needs(disk_bytes=1000, memory_bytes=1000), free_memory_bytes=10**9)["disk_free_gb"] > 0


def test_a_nan_step_is_never_saved_as_a_checkpoint(tmp_path, monkeypatch):
    """Step 2's loss is NaN and step 2 is a save step: the run stops with step 1 as the newest
    checkpoint (saving before the check kept the NaN step as the "last good" one)."""
    from agent_forge.training.checkpoint import latest_checkpoint

    tok = make_tiny_tokenizer()
    baker = Baker(make_tiny_model("llama", len(tok)), tok,
                  BakeConfig(steps=4, batch_size=4, save_every=1, max_len=512), tmp_path)
    real_row = baker.step_row

    def step_row(i, sums):
        row = real_row(i, sums)
        return {**row, "loss": float("nan")} if i == 1 else row
    monkeypatch.setattr(baker, "step_row", step_row)
    with pytest.raises(FloatingPointError):
        baker.run(RECORDS[:16], RECORDS[16:20])
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000001"
