import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertModel

from agent_forge.models import (ModelLoadError, adaptive_defaults, load_model, measure_model,
                                read_meta, save_model, size_category, ModelSize)

from conftest import make_tiny_model


def _saved(tmp_path, tok, kind="llama"):
    model = make_tiny_model(kind, len(tok))
    return save_model(model, tok, tmp_path / "m", {"phase": 2, "metrics": {"fitness_gain": 0.3}}), model


def test_save_writes_hf_dir_and_meta(tmp_path, tiny_tokenizer):
    out, _ = _saved(tmp_path, tiny_tokenizer)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "forge_meta.json"):
        assert (out / name).exists(), name
    meta = read_meta(out)
    assert meta["phase"] == 2 and meta["metrics"]["fitness_gain"] == 0.3 and "created" in meta
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_load_hf_dir_round_trip(tmp_path, tiny_tokenizer):
    out, model = _saved(tmp_path, tiny_tokenizer)
    loaded, tok = load_model(str(out), device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    assert tok.pad_token is not None


def test_load_pt_state_dict_with_config_beside(tmp_path, tiny_tokenizer):
    out, model = _saved(tmp_path, tiny_tokenizer, "qwen2")
    torch.save(model.state_dict(), out / "weights.pt")
    loaded, _ = load_model(str(out / "weights.pt"), device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def test_pt_checkpoint_is_not_unpickled(tmp_path, tiny_tokenizer):
    out, _ = _saved(tmp_path, tiny_tokenizer)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, out / "evil.pt")
    with pytest.raises(ModelLoadError, match="failed to load"):
        load_model(str(out / "evil.pt"))


def test_clear_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./missing/model.pt")
    bert_dir = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, vocab_size=100)).save_pretrained(bert_dir)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(bert_dir))
    (tmp_path / "lonely.pt").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path / "lonely.pt"))
    out, _ = _saved(tmp_path, tiny_tokenizer)
    (out / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="failed to load"):
        load_model(str(out / "broken.pt"))


def test_gguf_without_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="needs the 'gguf' package"):
        load_model(str(tmp_path / "m.gguf"))


def test_save_is_atomic_when_interrupted(tmp_path, tiny_tokenizer, monkeypatch):
    out, model = _saved(tmp_path, tiny_tokenizer)
    before = (out / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        save_model(model, tiny_tokenizer, out, {"phase": 9})
    assert (out / "model.safetensors").read_bytes() == before  # old dir untouched
    assert read_meta(out)["phase"] == 2


def test_size_categories_and_adaptive_defaults(tiny_llama):
    assert [size_category(n) for n in (1e6, 100e6, 1e9, 7e9)] == ["tiny", "small", "medium", "large"]
    size = measure_model(tiny_llama, "cpu")
    assert size.category == "tiny" and size.n_params == sum(
        p.numel() for p in {p.data_ptr(): p for p in tiny_llama.parameters()}.values())
    small = adaptive_defaults(ModelSize(135_000_000, 540_000_000, "small", "cpu", 20 * 2**30))
    large = adaptive_defaults(ModelSize(7_000_000_000, 28 * 2**30, "large", "cuda", 40 * 2**30))
    assert small["n_thoughts"] > large["n_thoughts"] == 4
    assert small["thought_length"] > large["thought_length"] == 10
    assert small["batch_size"] >= large["batch_size"] >= 1
    starved = adaptive_defaults(ModelSize(135_000_000, 540_000_000, "small", "cpu", 1 * 2**30))
    assert starved["batch_size"] < small["batch_size"]


@pytest.mark.integration
def test_default_model_loads_fast_from_cache():
    load_model("default")  # creates the cache on a fresh machine
    code = ("import time; from agent_forge.models import load_model; t=time.time(); "
            "m,t2=load_model('default'); print(time.time()-t)")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    model, tok = load_model("default")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < measure_model(model).n_params < 140e6
    print("default load seconds (incl. imports):", out.stdout.strip())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_prefixed_state_dict_loads_the_same_weights(tmp_path, tiny_tokenizer, prefix):
    """DDP (module.), torch.compile (_orig_mod.) and wrapper (model.) prefixes are stripped."""
    out, model = _saved(tmp_path, tiny_tokenizer)
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, out / "wrapped.pt")
    loaded, _ = load_model(str(out / "wrapped.pt"), device="cpu")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_state_dict_with_missing_or_unexpected_keys_fails_naming_them(tmp_path, tiny_tokenizer):
    out, model = _saved(tmp_path, tiny_tokenizer, "qwen2")
    state = model.state_dict()
    dropped = "model.layers.1.self_attn.q_proj.weight"
    torch.save({k: v for k, v in state.items() if k != dropped}, out / "partial.pt")
    with pytest.raises(ModelLoadError, match=f"missing.*{dropped}"):
        load_model(str(out / "partial.pt"), device="cpu")
    torch.save({**state, "extra.weight": torch.zeros(2)}, out / "extra.pt")
    with pytest.raises(ModelLoadError, match="unexpected.*extra.weight"):
        load_model(str(out / "extra.pt"), device="cpu")


def test_tied_head_stored_once_still_loads(tmp_path, tiny_tokenizer):
    """Llama here ties lm_head to the embeddings: a state dict without lm_head is complete."""
    out, model = _saved(tmp_path, tiny_tokenizer, "llama")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, out / "tied.pt")
    loaded, _ = load_model(str(out / "tied.pt"), device="cpu")
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)
