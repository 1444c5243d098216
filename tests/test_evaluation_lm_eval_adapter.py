"""The lm-eval adapter's pure helpers; the HFLM wrapper only when lm_eval is installed."""

import pytest

from agent_forge.evaluation.lm_eval_adapter import answer_context, cut_at, strip_thoughts
from agent_forge.inference import generate_from_prompts
from agent_forge.vocab import THINK_CLOSE, THINK_OPEN
from conftest import make_tiny_tokenizer
from test_inference import MEMORY, memorised_model


def test_helpers():
    plain = make_tiny_tokenizer()
    _, tok = memorised_model()
    assert answer_context("Q:\nA:", plain) == "Q:\nA:"
    assert answer_context("Q:\nA:", tok) == "Q:\nA:" + THINK_OPEN + THINK_CLOSE
    assert strip_thoughts(f"{THINK_OPEN}<step> 3+4=7{THINK_CLOSE} 7<doubt>\nQ") == "7\nQ"
    assert strip_thoughts(f"{THINK_OPEN}<step> never closed") == ""
    assert strip_thoughts("plain 7") == "plain 7"
    assert cut_at("7\nQuestion: x", ["\n", "Question:"]) == "7"


def test_generate_from_prompts_thinks_and_strips():
    model, tok = memorised_model()
    q = next(iter(MEMORY))
    gen = generate_from_prompts(model, tok, [f"Question: {q}\nAnswer:"], thinking="on", max_new_tokens=24)[0]
    assert cut_at(strip_thoughts(gen.completion), ["\n"]) == MEMORY[q][1]


def test_make_lm_needs_lm_eval():
    pytest.importorskip("lm_eval")
    from agent_forge.evaluation.lm_eval_adapter import make_lm

    model, tok = memorised_model()
    assert make_lm(model, tok, batch_size=2) is not None
