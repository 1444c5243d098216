"""Pruned greedy decoding gives `generate`'s tokens, and really drops finished rows."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from agent_forge.inference import generate_answers, left_padded
from agent_forge.pruned_decode import can_prune, greedy_pruned
from conftest import make_tiny_model, make_tiny_tokenizer


class EveryRowItsOwnStop(StoppingCriteria):
    """Stateless: a row stops when its last token id is divisible by `k` (rows stop at different steps)."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, input_ids, scores=None, **kwargs):
        return input_ids[:, -1] % self.k == 0


PROMPTS = ["2 + 3 =", "What is 17 - 9?", "x", "Solve for z: z + 14 = 26", "hello there, how", "7 * 6"]


def _batch(tok):
    return left_padded(tok, PROMPTS, add_special_tokens=False, device="cpu")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_pruned_tokens_equal_generate(kind):
    tok = make_tiny_tokenizer()
    model = make_tiny_model(kind, len(tok), seed=3).double()
    ids, mask = _batch(tok)
    eos, pad = [tok.eos_token_id], tok.pad_token_id
    for k in (5, 11):
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad,
                              stopping_criteria=StoppingCriteriaList([EveryRowItsOwnStop(k)]))
        got = greedy_pruned(model, ids, mask, 24, eos, pad, StoppingCriteriaList([EveryRowItsOwnStop(k)]))
        assert torch.equal(got, want)


def test_finished_rows_leave_the_batch():
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok), seed=3).double()
    ids, mask = _batch(tok)
    rows_fed = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: rows_fed.append(a[0].shape[0]))
    out = greedy_pruned(model, ids, mask, 24, [tok.eos_token_id], tok.pad_token_id,
                        StoppingCriteriaList([EveryRowItsOwnStop(5)]))
    hook.remove()
    new = out[:, ids.shape[1]:]
    alive = [(new[:, t] != tok.pad_token_id).sum() for t in range(1, new.shape[1])]  # rows still writing
    assert rows_fed[0] == len(PROMPTS)
    assert rows_fed[1:] == [int(a) for a in alive]  # each step feeds exactly the unfinished rows
    assert min(rows_fed) < len(PROMPTS)  # the test's stop did end some rows early


def test_generate_answers_same_with_and_without_pruning(monkeypatch):
    from agent_forge.vocab import add_thinking_tokens

    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok), seed=1).double()
    add_thinking_tokens(model, tok)
    questions = ["What is 4 + 5?", "12 - 7 =", "Solve for y: y + 1 = 3"]
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("FORGE_PRUNED_DECODE", flag)
        for mode in ("on", "off"):
            gens = generate_answers(model, tok, questions, thinking=mode, max_new_tokens=20, batch_size=3)
            results[flag, mode] = [(g.full_text, g.n_new_tokens, g.closed) for g in gens]
    assert results["0", "on"] == results["1", "on"]
    assert results["0", "off"] == results["1", "off"]


def test_processors_and_engines_fall_back_to_generate(monkeypatch):
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    assert can_prune(model)
    model.generation_config.repetition_penalty = 1.3  # generate would change the logits
    assert not can_prune(model)
    model.generation_config.repetition_penalty = 1.0
    monkeypatch.setenv("FORGE_PRUNED_DECODE", "0")
    assert not can_prune(model)
    monkeypatch.delenv("FORGE_PRUNED_DECODE")
    from agent_forge.cognate.model import CognateForCausalLM
    from test_cognate_model import tiny_config

    cognate = CognateForCausalLM(tiny_config(vocab_size=len(tok)))
    assert not can_prune(cognate)  # its own cache (memory state): decoded by generate, no wasted prefill
