"""evaluate(): scoring rules, summaries, and log-likelihood multiple choice vs a slow version."""

import functools

import pytest
import torch

from agent_forge.data.evalsets import EvalItem
from agent_forge.evaluation.metrics import wilson_interval
from agent_forge.evaluation.runner import (
    bare_question, choice_loglik_accuracy, continuation_logprobs, evaluate, score,
)
from agent_forge.inference import Generation, generate_answers
from conftest import make_tiny_model, make_tiny_tokenizer
from test_inference import MEMORY, memorised_model


def _items():
    return [EvalItem(f"m{i}", q, right, "arith" if i < 2 else "other")
            for i, (q, (_, right, _)) in enumerate(MEMORY.items())]


def test_score_rules():
    num = EvalItem("a", "q", "1,200", "f")
    assert score(num, "$1200.") == (True, "1200")
    assert score(num, "72 + 23 = 1200") == (False, "72")  # first number of the slot
    assert score(num, None) == (False, None)
    mc = EvalItem("b", "q\nA. red\nB. blue", "B", "mc", choices=["red", "blue"])
    assert score(mc, "(B)") == (True, "B") and score(mc, "red") == (False, "A")
    text = EvalItem("c", "q", "Paris", "f")
    assert score(text, "paris.")[0] and not score(text, "Lyon")[0]


def test_evaluate_memorised_model_on_and_off():
    model, tok = memorised_model()
    items = _items()
    on = evaluate(model, tok, items, thinking="on", batch_size=2, max_new_tokens=24, progress=False)
    off = evaluate(model, tok, items, thinking="off", batch_size=2, max_new_tokens=8, progress=False)
    assert on.accuracy == 1.0 and off.accuracy == 0.0 and on.n == 3
    assert on.ci95 == list(wilson_interval(3, 3))
    assert on.per_family["arith"] == {"accuracy": 1.0, "n": 2, "ci95": list(wilson_interval(2, 2))}
    assert on.no_answer_rate == 0.0 and on.usage["closed_rate"] == 1.0
    assert on.usage["well_formed_rate"] == 1.0 and on.ms_per_example > 0
    assert [r["answer"] for r in off.per_example] == [w for _, _, w in MEMORY.values()]
    assert "per_example" not in on.to_dict() and on.to_dict(with_examples=True)["per_example"]


def _fake_generate(replies, closed=None, mode="on"):
    def fn(model, tokenizer, questions, **kw):
        return [Generation("p", "p" + r, r, "", r, True if closed is None else closed[i], 3, 0.01, mode)
                for i, r in enumerate(replies)]
    return fn


def test_evaluate_counts_unclosed_as_no_answer_and_limit():
    items = [EvalItem("a", "q1", "5", "f"), EvalItem("b", "q2", "6", "f"), EvalItem("c", "q3", "7", "g")]
    tok = make_tiny_tokenizer()
    res = evaluate(None, tok, items, generate_fn=_fake_generate(["5", "6"], closed=[True, False]),
                   limit=2, progress=False)
    assert res.n == 2 and res.accuracy == 0.5 and res.no_answer_rate == 0.5
    assert res.ms_per_example == pytest.approx(10.0)
    assert res.per_example[1] == {"id": "b", "correct": False, "answer": None, "gold": "6",
                                  "family": "f", "closed": False, "reply": "6", "thinking": "", "flexible": None}


def test_flexible_accuracy_for_direct_replies():
    items = [EvalItem("a", "q1", "5", "f"), EvalItem("b", "q2", "6", "f")]
    fake = _fake_generate(["2 + 3 = 5", "6"], mode="direct")
    res = evaluate(None, make_tiny_tokenizer(), items, generate_fn=fake, progress=False)
    assert res.accuracy == 0.5 and res.flexible_accuracy == 1.0 and res.usage is None


def test_bare_question():
    it = EvalItem("x", "Which is blue?\nA. sky\nB. grass", "A", "arc", choices=["sky", "grass"])
    assert bare_question(it) == "Which is blue?"
    it2 = EvalItem("y", "Which is blue?", "A", "arc", choices=["sky", "grass"])
    assert bare_question(it2) == "Which is blue?"


def _slow_logprob(model, tok, ctx, cont):
    """One unpadded forward per pair, summing log-probs token by token."""
    ctx_ids = tok(ctx)["input_ids"]
    ids = tok(ctx + cont)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    total = 0.0
    for pos in range(len(ctx_ids), len(ids)):
        total += torch.log_softmax(logits[pos - 1], -1)[ids[pos]].item()
    return total


def test_continuation_logprobs_match_slow_version():
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    pairs = [("Question: sky?\nAnswer:", " blue"), ("Q: a\nAnswer:", " green grass"), ("Hi", " x")]
    fast = continuation_logprobs(model, tok, pairs, batch_size=2)
    slow = [_slow_logprob(model, tok, c, x) for c, x in pairs]
    assert fast == pytest.approx(slow, abs=1e-4)


def test_choice_loglik_accuracy_against_slow_argmax():
    tok = make_tiny_tokenizer()
    model = make_tiny_model("gpt2", len(tok))
    items = [EvalItem(f"i{k}", f"Pick {k}?\nA. one\nB. three\nC. fifteen", "ABC"[k], "arc",
                      choices=["one", "three", "fifteen"]) for k in range(3)]
    res = choice_loglik_accuracy(model, tok, items, batch_size=4)
    correct, correct_norm = 0, 0
    for k, it in enumerate(items):
        lls = [_slow_logprob(model, tok, f"Question: Pick {k}?\nAnswer:", " " + c) for c in it.choices]
        raw = max(range(3), key=lambda c: lls[c])
        norm = max(range(3), key=lambda c: lls[c] / len(" " + it.choices[c]))
        correct += raw == k
        correct_norm += norm == k
    assert res["acc"] == correct / 3 and res["acc_norm"] == correct_norm / 3 and res["n"] == 3


PLAIN_REPLY = " 3 + 4\nmakes 7\nQuestion: What is 1 + 1?"


@functools.lru_cache(maxsize=None)
def _plain_model_with_working():
    """A tiny Llama without thinking tokens that answers "What is 3 + 4?" on two lines and
    then starts a new question, as base models do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    enc = tok([f"Question: What is 3 + 4?\nAnswer:{PLAIN_REPLY}"], return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(**enc, labels=enc["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    return model.eval(), tok


def test_direct_reply_runs_to_question_not_the_first_newline():
    """lm-eval's gsm8k generates until "Question:" or EOS and reads the last number of that."""
    model, tok = _plain_model_with_working()
    item = EvalItem("a", "What is 3 + 4?", "7", "f")
    res = evaluate(model, tok, [item], max_new_tokens=40, progress=False, loglik=False)
    row = res.per_example[0]
    assert row["reply"] == "3 + 4" and row["answer"] == "3" and not row["correct"]  # strict: first line
    assert res.flexible_accuracy == 1.0                    # flexible: "makes 7" before "Question:"
    gen = generate_answers(model, tok, [item.question], max_new_tokens=40)[0]
    assert gen.completion == PLAIN_REPLY.split("Question:")[0] + "Question:"  # stopped right there
