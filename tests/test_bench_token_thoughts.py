"""bench/bench_token_thoughts.py: the thought-mixed log-likelihood against a slow
per-position reference, the NLL / share arithmetic by hand, and a smoke run of the whole
bench on a tiny saved token-level model."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agent_forge.models import save_model
from agent_forge.quietstar.mixing import MixingHead, save_head
from agent_forge.quietstar.thought_inference import HEAD_FILE
from agent_forge.vocab import add_thinking_tokens, get_vocab

from conftest import make_tiny_model, make_tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_token_thoughts as bench  # noqa: E402


def setup(seed=0, open_head=True):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok), seed=seed).double()
    ids = add_thinking_tokens(model, tok)
    v = get_vocab()
    head = MixingHead(model.config.hidden_size).double()
    if open_head:
        with torch.no_grad():
            head.net[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model, tok, head, ids[v.open], ids[v.close]


@torch.no_grad()
def slow_mixed_ll(model, head, ids, j, start, end, L):
    """log p(x[j+1]) with one greedy thought after position j, the plain way: feed the
    prefix, then the thought token by token with full forwards, then mix and score."""
    prefix = ids[: j + 1].tolist()
    h = lambda seq: model.model(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]  # noqa: E731
    thought = [start]
    for _ in range(L - 2):
        logits = model.lm_head(h(prefix + thought)).clone()
        logits[[start, end]] = float("-inf")
        thought.append(int(logits.argmax()))
    h_thought, h_base = h(prefix + thought + [end]), h(prefix)
    mixed = model.lm_head(head(h_base, h_thought))
    return float(torch.log_softmax(mixed, -1)[ids[j + 1]]), float(torch.log_softmax(model.lm_head(h_base), -1)[ids[j + 1]])


def test_read_batch_matches_the_slow_reference():
    model, tok, head, start, end = setup()
    rows = [tok("Question: 2 + 3?\nAnswer: 5")["input_ids"], tok("Question: 7 - 1?\nAnswer: 6!")["input_ids"]]
    ids, mask = bench.pad(rows, tok.pad_token_id)
    got = bench.read_batch(model, head, ids, mask, start, end, thought_len=5)
    for b, row in enumerate(rows):
        for j in (0, 5, len(row) - 2):
            mixed, plain = slow_mixed_ll(model, head, torch.tensor(row), j, start, end, 5)
            assert got["mixed"][b, j].item() == pytest.approx(mixed, abs=1e-5)
            assert got["plain"][b, j].item() == pytest.approx(plain, abs=1e-5)


def test_a_closed_head_changes_nothing():
    model, tok, head, start, end = setup(open_head=False)
    ids, mask = bench.pad([tok("Question: 4 + 4?\nAnswer: 8")["input_ids"]], tok.pad_token_id)
    got = bench.read_batch(model, head, ids, mask, start, end, thought_len=4)
    assert torch.equal(got["mixed"], got["plain"]) and not got["weight"].any()


def row(plain, mixed, entropy, answer):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return {"plain": t(plain), "mixed": t(mixed), "entropy": t(entropy), "answer": torch.tensor(answer),
            "weight": t([0.1] * len(plain))}


def test_nll_scopes_thresholds_and_share_by_hand():
    rows = [row([-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [0.5, 3.0, 1.0], [False, True, True]),
            row([-2.0, -2.0], [-4.0, -1.0], [5.0, 0.1], [False, True])]
    assert bench.nll(rows, "plain", "all").tolist() == pytest.approx([2.0, 2.0])
    assert bench.nll(rows, "mixed", "answer").tolist() == pytest.approx([1.0, 1.0])
    # threshold 2: thoughts only at entropy > 2 -> row 0 position 1, row 1 position 0
    assert bench.nll(rows, "plain", "all", thr=2.0).tolist() == pytest.approx([(1 + 1 + 3) / 3, (4 + 2) / 2])
    assert bench.thought_fraction(rows, "all", 2.0) == pytest.approx(2 / 5)
    none, every, diff = np.array([2.0, 3.0]), np.array([1.0, 2.0]), np.array([1.5, 3.0])
    assert bench.share_kept(none, every, diff)["share"] == pytest.approx(0.5 / 2.0)


def test_smoke_run_writes_every_table_field(tmp_path, monkeypatch):
    model, tok, head, start, end = setup(open_head=True)
    model_dir = tmp_path / "tok"
    save_model(model.float(), tok, model_dir, {"phase": 3, "step": 2, "mode": "token", "config": {"thought_len": 4}})
    save_head(head.float(), model_dir / HEAD_FILE)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "res.json")
    monkeypatch.setattr(bench, "same_length_prompts", lambda tok, items, b: torch.randint(0, 200, (b, 6)))
    bench.main(["--model", str(model_dir), "--base", str(model_dir), "--limit", "4", "--acc-limit", "2",
                "--latency-batches", "1", "2", "--new", "2", "--threads", "1", "--batch", "2"])
    import json
    rec = json.loads((tmp_path / "res.json").read_text())["default"]
    assert rec["n"] == 4 and set(rec["nll"]) == {"all_tokens", "answer"}
    # the same weights read without thoughts are the base model: no change from training
    assert rec["nll"]["answer"]["none_minus_before"]["mean_diff"] == pytest.approx(0.0, abs=1e-5)
    assert set(rec["accuracy"]) == {"none", "all", "difficult@0.1", "difficult@0.25"}
    assert [lat["batch"] for lat in rec["latency"]] == [1, 2]
    assert rec["latency"][0]["rows"]["all"]["thought_fraction"] == 1.0
