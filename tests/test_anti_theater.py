"""Anti-theater: a theater model must FAIL, a genuine thinker must PASS."""

import json
import random
from types import SimpleNamespace

import pytest
import torch
import typer
from typer.testing import CliRunner

import agent_forge.quietstar.coherence as coherence
import agent_forge.validation.anti_theater as at
from agent_forge.data.evalsets import EvalItem
from agent_forge.data.schema import Record, Segment
from agent_forge.inference import Generation
from agent_forge.validation.anti_theater import gold_text, run_anti_theater
from agent_forge.vocab import THINK_CLOSE, THINK_OPEN, add_thinking_tokens
from conftest import make_tiny_model, make_tiny_tokenizer
from test_inference import MEMORY, memorised_model

ITEMS = [EvalItem(f"q{i}", f"What is {i} + {i + 3}?", str(2 * i + 3), "chain_sum") for i in range(40)]
MEMORY_ITEMS = [EvalItem(f"m{i}", q, right, "arith") for i, (q, (_, right, _)) in enumerate(MEMORY.items())]


def _gen(thinking, answer, mode, closed=True):
    prefix = THINK_OPEN + (THINK_CLOSE if mode == "off" else "")
    completion = prefix + (f"{thinking}{THINK_CLOSE}" if mode == "on" else "") + f" {answer}"
    return Generation("Question: ...\nAnswer:" + prefix, "", completion,
                      thinking if mode == "on" else "", answer, closed, 10, 0.01, mode)


def theater_generate(questions, thinking):
    """Thinks fluent-looking nonsense; the answer never depends on it (right half the time)."""
    out = []
    for q, item in zip(questions, ITEMS):
        answer = item.answer if int(item.id[1:]) % 2 == 0 else "0"
        rng = random.Random(item.id)
        thought = f"<step> consider the numbers {rng.randint(1, 99)} carefully<doubt> looks fine"
        out.append(_gen(thought if thinking == "on" else "", answer, thinking))
    return out


def genuine_generate(questions, thinking):
    """The answer is computed in the thinking; without it, a wrong guess. When the thought
    degenerates into repetition, the copied answer is wrong too."""
    out = []
    for item in ITEMS:
        i = int(item.id[1:])
        if thinking == "off":
            out.append(_gen("", str(2 * i + 5), "off"))
        elif i % 4 == 3:  # babbling thought, wrong answer
            out.append(_gen(f"<step> {i} {i} {i} {i} {i} {i}", str(i), "on"))
        else:
            out.append(_gen(f"<step> {i} + {i + 3} = {2 * i + 3}<doubt> check {2 * i + 3} - {i} ok",
                            str(2 * i + 3), "on"))
    return out


def test_theater_model_fails_and_says_roll_back():
    rep = run_anti_theater(None, None, ITEMS, generate_fn=theater_generate)
    by = {t["name"]: t for t in rep.tests}
    assert by["divergence"]["value"] == 0.0 and not by["divergence"]["passed"]
    assert by["ablation"]["value"] == 0.0 and not by["ablation"]["passed"]
    assert not by["correlation"]["passed"]
    assert not rep.passed and rep.recommendation == "roll back" and "Roll back" in rep.sentence


def test_genuine_model_passes_and_says_keep():
    rep = run_anti_theater(None, None, ITEMS, generate_fn=genuine_generate)
    by = {t["name"]: t for t in rep.tests}
    assert by["divergence"]["value"] > 0.3 and by["divergence"]["unclosed_rate"] == 0.0
    assert by["ablation"]["value"] == pytest.approx(75.0) and by["ablation"]["p"] < 1e-6
    assert by["correlation"]["value"] > 0.9
    assert rep.passed and rep.recommendation == "keep" and rep.n == 40
    assert set(rep.to_dict()) == {"tests", "passed", "recommendation", "sentence", "n"}


def test_default_coherence_says_which_parts_applied():
    """The default is coherence.anti_theater_coherence: the babbling thoughts (every 4th)
    make no checkable claim, so claim consistency applies to 30 of 40."""
    rep = run_anti_theater(None, None, ITEMS, generate_fn=genuine_generate)
    corr = {t["name"]: t for t in rep.tests}["correlation"]
    assert corr["coherence_parts"] == {"semantic": 40, "structure": 40, "claims": 30, "n": 40}
    assert "semantic 40/40, structure 40/40, claims 30/40" in corr["detail"]


def test_custom_coherence_callable_is_used():
    seen = []
    rep = run_anti_theater(None, None, ITEMS, generate_fn=genuine_generate,
                           coherence_fn=lambda ts, qs: seen.extend(qs) or [0.5] * len(ts))
    corr = {t["name"]: t for t in rep.tests}["correlation"]
    assert len(seen) == 40 and not corr["passed"] and corr["coherence_parts"] is None


