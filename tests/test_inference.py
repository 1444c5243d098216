"""Batched thinking inference on tiny random models: padding, modes, stopping, no leaks."""

import functools

import pytest
import torch

from agent_forge.inference import (AnswerSlotStop, build_prompt, generate_answers, resolve_mode)
from agent_forge.vocab import THINK_CLOSE, THINK_OPEN, add_thinking_tokens, get_vocab
from conftest import make_tiny_model, make_tiny_tokenizer

QUESTIONS = ["What is 3 + 4?", "Add 12 and 30.", "2*5=?", "Is 7 prime? Answer yes or no please."]


def _thinking_model(kind="llama", boost_thinking=0.0):
    tok = make_tiny_tokenizer()
    model = make_tiny_model(kind, len(tok))
    ids = add_thinking_tokens(model, tok)
    if boost_thinking:
        with torch.no_grad():  # make thinking tokens likely everywhere, to provoke leaks
            emb = model.get_input_embeddings().weight
            for tid in ids.values():
                emb[tid] *= boost_thinking
    return model, tok


# A tiny Llama trained for a few seconds to memorise replies: with thinking on it reasons
# to the right answer, with the block forced empty it answers wrongly. Shared by the
# evaluation tests (import it from here).
MEMORY = {
    "What is 3 + 4?": ("<step> 3+4=7", "7", "9"),
    "Add 12 and 30.": ("<step> 12+30=42", "42", "40"),
    "What is 5 - 2?": ("<doubt> 5-2=3", "3", "8"),
}


