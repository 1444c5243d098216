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


def test_requests_through_the_real_harness():
    """lm_eval's own HFLM machinery, driven with its Instance requests: log-likelihood is
    scored in the answer slot (after the forced-empty block, where the memorised model says
    the WRONG number), generation thinks and hands back only the answer."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from agent_forge.evaluation.lm_eval_adapter import make_lm
    from agent_forge.evaluation.runner import continuation_logprobs

    model, tok = memorised_model()
    lm = make_lm(model, tok, batch_size=2)
    q, (_, right, wrong) = next(iter(MEMORY.items()))
    ctx = f"Question: {q}\nAnswer:"
    reqs = [Instance("loglikelihood", {}, (ctx, f" {c}"), i) for i, c in enumerate((right, wrong))]
    (ll_right, _), (ll_wrong, greedy_wrong) = lm.loglikelihood(reqs)
    assert ll_wrong > ll_right and greedy_wrong
    ours = continuation_logprobs(model, tok, [(ctx + THINK_OPEN + THINK_CLOSE, f" {wrong}")])[0]
    assert ll_wrong == pytest.approx(ours, abs=1e-3)
    gen = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 24}), 0)])
    assert gen == [right]