def _one_item_gain(questions, thinking):
    """32 items: thinking on gets one more right than off (3.1 points, McNemar p = 1)."""
    out = []
    for i, item in enumerate(ITEMS[:32]):
        right = i < 16 or (thinking == "on" and i == 16)
        out.append(_gen(f"<step> {item.question} {i}" if thinking == "on" else "",
                        item.answer if right else "-1", thinking))
    return out


def test_ablation_needs_significance_not_just_points():
    """+3.1 points on 32 items is one item: more than the 2-point threshold, but noise."""
    rep = run_anti_theater(None, None, ITEMS[:32], generate_fn=_one_item_gain)
    abl = {t["name"]: t for t in rep.tests}["ablation"]
    assert abl["value"] == pytest.approx(100 / 32) and abl["value"] > abl["threshold"]
    assert abl["p"] == pytest.approx(1.0) and abl["alpha"] == 0.05
    assert not abl["passed"]
    assert "+3.1 points" in abl["detail"] and "McNemar p=1" in abl["detail"]
    assert "p=1; needs > 2.0 and p < 0.05" in rep.sentence
    assert all(r["well_formed_on"] for r in rep.per_example)  # one block, closed, then an answer


def _never_closes(questions, thinking):
    """Thinking that runs on and never closes (no answer), against a direct answer off."""
    if thinking == "off":
        return [_gen("", "5", "off") for _ in questions]
    return [_gen("<step> and then and then and then", "", "on", closed=False) for _ in questions]


def test_unclosed_thinking_does_not_buy_divergence():
    rep = run_anti_theater(None, None, ITEMS[:8], generate_fn=_never_closes)
    div = {t["name"]: t for t in rep.tests}["divergence"]
    assert div["value"] == 0.0 and not div["passed"]  # the old code: distance("", "5") = 1.0, passed
    assert div["unclosed_rate"] == 1.0 and div["value_closed"] is None
    assert "unclosed 100.0%" in div["detail"]
    assert not any(r["well_formed_on"] for r in rep.per_example)  # no answer after the block


def test_real_tiny_model_logprob_utility():
    """The memorised model reasons to the answer: divergence and ablation pass for real."""
    model, tok = memorised_model()
    rep = run_anti_theater(model, tok, MEMORY_ITEMS, batch_size=3, max_new_tokens=24)
    by = {t["name"]: t for t in rep.tests}
    assert by["divergence"]["passed"] and by["ablation"]["value"] == pytest.approx(100.0)
    assert all(r["utility"] > 0 for r in rep.per_example)  # thinking raises log p(gold)


def test_logprob_gain_scores_the_gold_letter_of_a_multiple_choice_item(monkeypatch):
    """ARC / CommonsenseQA golds are letters; the log-prob is of the letter as score() reads
    it (upper case), so a JSONL item with gold "b" is scored on " B", not " b"."""
    scored = []
    monkeypatch.setattr(at, "continuation_logprobs",
                        lambda model, tok, pairs, batch: scored.extend(pairs) or [0.0] * len(pairs))
    item = EvalItem("mc", "Which is red?\nA. sky\nB. blood", "b", "arc_easy", choices=["sky", "blood"])
    at._logprob_gain(None, None, [item], [_gen("<step> blood is red", "B", "on")], "default", 4)
    assert [gold for _, gold in scored] == [" B", " B"]
    assert gold_text(EvalItem("n", "q", "1,200", "gsm8k")) == "1200" and gold_text(item) == "B"


# --- a model baked on filler traces must be rolled back ------------------------------------

FILLER_QUESTIONS = [(a, b) for a in range(1, 10) for b in range(1, 10)][:24]


