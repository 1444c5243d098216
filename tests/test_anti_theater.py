"""Anti-theater: a theater model must FAIL, a genuine thinker must PASS."""

import random

import pytest

from agent_forge.data.evalsets import EvalItem
from agent_forge.inference import Generation
from agent_forge.validation.anti_theater import default_coherence, repetition_rate, run_anti_theater
from agent_forge.vocab import THINK_CLOSE, THINK_OPEN
from test_inference import MEMORY, memorised_model

ITEMS = [EvalItem(f"q{i}", f"What is {i} + {i + 3}?", str(2 * i + 3), "chain_sum") for i in range(40)]


def _gen(thinking, answer, mode):
    prefix = THINK_OPEN + (THINK_CLOSE if mode == "off" else "")
    completion = prefix + (f"{thinking}{THINK_CLOSE}" if mode == "on" else "") + f" {answer}"
    return Generation("Question: ...\nAnswer:" + prefix, "", completion,
                      thinking if mode == "on" else "", answer, True, 10, 0.01, mode)


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
    assert by["divergence"]["value"] > 0.3
    assert by["ablation"]["value"] == pytest.approx(75.0) and by["ablation"]["p"] < 1e-6
    assert by["correlation"]["value"] > 0.9
    assert rep.passed and rep.recommendation == "keep" and rep.n == 40
    assert set(rep.to_dict()) == {"tests", "passed", "recommendation", "sentence", "n"}


def test_coherence_and_repetition():
    assert repetition_rate("a b c d") == 0.0
    assert repetition_rate("3 3 3 3") == pytest.approx(0.75)
    assert default_coherence("<step> 3 + 4 = 7") == 1.0
    assert default_coherence("<step> 3 + 3 = 6") == pytest.approx(0.8)
    assert default_coherence(None) == 0.0 and default_coherence("") == 0.0
    assert default_coherence(f"<step> a{THINK_OPEN} b") == 0.0  # a second opener: malformed


def test_custom_coherence_callable_is_used():
    seen = []
    rep = run_anti_theater(None, None, ITEMS, generate_fn=genuine_generate,
                           coherence_fn=lambda t, q: seen.append(q) or 0.5)
    assert len(seen) == 40 and not {t["name"]: t for t in rep.tests}["correlation"]["passed"]


def test_real_tiny_model_logprob_utility():
    """The memorised model reasons to the answer: divergence and ablation pass for real."""
    model, tok = memorised_model()
    items = [EvalItem(f"m{i}", q, right, "arith") for i, (q, (_, right, _)) in enumerate(MEMORY.items())]
    rep = run_anti_theater(model, tok, items, batch_size=3, max_new_tokens=24)
    by = {t["name"]: t for t in rep.tests}
    assert by["divergence"]["passed"] and by["ablation"]["value"] == pytest.approx(100.0)
    assert all(r["utility"] > 0 for r in rep.per_example)  # thinking raises log p(gold)
