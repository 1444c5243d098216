"""Shared fixtures: a byte-level tokenizer and tiny Llama / Qwen2 / GPT-2 models, no files.

Tests must never touch a model hub; the real default model is used only by tests marked
`integration`.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def make_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + EOS + PAD): any text round-trips."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def make_tiny_model(kind: str, vocab_size: int, seed: int = 0, attn: str = "sdpa"):
    """A 2-layer randomly initialised causal LM of the given family ('llama', 'qwen2', 'gpt2')."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=False, **common)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 2)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = attn
    return model.eval()


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def tiny_model_kind(request):
    return request.param


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny_model("llama", len(tiny_tokenizer))


@pytest.fixture
def tiny_qwen2(tiny_tokenizer):
    return make_tiny_model("qwen2", len(tiny_tokenizer))


@pytest.fixture
def tiny_gpt2(tiny_tokenizer):
    return make_tiny_model("gpt2", len(tiny_tokenizer))


@pytest.fixture
def forge_home(tmp_path, monkeypatch):
    """An isolated FORGE_HOME per test."""
    home = tmp_path / "forge_home"
    monkeypatch.setenv("FORGE_HOME", str(home))
    return home


def baked_token_setup(tmp_path) -> dict:
    """A saved tiny thinking model, eight training records and a small token-mode RL config:
    the `forge rl --mode token` arguments that point at them."""
    from agent_forge.data.schema import Record, Segment, write_records
    from agent_forge.models import save_model
    from agent_forge.vocab import add_thinking_tokens

    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", len(tok))
    add_thinking_tokens(model, tok)
    save_model(model, tok, tmp_path / "baked", {"phase": 3})
    recs = [Record(str(i), f"{i} + 1 = ?", [Segment("step", f"{i} + 1 = {i + 1}")], str(i + 1), str(i + 1), "t")
            for i in range(8)]
    write_records(tmp_path / "d.jsonl", recs)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_thoughts: 2\nthought_len: 3\nbatch_size: 2\nseq_len: 24\nsave_every: 0\n")
    return dict(model=str(tmp_path / "baked"), data=str(tmp_path / "d.jsonl"), config=str(cfg))


class Crash(Exception):
    """What crash_at's progress callback raises: the process "died" after that step."""


def crash_at(step: int):
    """A progress callback that raises Crash once `step` is done (logged, checkpointed if due)."""
    def progress(done, total, row):
        if done == step:
            raise Crash(step)
    return progress


def rl_cli(tmp_path, json_out: bool = True, **kw):
    """`forge rl` called as the CLI would, token mode and one step unless `kw` says otherwise."""
    from agent_forge.quietstar.rl_commands import rl_cmd

    args = dict(model="x", data=None, out=str(tmp_path / "out"), mode="token", steps=1, samples=None,
                questions=None, reward=None, lr=None, optimizer=None, kl=None, config=None,
                eval_data="easy_arithmetic", eval_samples=None, device=None, tracking="disabled",
                resume=False, json_out=json_out)
    return rl_cmd(**{**args, **kw})


def sigkill_once_checkpointed(victim, ckpt_dir, timeout: float = 300, pattern: str = "step-*") -> None:
    """SIGKILL the subprocess `victim` as soon as a `step-*` checkpoint (or another `pattern`)
    exists in `ckpt_dir` (the kill lands mid-run, after something to resume from); fails if
    it finished first."""
    import signal
    import time
    from pathlib import Path

    ckpt_dir, deadline = Path(ckpt_dir), time.time() + timeout
    while time.time() < deadline and victim.poll() is None and not (ckpt_dir.exists() and any(ckpt_dir.glob(pattern))):
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before the kill; make it longer"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
