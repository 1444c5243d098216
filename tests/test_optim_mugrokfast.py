"""MuGrokfast as one optimiser on a tiny Llama: routing, stepping, schedulers, resume."""

import copy
import io

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from agent_forge.optim import PRESETS, MuGrokfast, MuGrokfastConfig, build_optimizer


def tiny_llama(tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, 9), generator=gen)


def train_step(model, opt, ids):
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def names_by_kind(opt):
    return {g["kind"]: {opt.param_names[id(p)] for p in g["params"]} for g in opt.param_groups}


@pytest.mark.parametrize("tie", [False, True])
def test_routing_on_tiny_llama(tie):
    model = tiny_llama(tie)
    kinds = names_by_kind(MuGrokfast.from_model(model, "baking", attach_qk_clip=False))
    assert all(n.endswith("proj.weight") for n in kinds["muon"])
    assert len(kinds["muon"]) == 2 * 7  # q k v o gate up down per layer
    expected_decay = {"model.embed_tokens.weight"} | (set() if tie else {"lm_head.weight"})
    assert kinds["adamw_decay"] == expected_decay
    assert all("norm" in n for n in kinds["adamw_no_decay"])
    total = sum(len(v) for v in kinds.values())
    assert total == len(list(model.parameters()))  # every parameter once, tied ones once


def test_head_found_by_model_api_even_with_an_unusual_name():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 8)
            self.hidden = nn.Linear(8, 8)
            self.readout = nn.Linear(8, 10, bias=False)

        def get_input_embeddings(self):
            return self.tok

        def get_output_embeddings(self):
            return self.readout

    model = Tiny()
    kinds = names_by_kind(MuGrokfast.from_model(model, "baking", attach_qk_clip=False))
    assert kinds["muon"] == {"hidden.weight"}
    assert kinds["adamw_decay"] == {"tok.weight", "readout.weight"}
    assert kinds["adamw_no_decay"] == {"hidden.bias"}
    # without the API, the name fallback still keeps embeddings off Muon
    fallback = MuGrokfast(nn.ModuleDict({"embed": nn.Embedding(10, 8)}).named_parameters())
    assert [g["kind"] for g in fallback.param_groups] == ["adamw_decay"]


def test_one_step_changes_every_parameter():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MuGrokfast.from_model(model, MuGrokfastConfig(muon_lr=1e-3))
    train_step(model, opt, batch())
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    assert opt.last_qk_clip_stats["heads_seen"] == 2 * 4


def test_lambda_lr_scales_both_inner_optimizers():
    model = tiny_llama()
    opt = MuGrokfast.from_model(model, MuGrokfastConfig(muon_lr=1e-3, adam_lr=2e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 0.5)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3)
    train_step(model, opt, batch())
    sched.step()
    assert all(g["lr"] == 0.0 for g in opt.muon.param_groups + opt.adamw.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, batch(1))  # lr 0: neither Muon nor AdamW may move anything
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_state_dict_round_trip_gives_identical_next_step():
    model = tiny_llama()
    opt = MuGrokfast.from_model(model, "rl", attach_qk_clip=False)
    for seed in range(2):
        train_step(model, opt, batch(seed))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = copy.deepcopy(model)
    opt2 = MuGrokfast.from_model(twin, "rl", attach_qk_clip=False)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    train_step(model, opt, batch(5))
    train_step(twin, opt2, batch(5))
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n
    # a fresh optimiser (no state) would have taken a different step
    fresh_model = copy.deepcopy(twin)
    fresh = MuGrokfast.from_model(fresh_model, "rl", attach_qk_clip=False)
    train_step(fresh_model, fresh, batch(6))
    train_step(twin, opt2, batch(6))
    assert not torch.equal(fresh_model.model.layers[0].mlp.up_proj.weight,
                           twin.model.layers[0].mlp.up_proj.weight)


def test_presets_follow_the_spec():
    bake, rl = PRESETS["baking"], PRESETS["rl"]
    assert (bake.muon_lr, bake.grokfast_lambda, bake.qk_clip_tau, bake.kl_coefficient,
            bake.weight_decay) == (1e-4, 0.2, 30.0, 0.0, 0.01)
    assert (rl.muon_lr, rl.grokfast_lambda, rl.qk_clip_tau, rl.kl_coefficient,
            rl.weight_decay) == (5e-4, 0.1, 25.0, 0.1, 0.0)


def test_build_optimizer_variants():
    model = tiny_llama()
    adamw = build_optimizer(model, "adamw", "baking", lr=3e-4)
    assert type(adamw) is torch.optim.AdamW
    decays = sorted(g["weight_decay"] for g in adamw.param_groups)
    assert decays == [0.0, 0.01] and all(g["lr"] == 3e-4 for g in adamw.param_groups)
    mu = build_optimizer(model, "mugrokfast", "rl", lr=1e-3)
    assert isinstance(mu, MuGrokfast) and all(g["lr"] == 1e-3 for g in mu.param_groups)
    assert mu.qk_clip is not None and mu.qk_clip.tau == 25.0
    mu.qk_clip.remove()
    with pytest.raises(ValueError):
        build_optimizer(model, "sgd")


def test_qk_clip_log_reads_through_an_accelerate_wrapper():
    """Trainers hold accelerate's wrapper, whose `.optimizer` is the MuGrokfast."""
    from accelerate import Accelerator

    from agent_forge.optim.mugrokfast import qk_clip_log

    model = tiny_llama()
    opt = MuGrokfast.from_model(model, MuGrokfastConfig(qk_clip_tau=1e-3))
    train_step(model, opt, batch())
    logged = qk_clip_log(Accelerator(cpu=True).prepare_optimizer(opt))
    assert logged == opt.qk_clip_stats and logged["qk_clip_heads_clipped"] == 2 * 4
    assert qk_clip_log(build_optimizer(model, "adamw")) == {}
    assert MuGrokfast.from_model(model, MuGrokfastConfig(qk_clip_enabled=False)).qk_clip_stats == {}


def test_adamw_is_fused_on_cpu_and_matches_the_paper_update():
    """Our AdamW (fused kernel on CPU) against Loshchilov & Hutter's update written out by hand."""
    from agent_forge.optim.mugrokfast import adamw

    torch.manual_seed(0)
    p = torch.randn(5, 3, requires_grad=True)
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    opt = adamw([{"params": [p], "weight_decay": wd}], lr=lr, betas=(b1, b2), eps=eps)
    assert opt.param_groups[0]["fused"] is True
    ref, m, v = p.detach().clone(), torch.zeros(5, 3), torch.zeros(5, 3)
    for t in range(1, 5):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref = ref * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    assert torch.allclose(p.detach(), ref, atol=1e-6)