def _filler_model():
    """A tiny Llama SFT-trained (as Step 1 bakes) on right answers behind a thought that
    carries nothing: "<step> let me think<step> ok" for every question."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from agent_forge.quietstar.bake import sft_loss
    from agent_forge.quietstar.bake_data import collate, encode_record

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok) + 12, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    add_thinking_tokens(model, tok)
    filler = [Segment("step", "let me think"), Segment("step", "ok")]
    records = [Record(f"f{i}", f"What is {a} + {b}?", filler, str(a + b), str(a + b), "filler")
               for i, (a, b) in enumerate(FILLER_QUESTIONS)]
    batch = collate([encode_record(r, tok) for r in records], tok.pad_token_id)
    # Train until memorised rather than for a fixed count: a fixed 300 steps at lr 1e-2
    # left the premise (right answers) to the library build's float order.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(1500):
        loss = sft_loss(model, batch)
        if loss.item() < 0.005:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok, [EvalItem(r.id, r.question, r.gold, "filler") for r in records]


def test_model_baked_on_filler_traces_is_rolled_back():
    """Real generation, real log-probs, the default coherence: the filler thoughts get the
    answers right, yet anti-theater must say roll back."""
    model, tok, items = _filler_model()
    rep = run_anti_theater(model, tok, items, max_new_tokens=32, batch_size=len(items))
    by = {t["name"]: t for t in rep.tests}
    assert by["ablation"]["accuracy_on"] >= 0.75  # the premise: right answers behind filler
    assert all("let me think" in row for row in _thoughts(model, tok, items[:4]))
    assert not by["ablation"]["passed"] and not by["correlation"]["passed"]
    assert not rep.passed and rep.recommendation == "roll back"


def _thoughts(model, tok, items):
    from agent_forge.inference import generate_answers

    return [g.thinking for g in generate_answers(model, tok, [it.question for it in items], thinking="on",
                                                 max_new_tokens=32)]


# --- the pipeline and `forge anti-theater` give the same verdict on the same data -------------


def _command_app(monkeypatch, load):
    import agent_forge.data.evalsets as evalsets
    import agent_forge.models as models
    from agent_forge.evaluation import commands

    monkeypatch.setattr(models, "load_model", lambda spec, device=None: load())
    monkeypatch.setattr(evalsets, "load_eval_set", lambda name, limit=None: MEMORY_ITEMS[:limit])
    app = typer.Typer()
    app.command("anti-theater")(commands.anti_theater_cmd)
    app.command("unused")(lambda: None)  # two commands: typer keeps the sub-command name
    return app


def test_pipeline_stage_and_command_agree(monkeypatch, tmp_path):
    """Same model, items and budget: the pipeline's stage and the command report the same
    tests, coherence included (they once used two different coherence functions)."""
    from agent_forge.quietstar.pipeline import stage_anti_theater

    app = _command_app(monkeypatch, memorised_model)
    ctx = SimpleNamespace(out=tmp_path, state=SimpleNamespace(data={"stages": {}}),
                          cfg=SimpleNamespace(device=None, eval_dataset="x", eval_samples=3, max_new_tokens=24,
                                              check_honesty_threshold=0.95))
    stage = stage_anti_theater(ctx)
    res = CliRunner().invoke(app, ["anti-theater", "--model", "x", "--data", "x", "--limit", "3",
                                   "--max-new-tokens", "24", "--json"])
    command = json.loads(res.stdout)
    assert command["tests"] == stage["tests"] and command["recommendation"] == stage["recommendation"]
    assert command["tests"][2]["coherence_parts"]["n"] == 3


def _length_embedder(texts):
    """A stand-in sentence embedder that costs nothing: 2-d unit vectors from text length."""
    return torch.nn.functional.normalize(torch.tensor([[1.0, len(t) % 7 + 0.5] for t in texts]), dim=-1)


def test_command_runs_on_arc_easy_end_to_end(monkeypatch):
    """`forge anti-theater --data arc_easy --limit 300` on a tiny model: real ARC items
    (letter golds, no arithmetic, so claim consistency applies nowhere), one JSON object."""
    import agent_forge.models as models
    from agent_forge.evaluation import commands

    def tiny():
        tok = make_tiny_tokenizer()
        model = make_tiny_model("llama", len(tok))
        add_thinking_tokens(model, tok)
        return model, tok
    monkeypatch.setattr(models, "load_model", lambda spec, device=None: tiny())
    monkeypatch.setattr(coherence, "cached_minilm", lambda: _length_embedder)  # MiniLM itself: test_coherence
    app = typer.Typer()
    app.command("anti-theater")(commands.anti_theater_cmd)
    app.command("unused")(lambda: None)
    res = CliRunner().invoke(app, ["anti-theater", "--model", "tiny", "--data", "arc_easy", "--limit", "300",
                                   "--max-new-tokens", "8", "--json"])
    out = json.loads(res.stdout)
    assert res.exit_code == (0 if out["passed"] else 1) and out["n"] == 300
    parts = {t["name"]: t for t in out["tests"]}["correlation"]["coherence_parts"]
    assert parts["n"] == 300 and parts["semantic"] == 300


def test_summary_rows_state_p_unclosed_rate_and_coherence_parts():
    from agent_forge.report import summary_rows

    rep = run_anti_theater(None, None, ITEMS, generate_fn=genuine_generate)
    rows = dict(summary_rows({"stages": {"anti_theater": rep.to_dict()}}))
    ablation = rows["  ablation (> 2.0, p < 0.05)"]
    assert ablation.startswith("75, p=") and ablation.endswith("pass")
    assert rows["  divergence (> 0.3)"].endswith("(unclosed 0.0%) pass")
    assert "(parts: semantic 40, structure 40, claims 30 of 40)" in rows["  correlation (> 0.5)"]
