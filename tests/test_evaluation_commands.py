"""The typer command functions print one JSON object with --json, and a table otherwise."""

import json

import torch
import typer
from typer.testing import CliRunner

from agent_forge.data.evalsets import EvalItem
from agent_forge.evaluation import commands
from test_inference import MEMORY, memorised_model

ITEMS = [EvalItem(f"m{i}", q, r, "arith") for i, (q, (_, r, _)) in enumerate(MEMORY.items())]


def _app(monkeypatch, loader=None):
    """The three commands; every --model loads `loader(spec)` (default: the memorised model)."""
    import agent_forge.data.evalsets as evalsets
    import agent_forge.models as models

    loader = loader or (lambda spec: memorised_model())
    monkeypatch.setattr(models, "load_model", lambda spec, device=None: loader(spec))
    monkeypatch.setattr(evalsets, "load_eval_set", lambda name, limit=None: ITEMS[:limit] if limit else ITEMS)
    app = typer.Typer()
    app.command("eval")(commands.eval_cmd)
    app.command("anti-theater")(commands.anti_theater_cmd)
    app.command("ab")(commands.ab_cmd)
    return app


def test_eval_json_is_one_object(monkeypatch):
    res = CliRunner().invoke(_app(monkeypatch), ["eval", "--model", "x", "--data", "y", "--thoughts", "on",
                                                 "--max-new-tokens", "24", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["accuracy"] == 1.0 and out["n"] == 3 and len(out["ci95"]) == 2
    assert {"per_family", "ms_per_example"} <= set(out)


def test_eval_table_and_bad_thoughts(monkeypatch):
    app = _app(monkeypatch)
    res = CliRunner().invoke(app, ["eval", "--model", "x", "--data", "y", "--thoughts", "off",
                                   "--limit", "2", "--max-new-tokens", "8"])
    assert res.exit_code == 0 and "0.0%" in res.stdout
    bad = CliRunner().invoke(app, ["eval", "--thoughts", "maybe"])
    assert bad.exit_code == 2


def test_anti_theater_verdict_and_exit_status(monkeypatch):
    """The memorised model's thoughts carry its answers (on 100%, off 0%); a random model's do
    not, so its verdict is "roll back" with exit status 1, in JSON and in the table."""
    res = CliRunner().invoke(_app(monkeypatch), ["anti-theater", "--model", "x", "--data", "y", "--json"])
    out = json.loads(res.stdout)
    tests = {t["name"]: t for t in out["tests"]}
    assert list(tests) == ["divergence", "ablation", "correlation", "check_honesty"]
    assert tests["ablation"]["value"] == 100.0 and tests["divergence"]["passed"]
    assert res.exit_code == (0 if out["passed"] else 1)
    app = _app(monkeypatch, loader=lambda spec: _random_thinking_model())
    res = CliRunner().invoke(app, ["anti-theater", "--model", "x", "--data", "y", "--json"])
    out = json.loads(res.stdout)
    assert res.exit_code == 1 and not out["passed"] and out["recommendation"] == "roll back"
    assert {t["name"]: t["value"] for t in out["tests"]}["ablation"] == 0.0
    res = CliRunner().invoke(app, ["anti-theater", "--model", "x", "--data", "y"])
    assert res.exit_code == 1 and "roll back" in res.stdout


def test_ab_json(monkeypatch):
    res = CliRunner().invoke(_app(monkeypatch), ["ab", "--baseline", "x", "--candidate", "x", "--data", "y",
                                                 "--rounds", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["winner"] == "tie" and out["rounds"] == 1
    assert out["thought_positions"] == {"baseline": "none", "candidate": "none"}


def _random_thinking_model():
    """A tiny untrained Llama with the thinking tokens: its thoughts carry nothing."""
    from agent_forge.vocab import add_thinking_tokens
    from conftest import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    return model, tok


def test_eval_thoughts_off_on_a_plain_model_answers_directly(monkeypatch):
    """`--thoughts off` on a model without thinking tokens answers directly, and says so."""
    from conftest import make_tiny_model, make_tiny_tokenizer

    def plain(spec):
        tok = make_tiny_tokenizer()
        return make_tiny_model("qwen2", len(tok)), tok
    app = _app(monkeypatch, loader=plain)
    res = CliRunner().invoke(app, ["eval", "--model", "default", "--data", "y", "--thoughts", "off",
                                   "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["mode"] == "direct" and "answering directly" in out["note"] and out["n"] == 3
    res = CliRunner().invoke(app, ["eval", "--model", "default", "--data", "y", "--thoughts", "off",
                                   "--max-new-tokens", "4"])
    assert res.exit_code == 0 and "answering directly" in res.stdout
    res = CliRunner().invoke(app, ["eval", "--model", "default", "--data", "y", "--thought-positions", "all"])
    assert res.exit_code == 2 and "mixing_head" in res.output


def _token_level_dir(tmp_path, bias: float = 0.0):
    """A model directory holding a mixing head (the weights come from the patched loader);
    bias 0 = a closed head (thoughts change nothing), large = the thought's state decides."""
    from agent_forge.quietstar.mixing import MixingHead, save_head
    from agent_forge.quietstar.thought_inference import HEAD_FILE

    head = MixingHead(memorised_model()[0].config.hidden_size)
    with torch.no_grad():
        head.net[-1].bias.fill_(bias)
    save_head(head, tmp_path / "token" / HEAD_FILE)
    return str(tmp_path / "token")


def _spy_decoder(monkeypatch) -> list:
    """Record (model_dir, mode, visible_block) of every thought decoder the commands build."""
    from agent_forge.quietstar import thought_inference

    calls, real = [], thought_inference.load_decoder

    def spy(model, tok, model_dir=None, mode="difficult", visible_block=False, **kw):
        calls.append((model_dir, mode, visible_block))
        return real(model, tok, model_dir, mode=mode, visible_block=visible_block, **kw)
    monkeypatch.setattr(thought_inference, "load_decoder", spy)
    return calls


def test_eval_uses_a_token_level_models_thoughts(monkeypatch, tmp_path):
    """A model directory with a mixing head is evaluated with its silent thoughts (difficult
    positions by default) and still writes its block; an open head changes the answers."""
    closed = _token_level_dir(tmp_path / "a")
    calls = _spy_decoder(monkeypatch)
    app = _app(monkeypatch)
    res = CliRunner().invoke(app, ["eval", "--model", closed, "--data", "y", "--max-new-tokens", "24", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["thought_positions"] == "difficult" and out["accuracy"] == 1.0 and out["ms_per_example"] > 0
    assert calls == [(closed, "difficult", True)]
    res = CliRunner().invoke(app, ["eval", "--model", closed, "--data", "y", "--max-new-tokens", "24",
                                   "--thought-positions", "all"])
    assert res.exit_code == 0 and "before every visible token" in res.stdout and "ms/example" in res.stdout
    opened = _token_level_dir(tmp_path / "b", bias=3.0)
    acc = {}
    for positions in ("all", "none"):
        res = CliRunner().invoke(app, ["eval", "--model", opened, "--data", "y", "--max-new-tokens", "24",
                                       "--thought-positions", positions, "--json"])
        acc[positions] = json.loads(res.stdout)["accuracy"]
    assert acc["none"] == 1.0 and acc["all"] < 1.0  # the head in the directory was used
    assert calls[-1] == (opened, "all", True) and len(calls) == 3


def test_anti_theater_and_ab_use_a_token_level_models_thoughts(monkeypatch, tmp_path):
    """Anti-theater thinks silently in its thinking-on pass only; A/B in the arm with the head."""
    token = _token_level_dir(tmp_path)
    calls = _spy_decoder(monkeypatch)
    app = _app(monkeypatch)
    res = CliRunner().invoke(app, ["anti-theater", "--model", token, "--data", "y", "--json"])
    out = json.loads(res.stdout)
    assert out["thought_positions"] == "difficult" and set(out["ms_per_example"]) == {"on", "off"}
    assert calls == [(token, "difficult", True)]
    res = CliRunner().invoke(app, ["ab", "--baseline", "x", "--candidate", token, "--data", "y", "--rounds", "1",
                                   "--thought-positions", "all", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["thought_positions"] == {"baseline": "none", "candidate": "all"}
    assert set(out["ms_per_example"]) == {"baseline", "candidate"} and calls[-1] == (token, "all", True)
    assert len(calls) == 2


def test_eval_and_anti_theater_exclude_seen_leave_out_trained_questions(monkeypatch, tmp_path):
    seen = tmp_path / "train.jsonl"
    seen.write_text(json.dumps({"question": ITEMS[0].question}) + "\n")
    res = CliRunner().invoke(_app(monkeypatch), ["eval", "--model", "x", "--data", "y", "--thoughts", "on",
                                                 "--max-new-tokens", "24", "--exclude-seen", str(seen), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n"] == len(ITEMS) - 1
    # Anti-theater on the two items left (it runs on all three without the option: test above).
    res = CliRunner().invoke(_app(monkeypatch), ["anti-theater", "--model", "x", "--data", "y",
                                                 "--exclude-seen", str(seen)])
    assert "left out 1 of 3 items" in res.output and "needs at least 3 items" in res.output
    assert res.exit_code == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no question here"}\n')
    res = CliRunner().invoke(_app(monkeypatch), ["eval", "--model", "x", "--data", "y", "--exclude-seen", str(bad)])
    assert res.exit_code == 2 and "--exclude-seen" in res.output and "'question' field" in res.output
