import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent_forge.models import save_model
from agent_forge.vocab import (PRESETS, STRATEGIES, add_thinking_tokens, analyze_usage, get_vocab,
                               is_well_formed, thinking_token_ids)

from conftest import make_tiny_model

PLAIN = "Question: 12 + 7?\nAnswer: 19"


def test_default_vocab_has_twelve_tokens():
    vocab = get_vocab("default")
    assert len(vocab.tokens) == 12 and len(set(vocab.tokens)) == 12
    assert vocab.open == "[thinking]" and vocab.close == "[/endthinking]"
    assert [t.strip("<>") for t in vocab.strategies] == list(STRATEGIES)


def test_each_token_is_one_new_id(tiny_tokenizer, tiny_model_kind):
    model = make_tiny_model(tiny_model_kind, len(tiny_tokenizer))
    before = len(tiny_tokenizer)
    ids = add_thinking_tokens(model, tiny_tokenizer)
    assert sorted(ids.values()) == list(range(before, before + 12))
    for token, tid in ids.items():
        assert tiny_tokenizer(token, add_special_tokens=False)["input_ids"] == [tid]
    assert model.get_input_embeddings().weight.shape[0] >= before + 12


def test_adding_twice_changes_nothing(tiny_tokenizer, tiny_llama):
    first = add_thinking_tokens(tiny_llama, tiny_tokenizer)
    weights = tiny_llama.get_input_embeddings().weight.detach().clone()
    second = add_thinking_tokens(tiny_llama, tiny_tokenizer)
    assert first == second
    assert torch.equal(weights, tiny_llama.get_input_embeddings().weight)


def test_new_rows_are_distinct_and_descriptive(tiny_tokenizer, tiny_llama):
    ids = add_thinking_tokens(tiny_llama, tiny_tokenizer)
    emb = tiny_llama.get_input_embeddings().weight.detach()
    rows = emb[list(ids.values())]
    assert torch.unique(rows, dim=0).shape[0] == 12  # every token distinguishable
    # [thinking] starts as the mean of the embeddings of " begin thinking"
    word_ids = tiny_tokenizer(" begin thinking", add_special_tokens=False)["input_ids"]
    assert torch.allclose(emb[ids["[thinking]"]], emb[word_ids].mean(0))


def test_untied_head_rows_initialised(tiny_tokenizer, tiny_qwen2):
    assert not tiny_qwen2.config.tie_word_embeddings
    ids = add_thinking_tokens(tiny_qwen2, tiny_tokenizer)
    head = tiny_qwen2.get_output_embeddings().weight.detach()
    word_ids = tiny_tokenizer(" doubt check verify", add_special_tokens=False)["input_ids"]
    assert torch.allclose(head[ids["<doubt>"]], head[word_ids].mean(0))


def test_tied_embeddings_stay_tied(tiny_tokenizer, tiny_llama):
    add_thinking_tokens(tiny_llama, tiny_tokenizer)
    inp, out = tiny_llama.get_input_embeddings().weight, tiny_llama.get_output_embeddings().weight
    assert inp.data_ptr() == out.data_ptr()


def test_save_reload_same_ids_and_logits(tmp_path, tiny_tokenizer, tiny_model_kind):
    """The issue's acceptance test: Llama, Qwen2 and GPT-2 shapes round-trip through plain transformers."""
    model = make_tiny_model(tiny_model_kind, len(tiny_tokenizer))
    plain_ids = tiny_tokenizer(PLAIN, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_before = model(plain_ids).logits
    ids = add_thinking_tokens(model, tiny_tokenizer)
    with torch.no_grad():
        logits_after_add = model(plain_ids).logits
    save_model(model, tiny_tokenizer, tmp_path / "m", {"phase": 3})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert thinking_token_ids(tok2) == ids
    assert tok2(PLAIN, return_tensors="pt")["input_ids"].tolist() == plain_ids.tolist()
    with torch.no_grad():
        logits_reloaded = reloaded(plain_ids).logits
    old_vocab = logits_before.shape[-1]
    assert torch.allclose(logits_after_add[..., :old_vocab], logits_before, atol=1e-6)
    assert torch.allclose(logits_reloaded, logits_after_add, atol=1e-6)


def test_presets_exist():
    assert len(PRESETS["legacy8"].tokens) == 8
    assert PRESETS["quietstar"].tokens == ["<|startofthought|>", "<|endofthought|>"]


def test_legacy_preset_adds_its_tokens(tiny_tokenizer, tiny_llama):
    ids = add_thinking_tokens(tiny_llama, tiny_tokenizer, "legacy8")
    assert set(ids) == set(PRESETS["legacy8"].tokens)


def test_well_formed_rules():
    assert is_well_formed("[thinking]<step> 1 + 1 = 2[/endthinking] 2")
    assert not is_well_formed("[thinking]<step> 1 + 1 = 2 2")  # never closed
    assert not is_well_formed("[thinking]<step> x[/endthinking] 2 <step>")  # token after answer
    assert not is_well_formed("[thinking]<step> x[/endthinking]   ")  # no answer
    assert not is_well_formed("[/endthinking][thinking] 2")  # closed before opened


def test_usage_analyser_counts_fractions():
    texts = ["[thinking]<step> a<doubt> b[/endthinking] 1",
             "[thinking]<step> a[/endthinking] 2",
             "no thinking at all"]
    report = analyze_usage(texts)
    assert report.n == 3
    assert report.token_rate["<step>"] == 2 / 3
    assert report.token_rate["<doubt>"] == 1 / 3
    assert report.token_rate["<mece>"] == 0.0
    assert report.well_formed_rate == 2 / 3
    assert report.closed_rate == 2 / 3
