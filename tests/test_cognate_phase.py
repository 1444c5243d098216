"""`forge cognate`: the metrics against hand-made figures, the data by hand, the smoke phase end
to end (three mergeable models that load like any HF model, report, registry), exact
resume after a crash, and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Crash, make_tiny_tokenizer, sigkill_once_checkpointed

from agent_forge.cognate.data import pack, record_text, split_blocks, unigram_block_losses, unigram_cross_entropy
from agent_forge.cognate.metrics import average_weights, diversity, diversity_ci, halting_histogram
from agent_forge.cognate.phase import STATE_FILE, CognatePhaseError, make_config, run_cognate
from agent_forge.registry import Registry

# ---------------------------------------------------------------------------------------
# Metrics and data by hand


def test_diversity_on_hand_made_predictions():
    preds = {"a": torch.tensor([1, 2, 3, 4]), "b": torch.tensor([1, 2, 0, 0]), "c": torch.tensor([1, 2, 3, 4])}
    steps = {"a": torch.tensor([1, 1, 2, 2]), "b": torch.tensor([2, 2, 2, 2]), "c": torch.tensor([1, 1, 2, 2])}
    div = diversity(preds, steps)
    # a-b: disagree 2/4, histograms (.5,.5) vs (0,1): TV .5 -> .5 ; a-c: 0, 0 -> 0 ; b-c: as a-b -> .5
    assert div["pairs"]["a-b"] == {"disagreement": 0.5, "halting_distance": 0.5, "score": 0.5}
    assert div["pairs"]["a-c"]["score"] == 0.0
    assert div["diversity"] == pytest.approx(1 / 3)
    assert div["mean_disagreement"] == pytest.approx(1 / 3) and div["mean_halting_distance"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("n_blocks,positions", [(2000, 1), (400, 10)])
def test_diversity_interval_matches_the_normal_interval_of_whole_blocks(n_blocks, positions):
    """Two models halting alike, so diversity = disagreement / 2. A block's positions all agree
    or all disagree: the interval must be the normal one of a proportion over n_blocks (not
    over the n_blocks x positions tokens, which a token-level resample would give: sqrt(10)
    narrower in the second case)."""
    gen = torch.Generator().manual_seed(1)
    differs = (torch.rand(n_blocks, generator=gen) < 0.3).repeat_interleave(positions)
    preds = {"a": torch.zeros(n_blocks * positions, dtype=torch.long), "b": differs.long()}
    steps = {"a": torch.ones(n_blocks * positions, dtype=torch.long), "b": torch.ones(n_blocks * positions, dtype=torch.long)}
    p = float(differs.double().mean())
    half = 1.96 * math.sqrt(p * (1 - p) / n_blocks) / 2
    lo, hi = diversity_ci(preds, steps, n_blocks)
    assert lo == pytest.approx(p / 2 - half, abs=0.2 * half) and hi == pytest.approx(p / 2 + half, abs=0.2 * half)


def test_halting_histogram_counts_steps_from_one():
    assert halting_histogram(torch.tensor([1, 3, 3, 3]), 4).tolist() == [0.25, 0.0, 0.75, 0.0]


def test_unigram_cross_entropy_by_hand():
    train = torch.tensor([[0, 0, 0, 1]])  # counts + 1: token 0 -> 4, token 1 -> 2, token 2 -> 1; total 7
    val = torch.tensor([[2, 0, 1]])  # targets 0 and 1
    want = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert unigram_cross_entropy(train, val, vocab_size=3) == pytest.approx(want)


def test_unigram_per_block_by_hand_and_its_mean_is_the_baseline():
    train = torch.tensor([[0, 0, 0, 1]])  # probabilities 4/7, 2/7, 1/7
    val = torch.tensor([[2, 0, 1], [0, 2, 2]])  # targets (0, 1) and (2, 2)
    got = unigram_block_losses(train, val, vocab_size=3)
    want = [-(math.log(4 / 7) + math.log(2 / 7)) / 2, -math.log(1 / 7)]
    assert got.tolist() == pytest.approx(want)
    assert unigram_cross_entropy(train, val, 3) == pytest.approx(sum(want) / 2)


def test_block_losses_average_to_the_models_own_loss():
    """Per-block cross-entropy from the logits: each block's equals the model's lm_loss on that
    block alone, and evaluate_model's val_loss is their mean, with a t interval around it."""
    from agent_forge.cognate.metrics import block_losses, evaluate_model
    from agent_forge.cognate.model import CognateConfig, CognateForCausalLM

    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                             intermediate_size=64, memory_dim=8, memory_hidden_size=16,
                                             memory_chunk_size=3, sliding_window=4, recursion_after_layer=2,
                                             recursion_intermediate_size=48, max_recursion_steps=3)).eval()
    blocks = torch.randint(0, 40, (5, 12))
    with torch.no_grad():
        got = block_losses(model(input_ids=blocks).logits, blocks)
        alone = [float(model(input_ids=b[None], labels=b[None]).lm_loss) for b in blocks]
    assert got.tolist() == pytest.approx(alone, rel=1e-5)
    figures, _, _ = evaluate_model(model, blocks, batch_size=2)
    assert figures["block_losses"] == pytest.approx(alone, rel=1e-5)
    assert figures["val_loss"] == pytest.approx(sum(alone) / 5, rel=1e-5)
    lo, hi = figures["val_loss_ci95"]
    assert lo < figures["val_loss"] < hi