@functools.lru_cache(maxsize=None)
def memorised_model(junk: str = "\nQ: zz"):
    """(model, tokenizer): a 2-layer Llama that has learned the MEMORY replies by heart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok) + 12, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    add_thinking_tokens(model, tok)
    texts = []
    for q, (thought, right, wrong) in MEMORY.items():
        texts.append(f"Question: {q}\nAnswer:{THINK_OPEN}{thought}{THINK_CLOSE} {right}{junk}")
        texts.append(f"Question: {q}\nAnswer:{THINK_OPEN}{THINK_CLOSE} {wrong}{junk}")
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for i, t in enumerate(texts):  # learn the replies only, not the prompts (nor forced blocks)
        forced = THINK_OPEN + THINK_CLOSE if THINK_OPEN + THINK_CLOSE in t else ""
        labels[i, : len(tok(t.split("Answer:")[0] + "Answer:" + forced)["input_ids"])] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(600):
        model.train()
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.2 and step % 20 == 0 and _recites(model.eval(), tok):
            break
    return model.eval(), tok


def _recites(model, tok) -> bool:
    qs = list(MEMORY)
    on = generate_answers(model, tok, qs, thinking="on", max_new_tokens=24)
    off = generate_answers(model, tok, qs, thinking="off", max_new_tokens=8)
    return all(g.answer_text == MEMORY[q][1] for g, q in zip(on, qs)) and \
        all(g.answer_text == MEMORY[q][2] for g, q in zip(off, qs))


def test_resolve_mode_and_prompts():
    model, tok = _thinking_model()
    plain = make_tiny_tokenizer()
    assert resolve_mode(tok, "auto") == "on"
    assert resolve_mode(plain, "auto") == "direct"
    with pytest.raises(ValueError):
        resolve_mode(plain, "on")
    with pytest.raises(ValueError):
        resolve_mode(tok, "maybe")
    assert resolve_mode(tok, "off") == "off"
    assert resolve_mode(plain, "off") == "direct"  # no thinking tokens: "off" is answering directly
    p_on, pre_on = build_prompt(tok, "2+2?", "on")
    p_off, pre_off = build_prompt(tok, "2+2?", "off")
    assert p_on == "Question: 2+2?\nAnswer:" + THINK_OPEN and pre_on == THINK_OPEN
    assert p_off.endswith(THINK_OPEN + THINK_CLOSE) and pre_off == THINK_OPEN + THINK_CLOSE
    assert build_prompt(plain, "2+2?", "direct") == ("Question: 2+2?\nAnswer:", "")


def test_chat_style_uses_the_template():
    tok = make_tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    prompt, _ = build_prompt(tok, "2+2?", "direct")
    assert prompt == "<u>2+2? Give only the final answer.</u><a>"
    assert build_prompt(tok, "2+2?", "direct", style="plain")[0] == "Question: 2+2?\nAnswer:"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("thinking", ["on", "off"])
def test_batched_equals_one_at_a_time(kind, thinking):
    """Left padding + attention mask must not change greedy outputs."""
    model, tok = _thinking_model(kind)
    kw = dict(thinking=thinking, max_new_tokens=10, stop_at_newline=False)
    batched = generate_answers(model, tok, QUESTIONS, batch_size=4, **kw)
    single = [generate_answers(model, tok, [q], batch_size=1, **kw)[0] for q in QUESTIONS]
    assert [g.completion for g in batched] == [g.completion for g in single]
    assert [g.prompt for g in batched] == [build_prompt(tok, q, thinking)[0] for q in QUESTIONS]


def test_answer_text_never_contains_thinking_tokens():
    model, tok = _thinking_model(boost_thinking=6.0)
    gens = generate_answers(model, tok, QUESTIONS * 2, thinking="on", max_new_tokens=40,
                            do_sample=True, temperature=1.0, seed=0)
    vocab = get_vocab()
    assert any(g.closed for g in gens)  # the boost makes the closer likely
    for g in gens:
        assert not any(t in g.answer_text for t in vocab.tokens)
        assert g.full_text.startswith(g.prompt)
        assert g.completion.startswith(THINK_OPEN)
        if not g.closed:
            assert g.answer_text == "" and THINK_CLOSE not in g.completion
    leaked = [g for g in gens if g.closed and any(t in g.completion.split(THINK_CLOSE, 1)[1]
                                                  for t in vocab.tokens)]
    assert leaked, "the boosted model should write thinking tokens after the block"


@pytest.mark.parametrize("thinking", ["on", "off"])
def test_stops_after_the_answer_line(thinking):
    model, tok = memorised_model()
    kw = dict(thinking=thinking, max_new_tokens=40, batch_size=2)
    qs = list(MEMORY)
    full = generate_answers(model, tok, qs, stop_at_newline=False, **kw)
    short = generate_answers(model, tok, qs, stop_at_newline=True, **kw)
    pick = 1 if thinking == "on" else 2
    assert [g.answer_text for g in short] == [MEMORY[q][pick] for q in qs]
    for f, s in zip(full, short):
        assert f.completion.startswith(s.completion)
        assert s.completion.endswith("\n") and "zz" in f.completion
        assert s.answer_text == f.answer_text
        assert s.n_new_tokens < f.n_new_tokens == 40


def test_make_generation_strips_leaks_and_splits_thinking():
    from agent_forge.inference import _make_generation

    vocab = get_vocab()
    g = _make_generation("Q", THINK_OPEN, "<step> 3+4=7" + THINK_CLOSE + " <doubt>7<step>\nmore", 9, 0.1, "on", vocab)
    assert g.closed and g.thinking == "<step> 3+4=7" and g.answer_text == "7"
    assert g.visible(show_thinking=True) == "(thinking: 3+4=7)\n7"
    g = _make_generation("Q", THINK_OPEN + THINK_CLOSE, " 12 apples", 3, 0.1, "off", vocab)
    assert g.closed and g.thinking == "" and g.answer_text == "12 apples"
    g = _make_generation("Q", THINK_OPEN, "<step> still going", 3, 0.1, "on", vocab)
    assert not g.closed and g.answer_text == "" and g.thinking == "<step> still going"


def test_decode_row_cuts_at_eos_and_padding():
    from agent_forge.inference import _decode_row

    tok = make_tiny_tokenizer()
    a, b = tok("ab")["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert _decode_row(tok, [a, b, eos, pad, pad], [eos], pad) == ("ab", 2)
    assert _decode_row(tok, [a, b, pad, pad], [eos], pad) == ("ab", 2)       # stopped, padded
    assert _decode_row(tok, [a, eos, eos, eos], [eos], eos) == ("a", 1)      # pad == eos
    assert _decode_row(tok, [a, b], [eos], pad) == ("ab", 2)                 # ran to the limit


def _ids(tok, pieces):
    return [tok.convert_tokens_to_ids(p) if p.startswith(("[", "<")) else tok(p)["input_ids"][0]
            for p in pieces]


def test_answer_slot_stop_state_machine():
    _, tok = _thinking_model()
    close = tok.convert_tokens_to_ids(THINK_CLOSE)
    rows = [
        ["a", "\n", THINK_CLOSE, " ", "7", "\n", "x"],   # newline inside thinking ignored; stops at 6th
        [THINK_CLOSE, "\n", " ", "9", "9", "\n", "y"],   # leading newline before text ignored
        ["a", "b", "c", "d", "e", "f", "g"],              # never closes
    ]
    ids = torch.tensor([_ids(tok, r) for r in rows])
    stop = AnswerSlotStop(tok, 3, in_thinking=True, close_id=close)
    seen = [stop(ids[:, : t + 1]).tolist() for t in range(ids.shape[1])]
    assert [s[0] for s in seen] == [False] * 5 + [True, True]
    assert [s[1] for s in seen] == [False] * 5 + [True, True]
    assert not any(s[2] for s in seen)
    direct = AnswerSlotStop(tok, 1, in_thinking=False, close_id=None)
    assert [direct(torch.tensor([_ids(tok, ["4", "\n"])[: t + 1]])).item() for t in range(2)] == [False, True]


def test_sampling_is_seeded_and_headless_thought_mode_is_plain_decoding():
    model, tok = _thinking_model()
    kw = dict(thinking="on", max_new_tokens=12, do_sample=True, temperature=1.0)
    a = generate_answers(model, tok, QUESTIONS, seed=3, **kw)
    b = generate_answers(model, tok, QUESTIONS, seed=3, **kw)
    assert [g.completion for g in a] == [g.completion for g in b]
    plain = generate_answers(model, tok, QUESTIONS, thinking="on", max_new_tokens=12)
    for mode in ("all", "difficult"):  # no mixing head: thoughts cannot change a token
        thought = generate_answers(model, tok, QUESTIONS, thinking="on", max_new_tokens=12, thought_mode=mode)
        assert [g.completion for g in thought] == [g.completion for g in plain]


def test_direct_mode_for_plain_model():
    tok = make_tiny_tokenizer()
    model = make_tiny_model("qwen2", len(tok))
    gens = generate_answers(model, tok, QUESTIONS, thinking="auto", max_new_tokens=8)
    for g in gens:
        assert g.mode == "direct" and g.closed and g.thinking is None
        assert "\n" not in g.answer_text
        assert 0 <= g.n_new_tokens <= 8 and g.seconds > 0


def test_silent_thoughts_keep_the_written_block_writable():
    """A token-level model thinks silently AND writes its block in mode "on": with a zero (closed)
    mixing head its replies are exactly the plain ones, block markers and closing token included."""
    model, tok = memorised_model()
    qs = list(MEMORY)
    for mode in ("all", "difficult"):
        on = generate_answers(model, tok, qs, thinking="on", max_new_tokens=24, thought_mode=mode)
        assert [g.answer_text for g in on] == [MEMORY[q][1] for q in qs] and all(g.closed for g in on)
        assert all(g.thinking.startswith(MEMORY[q][0].split()[0]) for g, q in zip(on, qs))
        off = generate_answers(model, tok, qs, thinking="off", max_new_tokens=8, thought_mode=mode)
        assert [g.answer_text for g in off] == [MEMORY[q][2] for q in qs]
    plain_tok = make_tiny_tokenizer()
    with pytest.raises(ValueError, match="thinking tokens"):
        generate_answers(make_tiny_model("llama", len(plain_tok)), plain_tok, qs, thought_mode="all")
