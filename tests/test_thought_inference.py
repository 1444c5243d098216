"""Thought-mode decoding: a zero-initialised mixing head must give plain greedy decoding
token for token (so the thought's cache entries really are removed), thinking tokens never
reach the visible text, and a trained head does change the output."""

from __future__ import annotations

import pytest
import torch

from agent_forge.quietstar.mixing import MixingHead
from agent_forge.quietstar.thought_inference import ThoughtDecoder, load_decoder
from agent_forge.vocab import add_thinking_tokens, get_vocab
from conftest import make_tiny_model, make_tiny_tokenizer


def sharp(model, seed=1, scale=0.3):
    """Larger random weights: context-dependent predictions (default init is near uniform)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def setup(kind="llama", attn="sdpa"):
    tok = make_tiny_tokenizer()
    model = make_tiny_model(kind, len(tok), attn=attn)
    ids = add_thinking_tokens(model, tok)
    sharp(model)
    enc_tok = tok
    enc_tok.padding_side = "left"
    enc = enc_tok(["Question: 2+2?\nAnswer:", "Hi"], return_tensors="pt", padding=True)
    return model, tok, ids, enc["input_ids"], enc["attention_mask"]


def plain_greedy(model, ids, mask, banned, n):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         suppress_tokens=banned, pad_token_id=0, eos_token_id=None, min_new_tokens=n)
    return out


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("qwen2", "eager"), ("gpt2", "sdpa")])
@pytest.mark.parametrize("mode", ["all", "difficult"])
def test_zero_head_equals_plain_greedy(kind, attn, mode):
    model, tok, tids, ids, mask = setup(kind, attn)
    dec = load_decoder(model, tok, None, mode=mode, thought_len=4, difficult_fraction=0.5)
    got = dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    want = plain_greedy(model, ids, mask, sorted(tids.values()), 12)
    assert torch.equal(got, want)
    assert dec.stats.thought_steps > 0
    if mode == "all":
        assert dec.stats.thought_steps == dec.stats.steps


def test_meta_tokens_never_visible_even_when_preferred():
    model, tok, tids, ids, mask = setup()
    with torch.no_grad():  # make the model love its thinking tokens
        model.get_input_embeddings().weight[sorted(tids.values())] *= 0
        model.get_output_embeddings().weight[sorted(tids.values())] += model.model.norm.weight * 5
    raw = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert set(raw[:, ids.shape[1]:].flatten().tolist()) & set(tids.values())  # the ban matters
    head = MixingHead(model.config.hidden_size)
    with torch.no_grad():
        head.net[-1].bias.fill_(0.5)
    dec = load_decoder(model, tok, None, mode="all", thought_len=5)
    dec.head = head
    out = dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0,
                       do_sample=True, temperature=1.0, top_p=0.9)
    assert not set(out[:, ids.shape[1]:].flatten().tolist()) & set(tids.values())
    text = tok.batch_decode(out[:, ids.shape[1]:])
    assert not any(t in s for s in text for t in get_vocab().tokens)
    for step in dec.stats.thoughts:  # thoughts never nest: no start/end inside them
        for row in step:
            assert get_vocab() and not set(row) & {tids["[thinking]"], tids["[/endthinking]"]}


def test_open_head_matches_slow_loop():
    """With a non-zero head each step's thought and visible token equal plain forwards over
    text + start + thought + end, mixed by hand (no cache, no cropping)."""
    model, tok, tids, ids, mask = setup()
    start, end = tids["[thinking]"], tids["[/endthinking]"]
    banned = sorted(tids.values())
    head = MixingHead(model.config.hidden_size)
    with torch.no_grad():
        head.net[-1].bias.fill_(2.0)  # w = tanh(2) ~ 0.96: mostly the thought's state
    dec = ThoughtDecoder(model, head, start, end, mode="all", thought_len=5, banned_visible=banned)
    got = dec.generate(input_ids=ids[:1, -3:], attention_mask=mask[:1, -3:], max_new_tokens=3)
    text = ids[0, -3:].tolist()
    with torch.no_grad():
        for step in range(3):
            seq = text + [start]
            for _ in range(5 - 2):  # greedy thought tokens, start/end banned
                lg = model(torch.tensor([seq])).logits[0, -1]
                lg[[start, end]] = float("-inf")
                seq.append(int(lg.argmax()))
            assert seq[len(text) + 1:] == dec.stats.thoughts[step][0]
            base = model(torch.tensor([text]), output_hidden_states=True).hidden_states[-1][0, -1]
            h_end = model(torch.tensor([seq + [end]]), output_hidden_states=True).hidden_states[-1][0, -1]
            logits = model.get_output_embeddings()(head(base, h_end)).clone()
            logits[banned] = float("-inf")
            text.append(int(logits.argmax()))
    assert got[0].tolist() == text
    plain = model.generate(input_ids=ids[:1, -3:], max_new_tokens=3, do_sample=False,
                           suppress_tokens=banned, pad_token_id=0)
    assert not torch.equal(plain, got)  # the open head matters here


def test_eos_padding_and_stopping_like_hf_generate():
    """Finished rows are padded like model.generate pads them; stopping criteria are honoured."""
    model, tok, tids, ids, mask = setup()
    banned = sorted(tids.values())
    first = plain_greedy(model, ids, mask, banned, 1)[0, -1].item()  # row 0 ends at once
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                          suppress_tokens=banned, pad_token_id=1, eos_token_id=first)
    dec = load_decoder(model, tok, None, mode="all", thought_len=3)
    got = dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=1,
                       eos_token_id=[first], use_cache=True)
    assert torch.equal(got, want)
    assert got[0, ids.shape[1] + 1:].eq(1).all()

    def stop_after_two(input_ids, scores):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 2)

    got = dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=1,
                       stopping_criteria=[stop_after_two])
    assert got.shape[1] == ids.shape[1] + 2


def test_written_block_may_close_but_never_reopen():
    """visible_block (inference mode "on"): the closing token and the strategy markers may be
    written visibly; the opening token, which starts every silent thought, never may."""
    model, tok, tids, ids, mask = setup()
    with torch.no_grad():  # make the model love its thinking tokens
        model.get_output_embeddings().weight[sorted(tids.values())] += model.model.norm.weight * 5
    dec = load_decoder(model, tok, None, mode="all", thought_len=4, visible_block=True)
    torch.manual_seed(0)
    out = dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0,
                       do_sample=True, temperature=1.0)
    visible = set(out[:, ids.shape[1]:].flatten().tolist())
    assert tids["[thinking]"] not in visible
    assert visible & (set(tids.values()) - {tids["[thinking]"]})  # block tokens were written
    assert tids["[thinking]"] in dec.banned and tids["[/endthinking]"] not in dec.banned


def test_thought_positions_follow_the_mixing_head(tmp_path):
    """A directory with a mixing head thinks at difficult positions unless told otherwise; one
    without decodes plainly and refuses an explicit thought mode (thoughts would do nothing)."""
    from agent_forge.quietstar.mixing import save_head
    from agent_forge.quietstar.thought_inference import HEAD_FILE, has_mixing_head, resolve_thought_positions

    plain, token = tmp_path / "plain", tmp_path / "token"
    plain.mkdir()
    save_head(MixingHead(8), token / HEAD_FILE)
    assert has_mixing_head(token) and not has_mixing_head(plain) and not has_mixing_head(None)
    assert [resolve_thought_positions(token, p) for p in (None, "all", "difficult", "none")] == \
        ["difficult", "all", "difficult", None]
    assert resolve_thought_positions(plain) is None and resolve_thought_positions(plain, "none") is None
    with pytest.raises(ValueError, match="mixing_head"):
        resolve_thought_positions(plain, "all")
    with pytest.raises(ValueError, match="one of"):
        resolve_thought_positions(token, "some")