def test_pack_joins_with_eos_and_cuts_full_blocks():
    tok = make_tiny_tokenizer()
    blocks = pack(["ab", "cde"], tok, seq_len=3)  # a b EOS c d e EOS -> 2 blocks of 3, one token left
    eos = tok.eos_token_id
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert blocks.tolist() == [ids("ab") + [eos], ids("cde")]
    train, val = split_blocks(torch.arange(10).view(5, 2), 0.2, seed=0)
    assert len(train) == 4 and len(val) == 1 and set(train.flatten().tolist()).isdisjoint(val.flatten().tolist())


def test_hub_datasets_stream_disjoint_rows_per_stage(monkeypatch, tmp_path):
    """Stage k takes rows k*n .. (k+1)*n - 1 of each dataset's train split (streamed), the
    "text" field or else the first string; a row without text and a local path are refused."""
    import datasets

    from agent_forge.cognate.data import hub_texts

    calls = []

    def fake_load(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if name == "o/plain":
            return iter({"text": f"row {i}", "n": i} for i in range(100))
        if name == "o/qa":
            return iter({"id": i, "question": f"q{i}"} for i in range(100))
        return iter([{"n": 1}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert hub_texts(["o/plain"], 3, 0) == ["row 0", "row 1", "row 2"]
    assert hub_texts(["o/plain", "o/qa:cfg"], 2, 2) == ["row 4", "row 5", "q4", "q5"]
    assert calls[-1] == ("o/qa", "cfg", "train", True)
    with pytest.raises(ValueError, match="'o/numbers' row 0 has no text"):
        hub_texts(["o/numbers"], 2, 0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o" / "local").mkdir(parents=True)
    with pytest.raises(ValueError, match="local path"):
        hub_texts(["o/local"], 2, 0)


def test_record_text_leaves_planted_slips_out():
    from agent_forge.data.schema import Record, Segment

    rec = Record(id="x", question="2+2?", answer="4", gold="4", source="gym",
                 thinking=[Segment("step", "2 + 2 = 5"), Segment("doubt", "check: 5 - 2 = 3, not 2"),
                           Segment("correct", "2 + 2 = 4")])
    text = record_text(rec)
    assert text.startswith("Question: 2+2?\nReasoning: ") and text.endswith("\nAnswer: 4")
    assert "2 + 2 = 4" in text and "2 + 2 = 5" not in text


def test_extract_answer_reads_the_training_format():
    from agent_forge.cognate.metrics import extract_answer

    assert extract_answer(" 3 + 4 = 7\nAnswer: 7\nQuestion: next") == "7"
    assert extract_answer(" 3 + 4 = 7") is None and extract_answer("Answer:   ") is None


def test_reasoning_accuracy_scores_what_the_model_answers():
    from agent_forge.cognate.metrics import reasoning_accuracy
    from agent_forge.data.evalsets import EvalItem

    tok = make_tiny_tokenizer()
    tok.padding_side = "right"

    class Answers7(torch.nn.Module):  # writes " 3 + 4 = 7 / Answer: 7" after any prompt
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, **kw):
            assert (attention_mask[:, -1] == 1).all()  # left padded
            tail = torch.tensor(tok(" 3 + 4 = 7\nAnswer: 7", add_special_tokens=False)["input_ids"])
            return torch.cat([input_ids, tail.expand(len(input_ids), -1)], dim=1)

    items = [EvalItem("a", "3 + 4?", "7", "chain_sum"), EvalItem("b", "2 + 2?", "4", "chain_sum"),
             EvalItem("c", "10 - 3 = ?", "7.0", "basic_arithmetic")]
    acc = reasoning_accuracy(Answers7(), tok, items, batch_size=2)
    assert acc["n"] == 3 and acc["accuracy"] == pytest.approx(2 / 3) and acc["no_answer_rate"] == 0
    assert tok.padding_side == "right"


def test_average_weights_is_the_mean():
    from test_cognate_model import tiny_model

    a, b = tiny_model(seed=0), tiny_model(seed=1)
    merged = average_weights(a, b)
    name = "model.layers.0.memory.w1_init"
    torch.testing.assert_close(merged.state_dict()[name], (a.state_dict()[name] + b.state_dict()[name]) / 2)


def test_a_specialisation_may_not_change_shapes():
    with pytest.raises(ValueError, match="shapes must match"):
        make_config("smoke", specialisations={"a": {"hidden_size": 64}, "b": {}})


def test_controls_by_name_or_all_or_none():
    from agent_forge.cognate.phase import stages

    assert make_config("quick").controls == ("transformer",)  # every quick run has its transformer control
    assert make_config("smoke").controls == make_config("smoke", controls=True).controls == ("independent",
                                                                                          "transformer")
    assert make_config("smoke", controls=False).controls == ()
    assert make_config("smoke", controls="independent").controls == ("independent",)
    with pytest.raises(ValueError, match="unknown controls"):
        make_config("smoke", controls=["transformers"])
    names = [n for n, _ in stages(make_config("quick"))]
    assert names[-4:] == ["specialise_speed", "control_transformer", "evaluate", "register"]


def test_control_rows_say_whether_the_architecture_beats_the_plain_transformer():
    from agent_forge.cognate.commands import control_rows

    models = {"foundation": {"val_loss": 1.0}, "reasoning": {"val_loss": 2.0}, "speed": {"val_loss": 1.8}}
    rows = dict(control_rows({"transformer_val_loss": 1.9}, models))
    assert rows == {"same-size plain transformer (control)":
                    "val loss 1.900: the best specialisation (speed, 1.800) beats it"}
    rows = dict(control_rows({"transformer_val_loss": 1.7}, models))
    assert "does NOT beat" in rows["same-size plain transformer (control)"]
    assert control_rows({}, models) == []


def test_control_and_merge_rows_pair_the_blocks():
    """The best specialisation against the transformer is paired over the blocks: a steady
    0.05 nats lower loss on every block beats it; a noisy difference whose interval holds 0
    cannot be told from it, although its point estimate is lower. The rows read the stored
    differences."""
    from agent_forge.cognate.commands import control_rows, merge_row
    from agent_forge.cognate.controls import versus_transformer

    plain = [2.0, 2.4, 1.8, 2.2, 2.1, 1.9]
    steady = [x - 0.05 for x in plain]
    noisy = [x + d for x, d in zip(plain, [-0.5, 0.4, -0.3, 0.3, -0.2, 0.1])]
    for losses, verdict in ((steady, "beats it: -0.050 [-0.050, -0.050] nats"), (noisy, "cannot be told from it")):
        models = {"memory": {"val_loss": 9.0, "block_losses": [9.0] * 6},
                  "speed": {"val_loss": sum(losses) / 6, "block_losses": losses}}
        diff = versus_transformer(models, plain)
        assert diff["specialisation"] == "speed" and diff["mean"] == pytest.approx(sum(losses) / 6 - sum(plain) / 6)
        controls = {"transformer_val_loss": sum(plain) / 6, "transformer_val_loss_ci95": [1.9, 2.2],
                    "best_minus_transformer": diff}
        text = dict(control_rows(controls, {"foundation": {"val_loss": 9.0}, **models}))[
            "same-size plain transformer (control)"]
        assert text.startswith("val loss 2.067 [1.900, 2.200]: the best specialisation (speed, ") and verdict in text
    merge = {"parents": ["a", "b"], "merged_val_loss": 2.5, "merged_val_loss_ci95": [2.4, 2.6],
             "vs_better_parent": {"parent": "b", "mean": 0.3, "ci95": [0.2, 0.4]}}
    assert merge_row(merge) == ("50/50 merge of a + b", "val loss 2.500 [2.400, 2.600]; above the better parent "
                                                        "(b): +0.300 [+0.200, +0.400] nats")


# ---------------------------------------------------------------------------------------
# The phase end to end


def _config(tmp_path, out="cg", **over):
    tok_dir = tmp_path / "tok"
    if not tok_dir.exists():
        make_tiny_tokenizer().save_pretrained(tok_dir)
    return make_config("smoke", out=str(tmp_path / out), tokenizer=str(tok_dir), tracking="disabled",
                       registry=str(tmp_path / "reg.sqlite"), **over)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run shared by the tests that only read it: (report, its tmp dir)."""
    tmp_path = tmp_path_factory.mktemp("cognate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tmp_path / "forge_home"))
        return run_cognate(_config(tmp_path)), tmp_path


def test_smoke_phase_makes_three_mergeable_measured_models(smoke_run):
    from transformers import AutoModelForCausalLM

    report, tmp_path = smoke_run
    out = tmp_path / "cg"
    assert list(report["stages"]) == ["data", "foundation", "specialise_reasoning", "specialise_memory",
                                      "specialise_speed", "control_independent", "control_transformer",
                                      "evaluate", "register"]
    assert json.loads((out / "cognate_report.json").read_text())["diversity"] == report["diversity"]
    ev = report["stages"]["evaluate"]
    assert set(ev["models"]) == {"foundation", "reasoning", "memory", "speed"}
    for name, figures in ev["models"].items():
        assert figures["val_loss"] > 0 and 1 <= figures["mean_halting_steps"] <= figures["max_recursion_steps"]
        assert sum(figures["halting_histogram"]) == pytest.approx(1.0)
        assert figures["easy_accuracy"]["n"] == 4 and 0 <= figures["easy_accuracy"]["accuracy"] <= 1
    assert 0 <= report["diversity"] <= 1 and "merged_val_loss" in ev["merge"]
    n = ev["eval_blocks"]
    assert len(ev["unigram_block_losses"]) == n and ev["unigram_val_loss_all"] > 0
    for figures in ev["models"].values():  # paired with the unigram baseline over the same blocks
        assert len(figures["block_losses"]) == n
        assert figures["vs_unigram"]["mean"] == pytest.approx(figures["val_loss"] - ev["unigram_val_loss"])
    assert ev["merge"]["vs_better_parent"]["parent"] in ev["merge"]["parents"]
    for figures in ev["models"].values():  # the verdict is the interval's, not the point estimate's
        assert figures["beats_unigram"] == (figures["vs_unigram"]["ci95"][1] < 0)
    best = ev["controls"]["best_minus_transformer"]
    assert best["specialisation"] in ("reasoning", "memory", "speed")
    controls = ev["controls"]
    assert controls["shared_trunk_merge_val_loss"] == ev["merge"]["merged_val_loss"]
    assert controls["independent_merge_val_loss"] > 0 and controls["transformer_val_loss"] > 0
    cognate_params = report["stages"]["foundation"]["n_params"]
    assert abs(report["stages"]["control_transformer"]["n_params"] - cognate_params) < 0.05 * cognate_params
    shapes, windows = set(), set()
    for name in ("reasoning", "memory", "speed"):
        model = AutoModelForCausalLM.from_pretrained(out / "models" / name)
        shapes.add(tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
        windows.add((model.config.sliding_window, model.config.max_recursion_steps))
        meta = json.loads((out / "models" / name / "forge_meta.json").read_text())
        assert meta["phase"] == 1 and meta["cognate"]["specialisation"] == name and "val_loss" in meta["metrics"]
        assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    assert len(shapes) == 1 and len(windows) == 3  # one shape (mergeable), three behaviours
    from agent_forge.models import load_model

    loaded, tok = load_model(str(out / "models" / "speed"), device="cpu")  # how Phases 2-4 load their input
    assert type(loaded).__name__ == "CognateForCausalLM" and len(tok) == loaded.config.vocab_size
    rows = Registry(tmp_path / "reg.sqlite").list_models(phase=1)
    assert sorted(r.name.split(":")[-1] for r in rows) == ["memory", "reasoning", "speed"]
    for r in rows:
        lo, hi = r.metrics["val_loss_ci95"]
        assert lo < r.metrics["val_loss"] < hi


def test_evomerge_takes_the_three_models_directly(smoke_run):
    """The 1 -> 2 handoff: `forge evomerge --models` merges them into a champion that is
    still a Cognate model, loadable like any HF model."""
    from transformers import AutoModelForCausalLM

    from agent_forge.evomerge.phase import make_config as evomerge_config
    from agent_forge.evomerge.phase import run_evomerge

    report, tmp_path = smoke_run
    cfg = evomerge_config("smoke", models=tuple(report["models"].values()), out=str(tmp_path / "evo"),
                          base=str(tmp_path / "cg" / "foundation" / "model"), tracking="disabled",
                          registry=str(tmp_path / "reg.sqlite"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_HOME", str(tmp_path / "forge_home"))
        merged = run_evomerge(cfg)
    assert merged["stages"]["handoff"]["ok"], merged["stages"]["handoff"]
    champion = AutoModelForCausalLM.from_pretrained(tmp_path / "evo" / "model")
    assert type(champion).__name__ == "CognateForCausalLM"


def crash_after_steps(n: int):
    """A progress callback that raises Crash after n training steps over all stages."""
    seen = {"steps": 0}

    def progress(done, total, row):
        seen["steps"] += 1
        if seen["steps"] == n:
            raise Crash(n)
    return progress


def test_the_dashboard_shows_the_run(smoke_run, monkeypatch):
    """The Cognate page: its kind, every stage done (controls included), one loss and one
    halting column per trained model, the summary `forge cognate` printed."""
    from streamlit.testing.v1 import AppTest

    from agent_forge.cognate.commands import summary_rows
    from agent_forge.dashboard import data

    report, tmp_path = smoke_run
    out = tmp_path / "cg"
    assert data.run_kind(out) == "cognate" and data.run_status(out) == "finished"
    prog = data.stage_progress(out)
    assert prog["stages_done"] == prog["stages_total"] == list(report["stages"])
    models = {"foundation", "reasoning", "memory", "speed", "control_independent", "control_transformer"}
    records = data.read_metrics(out)
    assert set(data.stage_curves(records, "loss", "cognate_").columns) == models
    halting = data.stage_curves(records, "halting_steps", "cognate_")
    assert set(halting.columns) == models
    assert (halting["control_transformer"].dropna() == 0).all()  # a plain transformer does not halt
    assert all((halting[m].dropna() >= 1).all() for m in models - {"control_transformer"})  # ACT: >= 1 step
    assert data.cognate_summary(out) == summary_rows(report)

    monkeypatch.setenv("FORGE_RUNS_DIR", str(out))
    monkeypatch.setenv("FORGE_REGISTRY", str(tmp_path / "reg.sqlite"))
    at = AppTest.from_file(str(Path(data.__file__).with_name("app.py")), default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "Agent Forge · Phase 1 Cognate"
    n = len(report["stages"])
    assert f"Stages: {n} / {n} done" in [p.proto.text for p in at.get("progress")]
    assert [s.value for s in at.subheader] == ["Summary"]
    table = at.dataframe[0].value
    assert list(table["what"]) == [k.strip() for k, _ in summary_rows(report)]


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, forge_home):
    from safetensors.torch import load_file

    cfg = _config(tmp_path, out="crash")
    with pytest.raises(Crash):
        run_cognate(cfg, progress=crash_after_steps(7))  # foundation (4 steps), then step 3 of reasoning
    state = json.loads((tmp_path / "crash" / STATE_FILE).read_text())
    assert list(state["stages"]) == ["data", "foundation"]
    assert (tmp_path / "crash" / "runs" / "reasoning" / "checkpoints").exists()
    with pytest.raises(CognatePhaseError, match="--resume"):
        run_cognate(cfg)
    resumed = run_cognate(cfg, resume=True)
    assert resumed["stages"]["specialise_reasoning"]["resumed_from"] == 2
    run_cognate(_config(tmp_path, out="whole"))
    for name in ("reasoning", "memory", "speed"):
        a = load_file(tmp_path / "crash" / "models" / name / "model.safetensors")
        b = load_file(tmp_path / "whole" / "models" / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_cli_smoke_and_bad_preset(tmp_path, forge_home):
    from typer.testing import CliRunner

    from agent_forge.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["cognate", "--out", str(tmp_path / "x"), "--preset", "huge"])
    assert bad.exit_code == 2 and "unknown preset" in bad.output
    cfg = _config(tmp_path)  # writes the tokenizer
    ok = runner.invoke(app, ["cognate", "--out", str(tmp_path / "cli"), "--preset", "smoke", "--tokenizer",
                             str(tmp_path / "tok"), "--tracking", "disabled", "--registry", str(cfg.registry)])
    assert ok.exit_code == 0, ok.output
    assert "diversity (target > 0.3)" in ok.output and (tmp_path / "cli" / "cognate_report.json").exists()


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_models(tmp_path, forge_home):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    cfg = _config(tmp_path, out="ref")
    yaml = tmp_path / "long.yaml"
    yaml.write_text("train:\n  specialise_steps: 16\n")  # the kill lands at step 2 of the first
    args = ["cognate", "--preset", "smoke", "--config", str(yaml), "--tokenizer", str(tmp_path / "tok"),
            "--tracking", "disabled", "--registry", str(cfg.registry)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    forge = lambda *extra: subprocess.Popen([sys.executable, "-m", "agent_forge", *args, *extra], env=env,  # noqa: E731
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = forge("--out", str(tmp_path / "run"))
    sigkill_once_checkpointed(victim, tmp_path / "run" / "runs" / "reasoning" / "checkpoints")
    resumed = forge("--out", str(tmp_path / "run"), "--resume")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    run_cognate(make_config("smoke", yaml, out=str(tmp_path / "ref"), tokenizer=str(tmp_path / "tok"),
                            tracking="disabled", registry=cfg.registry))
    for name in ("reasoning", "memory", "speed"):
        a = load_file(tmp_path / "run" / "models" / name / "model.safetensors")
        b = load_file(tmp_path / "ref" / "models" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in b), name
