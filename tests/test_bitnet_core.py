"""BitNet core: the paper's quantisers by hand, packing against transformers, BitLinear,
conversion, calibration, and the export that plain transformers loads back."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agent_forge.bitnet.bitlinear import ActNorm, BitLinear, calibrate_act_norms
from agent_forge.bitnet.convert import (DEFAULT_KEEP, BitNetError, activation_rounding, bitlinears, convert_to_bitnet,
                                        is_ternary, set_strength, sparsity)
from agent_forge.bitnet.export import compression, disk_sizes, load_plain, round_kept_matrices, save_hf_bitnet
from agent_forge.bitnet.phase import make_config
from agent_forge.bitnet.quantize import (EPS, absmean, act_int8, act_llamacpp, act_quant, fake_quant_act,
                                         fake_quant_weight, mse_scale, pack_ternary, ternary, unpack_ternary,
                                         weight_scale)
from agent_forge.models import META_FILE, measure_model
from conftest import make_tiny_model


@pytest.fixture
def no_dynamo():
    """transformers' BitLinear and unpack_weights are @torch.compile'd: on CPU the first call
    compiles for ~10 s and new shapes recompile. dynamo's own config patch (undone after the
    test) makes them run the same Python code eagerly. (monkeypatch.setattr does not work on
    torch's config module: its undo deletes the option.)"""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


# ---------------------------------------------------------------------------------------
# Quantisers, by hand


def test_ternary_matches_the_paper_by_hand():
    w = torch.tensor([[0.4, -1.2, 0.0], [2.0, -0.1, 0.5]])
    # gamma = (0.4 + 1.2 + 0 + 2.0 + 0.1 + 0.5) / 6 = 0.7
    # w / gamma = [0.571, -1.714, 0, 2.857, -0.143, 0.714] -> round -> [1, -2, 0, 3, 0, 1] -> clamp
    q, gamma = ternary(w)
    assert gamma.dtype == torch.float32 and gamma.dim() == 0
    assert gamma.item() == pytest.approx(0.7, abs=1e-7)
    assert absmean(w).item() == gamma.item()
    assert q.dtype == torch.int8
    assert q.tolist() == [[1, -1, 0], [1, 0, 1]]
    assert torch.equal(fake_quant_weight(w), q.float() * gamma)
    assert absmean(torch.zeros(3, 3)).item() == pytest.approx(EPS)


def test_ternary_values_only():
    q, _ = ternary(torch.randn(64, 48) * 5)
    assert set(q.unique().tolist()) <= {-1, 0, 1}


def _rounding_error(w: torch.Tensor, gamma: float) -> float:
    q = (w / gamma).round().clamp(-1, 1)
    return float((w - gamma * q).pow(2).sum())


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform"])
def test_mse_scale_is_the_grid_search_minimum(dist):
    """The slow, obviously-right version: try 4000 gammas, keep the least squared error."""
    g = torch.Generator().manual_seed(3)
    if dist == "normal":
        w = torch.randn(4000, generator=g)
    elif dist == "laplace":
        u = torch.rand(4000, generator=g) - 0.5
        w = -u.sign() * torch.log1p(-2 * u.abs())
    else:
        w = torch.rand(4000, generator=g) * 2 - 1
    grid = torch.linspace(0.05, 4.0, 4000) * w.abs().mean()
    best = min(_rounding_error(w, float(x)) for x in grid)
    gamma = mse_scale(w)
    assert _rounding_error(w, float(gamma)) <= best * 1.002
    assert _rounding_error(w, float(gamma)) < _rounding_error(w, float(absmean(w))) * 0.95
    q, got = ternary(w, "mse")
    assert got.item() == gamma.item() and set(q.unique().tolist()) <= {-1, 0, 1}


def test_mse_scale_on_a_sample_matches_the_full_fit():
    """A large matrix is fitted on a strided sample; columns of very different sizes catch a
    stride that would visit only some columns (a multiple of the row length would see one)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 512, generator=g) * (1.0 + 2.0 * (torch.arange(512) % 2))  # odd columns 3x
    full = mse_scale(w, sample=w.numel())
    sampled = mse_scale(w, sample=4096)  # naive stride 32 divides 512: 16 columns only
    assert sampled.item() != full.item()
    assert _rounding_error(w, float(sampled)) <= _rounding_error(w, float(full)) * 1.005
    aligned = w.reshape(-1)[::32]  # what a stride sharing the row length's factors fits on: even columns
    assert mse_scale(aligned, sample=aligned.numel()).item() < 0.6 * full.item()


def test_mse_scale_by_hand():
    # |w| = 0.1, 0.2, 1.0, 3.0; absmean 1.075: 1.0 and 3.0 round to +-1, gamma -> (1 + 3) / 2 = 2
    # -> 1.0 / 2 = 0.5 rounds to 0 (half to even), gamma -> 3.0 / 1 = 3 -> a fixed point.
    w = torch.tensor([0.1, -0.2, 1.0, -3.0])
    assert mse_scale(w, iterations=1).item() == pytest.approx(2.0)
    assert mse_scale(w).item() == pytest.approx(3.0)
    assert _rounding_error(w, 3.0) < _rounding_error(w, 2.0) < _rounding_error(w, 1.075)
    assert mse_scale(torch.zeros(5)).item() == pytest.approx(EPS)
    assert weight_scale(w, "absmean").item() == pytest.approx(1.075)
    with pytest.raises(ValueError, match="absmean, mse"):
        weight_scale(w, "max")


def test_act_int8_matches_the_paper_by_hand():
    x = torch.tensor([[1.0, -4.0, 0.3], [0.1, 0.3, -0.4], [0.0, 0.0, 0.0]])
    # token 0: scale = 127 / 4 = 31.75, x * scale = [31.75, -127, 9.525] -> [32, -127, 10]
    # token 1: scale = 127 / 0.4 = 317.5, x * scale = [31.75, 95.25, -127] -> [32, 95, -127]
    # token 2: all zero, max clamped at EPS -> scale = 127 / 1e-5, q = 0
    q, scale = act_int8(x)
    assert q.tolist() == [[32, -127, 10], [32, 95, -127], [0, 0, 0]]
    assert scale.shape == (3, 1)
    assert scale[:, 0].tolist() == pytest.approx([31.75, 317.5, 127 / EPS], rel=1e-6)
    assert torch.allclose(fake_quant_act(x), q / scale)
    big = act_int8(torch.randn(4, 100) * 30)[0]
    assert big.min() >= -128 and big.max() <= 127 and torch.equal(big, big.round())


def _llamacpp_rounding_by_loop(x: torch.Tensor, block: int) -> torch.Tensor:
    """ggml's quantize_row_q8_0 (block 32, fp16 scale) / quantize_row_q8_K (block 256, fp32
    scale), one row and one block at a time: d = max|b| / 127, q = round(b * 127 / max|b|)
    with ties to even, value q * d (all zero for an all-zero block)."""
    out = torch.zeros_like(x)
    for r in range(x.shape[0]):
        for start in range(0, x.shape[1], block):
            b = x[r, start:start + block]
            amax = b.abs().max()
            if amax == 0:
                continue
            iscale = torch.tensor(127.0) / amax
            d = (amax / 127).half().float() if block == 32 else 1 / iscale
            out[r, start:start + block] = torch.round(b * iscale) * d
    return out


@pytest.mark.parametrize("width,block", [(64, 32), (96, 32), (512, 256)])
def test_llamacpp_activation_rounding_matches_a_block_loop(width, block):
    torch.manual_seed(width)
    x = torch.randn(5, width) * torch.linspace(0.1, 30, width)  # blocks of very different ranges
    x[1, :block] = 0.0  # an all-zero block
    x[2, 3] = 1e3  # one huge value flattens only its own block
    q, scale = act_llamacpp(x)
    assert torch.equal(scale, torch.ones(5, 1))
    assert torch.allclose(q, _llamacpp_rounding_by_loop(x, block), rtol=0, atol=1e-6 * x.abs().max())
    assert torch.equal(q[1, :block], torch.zeros(block))
    # per block, not per token: the huge value leaves the rest of its row at full precision
    other = slice(block, 2 * block)
    assert (q[2, other] - x[2, other]).abs().max() <= x[2, other].abs().max() / 127
    assert (act_int8(x)[0][2] / act_int8(x)[1][2] - x[2])[other].abs().max() > (q[2, other] - x[2, other]).abs().max()
    assert torch.equal(act_quant(x, "llamacpp")[0], q) and torch.equal(act_quant(x, "token")[0], act_int8(x)[0])
    with pytest.raises(ValueError, match="token, llamacpp"):
        act_quant(x, "block")
    with pytest.raises(ValueError, match="blocks of 32"):
        act_llamacpp(torch.randn(2, 40))


@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("fake_quant", [fake_quant_weight, fake_quant_act])
def test_straight_through_gradient_is_identity(fake_quant, strength):
    x = torch.randn(5, 16, requires_grad=True)
    fake_quant(x, strength).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    y = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    out = fake_quant(y, strength)
    out.backward(torch.full_like(out, 2.0))
    assert out.dtype == torch.bfloat16 and torch.equal(y.grad, torch.full_like(y, 2.0))


def test_strength_blends_from_identity_to_quantised():
    w = torch.randn(8, 12)
    q, gamma = ternary(w)
    assert torch.equal(fake_quant_weight(w, 0.0), w)
    assert torch.equal(fake_quant_weight(w, 1.0), q.float() * gamma)
    assert torch.allclose(fake_quant_weight(w, 0.25), 0.75 * w + 0.25 * q.float() * gamma, atol=1e-6)
    x = torch.randn(3, 12)
    xq, scale = act_int8(x)
    assert torch.equal(fake_quant_act(x, 0.0), x)
    assert torch.equal(fake_quant_act(x, 1.0), xq / scale)


# ---------------------------------------------------------------------------------------
# Packing


def test_pack_exact_bytes_by_hand():
    # rows 4 -> one packed row; stored values +1 = [0, 1, 2, 2] at bits 0, 2, 4, 6
    q = torch.tensor([[-1, 1], [0, 1], [1, -1], [1, 0]], dtype=torch.int8)
    assert pack_ternary(q).tolist() == [[0b10100100, 0b01001010]]
    # rows 5 -> R = 2: packed row 0 holds rows 0, 2, 4; row 1 holds rows 1, 3; missing bits 0
    q5 = torch.tensor([1, 0, -1, 1, 0], dtype=torch.int8)  # +1 -> [2, 1, 0, 2, 1]
    assert pack_ternary(q5).tolist() == [2 | 0 << 2 | 1 << 4, 1 | 2 << 2]
    assert pack_ternary(q5).dtype == torch.uint8
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([2, 0, 0, 0], dtype=torch.int8))


@pytest.mark.parametrize("rows", [4, 5, 7, 64])
def test_pack_round_trip_and_matches_transformers(rows, no_dynamo):
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    q = torch.randint(-1, 2, (rows, 6), dtype=torch.int8)
    packed = pack_ternary(q)
    assert packed.shape == (math.ceil(rows / 4), 6)
    assert torch.equal(unpack_ternary(packed, rows), q)
    theirs = unpack_weights(packed, dtype=torch.float32)  # 4 * ceil(rows / 4) rows, tail padding
    assert torch.equal(theirs[:rows], q.float())
    assert torch.equal(pack_weights(q.clone()), packed)  # (pack_weights adds 1 in place)


# ---------------------------------------------------------------------------------------
# BitLinear


def test_strength_zero_is_the_original_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    linear = nn.Linear(16, 12)
    layer = BitLinear.from_module(linear)
    layer.strength = 0.0
    assert layer.weight.shape == (12, 16) and layer.rms_norm is not None
    assert torch.equal(layer(x), linear(x))
    conv = Conv1D(12, 16)
    nn.init.normal_(conv.bias)
    layer = BitLinear.from_module(conv, act_norm=False)
    layer.strength = 0.0
    assert torch.equal(layer.weight, conv.weight.t())
    # Conv1D runs addmm(bias, x, W); F.linear runs addmm(bias, x, weight.t()) with weight = W^T:
    # the same products in the same order, so the same bits on CPU.
    assert torch.equal(layer(x), conv(x))
    no_bias = BitLinear.from_module(nn.Linear(16, 12, bias=False))
    assert no_bias.bias is None


def _slow_bitlinear(x, weight, bias, norm_weight, eps):
    """BitLinear at strength 1 written out element by element from the paper's formulas."""
    w = weight.tolist()
    n_out, n_in = len(w), len(w[0])
    gamma = max(sum(abs(v) for row in w for v in row) / (n_out * n_in), EPS)
    wq = [[max(-1, min(1, round(v / gamma))) for v in row] for row in w]
    out = []
    for token in x.reshape(-1, n_in).tolist():
        if norm_weight is not None:
            rms = math.sqrt(sum(v * v for v in token) / n_in + eps)
            token = [g * v / rms for g, v in zip(norm_weight.tolist(), token)]
        scale = 127 / max(max(abs(v) for v in token), EPS)
        xq = [max(-128, min(127, round(v * scale))) for v in token]
        out.append([sum(a * b for a, b in zip(xq, wq[o])) * gamma / scale
                    + (bias[o].item() if bias is not None else 0.0) for o in range(n_out)])
    return torch.tensor(out).reshape(*x.shape[:-1], n_out)


@pytest.mark.parametrize("act_norm", [True, False])
def test_strength_one_matches_slow_reference(act_norm):
    torch.manual_seed(1)
    layer = BitLinear(16, 8, bias=True, act_norm=act_norm)
    nn.init.normal_(layer.bias)
    if act_norm:
        nn.init.uniform_(layer.rms_norm.weight, 0.5, 2.0)
    x = torch.randn(2, 3, 16) * 3
    with torch.no_grad():
        ours = layer(x)
    ref = _slow_bitlinear(x, layer.weight, layer.bias, layer.rms_norm.weight if act_norm else None, 1e-6)
    # float32 vs Python doubles: an element of x * scale near .5 could round differently; with
    # random inputs none are, and the sums agree to float32 rounding.
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    q, gamma = layer.ternary()
    assert q.dtype == torch.int8 and gamma.item() == pytest.approx(layer.weight.abs().mean().item())


@pytest.mark.parametrize("bias,scale,act", [(True, "absmean", "token"), (False, "absmean", "token"),
                                            (True, "mse", "token"), (True, "absmean", "llamacpp")])
def test_strength_one_path_is_the_plain_formula_with_its_gradients(bias, scale, act):
    """At strength 1 BitLinear takes its exported-order path; value and straight-through
    gradients must be those of F.linear(fake_quant_act(x), fake_quant_weight(w), b) (with
    llama.cpp's rounding: its activation blocks, gamma in fp16)."""
    torch.manual_seed(2)
    layer = BitLinear(64, 8, bias=bias, act_norm=False, scale_method=scale, act_method=act)
    x = torch.randn(2, 3, 64, requires_grad=True)
    grad_out = torch.randn(2, 3, 8)
    layer(x).backward(grad_out)
    fast = (x.grad.clone(), layer.weight.grad.clone(), None if not bias else layer.bias.grad.clone())
    x.grad = None
    layer.zero_grad()
    w = layer.weight
    if act == "token":
        w_fq = fake_quant_weight(w, 1.0, scale)
    else:  # llama.cpp multiplies by the fp16 block scale the GGUF stores
        q, gamma = ternary(w.detach(), scale)
        w_fq = w + (q.float() * gamma.half().float() - w).detach()
    plain = F.linear(fake_quant_act(x, 1.0, act), w_fq, layer.bias)
    plain.backward(grad_out)
    assert layer.ternary()[1].item() == weight_scale(layer.weight, scale).item()
    with torch.no_grad():
        assert torch.allclose(layer(x), plain, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fast[0], x.grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fast[1], layer.weight.grad, rtol=1e-6, atol=1e-6)
    if bias:
        assert torch.allclose(fast[2], layer.bias.grad)
    if act == "llamacpp":  # the rounding is really another one, at full and at blended strength
        per_token = F.linear(fake_quant_act(x), fake_quant_weight(layer.weight, 1.0, scale), layer.bias)
        assert not torch.allclose(plain, per_token, rtol=1e-4, atol=1e-4)
        layer.strength = 0.4
        with torch.no_grad():
            blended = F.linear(fake_quant_act(x, 0.4, act), fake_quant_weight(layer.weight, 0.4, scale), layer.bias)
            assert torch.allclose(layer(x), blended, rtol=1e-6, atol=1e-6)


def test_llamacpp_rounding_converts_whole_blocks_and_switches_back(tiny_llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    odd = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(BitNetError, match=r"q_proj has 40 inputs, not a multiple of 32"):
        convert_to_bitnet(odd, act_method="llamacpp")
    with pytest.raises(BitNetError, match="token, llamacpp"):
        convert_to_bitnet(tiny_llama, act_method="blocks")
    convert_to_bitnet(tiny_llama, act_method="llamacpp")
    set_strength(tiny_llama, 1.0)
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        blocks = tiny_llama(ids).logits
        with activation_rounding(tiny_llama, "token"):
            assert {layer.act_method for _, layer in bitlinears(tiny_llama)} == {"token"}
            per_token = tiny_llama(ids).logits
        assert {layer.act_method for _, layer in bitlinears(tiny_llama)} == {"llamacpp"}
        assert torch.equal(tiny_llama(ids).logits, blocks) and not torch.equal(blocks, per_token)


def test_converted_model_trains_at_full_strength(tiny_qwen2):
    convert_to_bitnet(tiny_qwen2)
    ids = torch.randint(0, 256, (2, 9))
    tiny_qwen2.train()
    loss = tiny_qwen2(input_ids=ids, labels=ids).loss
    loss.backward()
    for name, layer in bitlinears(tiny_qwen2):
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all(), name
        assert layer.weight.grad.abs().sum() > 0 and layer.rms_norm.weight.grad is not None, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_norm_equals_llama_rms_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, theirs = ActNorm(24, eps=1e-5).to(dtype), LlamaRMSNorm(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(24) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    x = (torch.randn(3, 7, 24) * 4).to(dtype)
    assert torch.equal(ours(x), theirs(x))


# ---------------------------------------------------------------------------------------
# Conversion


def test_convert_tiny_llama(tiny_llama):
    emb = tiny_llama.get_input_embeddings()
    emb_before = emb.weight.clone()
    names = convert_to_bitnet(tiny_llama)
    expected = {f"model.layers.{i}.{part}" for i in range(2) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(names) == expected and len(names) == len(expected)
    assert {n for n, _ in bitlinears(tiny_llama)} == expected
    assert type(tiny_llama.lm_head) is nn.Linear
    assert tiny_llama.get_input_embeddings() is emb and torch.equal(emb.weight, emb_before)
    assert tiny_llama.lm_head.weight is emb.weight  # still tied
    assert is_ternary(tiny_llama)
    assert DEFAULT_KEEP == ("lm_head",)


def test_convert_keeps_a_tied_head_even_when_asked_not_to(tiny_llama, tiny_qwen2):
    names = convert_to_bitnet(tiny_llama, keep=())
    assert "lm_head" not in names and type(tiny_llama.lm_head) is nn.Linear
    names = convert_to_bitnet(tiny_qwen2, keep=())  # untied, but 258 rows: cannot be packed
    assert "lm_head" not in names and type(tiny_qwen2.lm_head) is nn.Linear
    untied = make_tiny_model("qwen2", 260)  # untied and a multiple of 4: converted
    assert "lm_head" in convert_to_bitnet(untied, keep=()) and isinstance(untied.lm_head, BitLinear)


def test_convert_gpt2_conv1d(tiny_gpt2, tiny_tokenizer):
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = tiny_gpt2(ids).logits
    names = convert_to_bitnet(tiny_gpt2, act_norm=False)
    assert set(names) == {f"transformer.h.{i}.{p}" for i in range(2)
                          for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    set_strength(tiny_gpt2, 0.0)
    with torch.no_grad():
        assert torch.allclose(tiny_gpt2(ids).logits, before, atol=1e-5)


def test_convert_refuses_bad_input(tiny_llama):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32))
    with pytest.raises(BitNetError, match="not a causal language model"):
        convert_to_bitnet(bert)
    with pytest.raises(BitNetError, match="not a transformers model"):
        convert_to_bitnet(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(BitNetError, match="nothing|no linear"):
        convert_to_bitnet(tiny_llama, keep=("model",))
    with pytest.raises(BitNetError, match="weight scale must be one of absmean, mse"):
        convert_to_bitnet(tiny_llama, scale_method="max")
    assert not is_ternary(tiny_llama)
    convert_to_bitnet(tiny_llama)
    with pytest.raises(BitNetError, match="already ternary"):
        convert_to_bitnet(tiny_llama)
    with pytest.raises(BitNetError):
        set_strength(tiny_llama, 1.5)


def test_set_strength_and_sparsity(tiny_qwen2):
    convert_to_bitnet(tiny_qwen2)
    set_strength(tiny_qwen2, 0.4)
    assert {layer.strength for _, layer in bitlinears(tiny_qwen2)} == {0.4}
    assert "strength" not in " ".join(tiny_qwen2.state_dict())
    stats = sparsity(tiny_qwen2)
    zeros = total = 0
    for name, layer in bitlinears(tiny_qwen2):
        q, _ = ternary(layer.weight)
        assert stats["per_layer"][name] == (q == 0).sum().item() / q.numel()
        zeros, total = zeros + (q == 0).sum().item(), total + q.numel()
    assert 0 < stats["overall"] < 1 and stats["overall"] == pytest.approx(zeros / total)
    assert all(0 <= v <= 1 for v in stats["per_layer"].values())


# ---------------------------------------------------------------------------------------
# Calibration


def _padded_batch(tokenizer, texts):
    tokenizer.padding_side = "right"
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def test_calibrate_sets_weight_to_mean_input_rms(tiny_llama, tiny_tokenizer):
    convert_to_bitnet(tiny_llama)
    batches = [_padded_batch(tiny_tokenizer, ["hello there", "a much longer second sentence"]),
               _padded_batch(tiny_tokenizer, ["third"])]
    assert batches[0]["attention_mask"].sum() < batches[0]["attention_mask"].numel()  # padded
    target = tiny_llama.model.layers[1].mlp.down_proj
    # expected: the input RMS of the full-precision model (strength 0), non-padding tokens only
    seen = []
    hook = target.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    set_strength(tiny_llama, 0.0)
    with torch.no_grad():
        for b in batches:
            tiny_llama(**b)
    hook.remove()
    rms = [x.pow(2).mean(-1).sqrt()[b["attention_mask"].bool()] for x, b in zip(seen, batches)]
    expected = torch.cat(rms).mean().item()

    set_strength(tiny_llama, 0.7)
    tiny_llama.train()
    assert calibrate_act_norms(tiny_llama, batches) == 14
    w = target.rms_norm.weight
    assert torch.allclose(w, torch.full_like(w, expected), rtol=1e-5)
    assert not torch.allclose(w, torch.ones_like(w))
    assert tiny_llama.training and {layer.strength for _, layer in bitlinears(tiny_llama)} == {0.7}


# ---------------------------------------------------------------------------------------
# Export to transformers' format and back


@pytest.mark.parametrize("kind,act_norm,scale", [("llama", True, "absmean"), ("qwen2", True, "absmean"),
                                                ("qwen2", False, "absmean"), ("llama", True, "mse")])
def test_hf_round_trip(kind, act_norm, scale, tiny_tokenizer, tmp_path, no_dynamo):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    model = make_tiny_model(kind, len(tiny_tokenizer))
    names = convert_to_bitnet(model, act_norm=act_norm, scale_method=scale)
    if act_norm:
        calibrate_act_norms(model, [_padded_batch(tiny_tokenizer, ["calibrate me", "and me too"])])
    out = save_hf_bitnet(model, tiny_tokenizer, tmp_path / "bitnet", meta={"phase": 4})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
                  "use_rms_norm": act_norm, "rms_norm_eps": 1e-6, "modules_to_not_convert": ["lm_head"]}
    meta = json.loads((out / META_FILE).read_text())
    assert meta["phase"] == 4 and "forge_version" in meta and "created" in meta
    assert (out / "generation_config.json").exists() and not list(tmp_path.glob(".*tmp*"))

    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    for name in names:
        module = loaded.get_submodule(name)
        assert isinstance(module, HFBitLinear) and module.weight.dtype == torch.uint8
        assert (module.rms_norm is not None) == act_norm
    assert type(loaded.lm_head) is nn.Linear
    assert is_ternary(loaded)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    # BitLinear at strength 1 computes in transformers' order (integer matmul, then divide by
    # weight_scale * input_scale), so the two models run the same float operations: observed
    # difference 0.0. The plain order (dequantise, then matmul) differs in the last bit and flips
    # activations that sit exactly on a .5 to another int8 value, ~1e-3 on the logits; a wrong
    # scale or layout is off by order 1. 1e-6 allows only last-bit noise.
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), (ours - theirs).abs().max()
    gen = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False,
                          pad_token_id=tiny_tokenizer.pad_token_id)
    assert gen.shape == (1, 7)
    if kind == "llama":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_export_refuses_gpt2_and_writes_nothing(tiny_gpt2, tiny_tokenizer, tmp_path):
    convert_to_bitnet(tiny_gpt2)
    out = tmp_path / "sub" / "gpt2-bitnet"
    with pytest.raises(BitNetError, match="Conv1D"):
        save_hf_bitnet(tiny_gpt2, tiny_tokenizer, out)
    assert not out.exists() and not (tmp_path / "sub").exists()


def test_export_refuses_unconverted_and_odd_widths(tiny_llama, tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(BitNetError, match="convert"):
        save_hf_bitnet(tiny_llama, tiny_tokenizer, tmp_path / "x")
    odd = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=30,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    names = convert_to_bitnet(odd)  # gate/up (30 wide) cannot be packed: convert leaves them alone
    assert "model.layers.0.mlp.down_proj" in names and "model.layers.0.mlp.up_proj" not in names
    assert type(odd.model.layers[0].mlp.gate_proj) is nn.Linear
    odd.model.layers[0].mlp.set_submodule("up_proj", BitLinear.from_module(odd.model.layers[0].mlp.up_proj))
    with pytest.raises(BitNetError, match="multiple of 4"):  # a ternary one made by hand is refused
        save_hf_bitnet(odd, tiny_tokenizer, tmp_path / "y")
    assert not list(tmp_path.iterdir())


def test_disk_sizes_and_compression(tiny_tokenizer, tmp_path):
    model = make_tiny_model("qwen2", len(tiny_tokenizer))
    n_params = measure_model(model).n_params
    convert_to_bitnet(model)
    out = save_hf_bitnet(model, tiny_tokenizer, tmp_path / "q")
    sizes = disk_sizes(out)
    parts = ("packed_linears", "embeddings", "norms", "head", "other")
    assert set(sizes) == {*parts, "total"}
    assert sum(sizes[p] for p in parts) == sizes["total"]
    # packed: per layer out/4 * in bytes + a 4-byte float32 scale
    expected_packed = sum(l.out_features // 4 * l.in_features + 4 for _, l in bitlinears(model))
    assert sizes["packed_linears"] == expected_packed
    assert sizes["embeddings"] == sizes["head"] == len(tiny_tokenizer) * 32 * 4  # untied head
    assert sizes["other"] == sum(l.bias.numel() * 4 for _, l in bitlinears(model) if l.bias is not None)
    assert sizes["total"] < (out / "model.safetensors").stat().st_size
    ratios = compression(sizes, n_params)
    assert ratios["fp32_bytes"] == 4 * n_params and ratios["bf16_bytes"] == 2 * n_params
    assert ratios["ratio_vs_fp32"] == pytest.approx(2 * ratios["ratio_vs_bf16"])
    assert ratios["ratio_vs_fp32"] > 1


@pytest.mark.parametrize("kind,dtype,nbytes", [("llama", "bfloat16", 2), ("qwen2", "bfloat16", 2),
                                               ("llama", "float8_e4m3fn", 1), ("qwen2", "float8_e4m3fn", 1)])
def test_narrow_storage_reloads_the_rounded_model_exactly(kind, dtype, nbytes, tiny_tokenizer, tmp_path, no_dynamo):
    """Kept matrices stored in bfloat16 (2 bytes) or float8_e4m3fn (1 byte): the reloaded
    float32 model gives the logits of the in-memory model rounded the same way (bit for bit)."""
    model = make_tiny_model(kind, len(tiny_tokenizer))
    convert_to_bitnet(model)
    with pytest.raises(BitNetError, match="round_kept_matrices"):
        save_hf_bitnet(model, tiny_tokenizer, tmp_path / "unrounded", store_dtype=dtype)
    assert not (tmp_path / "unrounded").exists()
    before = model.model.embed_tokens.weight.detach().clone()
    assert round_kept_matrices(model, dtype) == (1 if kind == "llama" else 2)
    after = model.model.embed_tokens.weight.detach()
    assert torch.equal(after, before.to(getattr(torch, dtype)).float()) and not torch.equal(after, before)
    out = save_hf_bitnet(model, tiny_tokenizer, tmp_path / dtype, store_dtype=dtype)
    sizes = disk_sizes(out)
    assert sizes["embeddings"] == len(tiny_tokenizer) * 32 * nbytes
    assert sizes["head"] == (0 if kind == "llama" else len(tiny_tokenizer) * 32 * nbytes)
    loaded = load_plain(out)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_a_store_dtype_outside_the_list_is_refused_before_any_work(tmp_path):
    with pytest.raises(BitNetError, match="float8_e4m3fn"):
        round_kept_matrices(make_tiny_model("llama", 300), "float8")
    with pytest.raises(ValueError, match="store_dtype must be one of"):
        make_config("smoke", store_dtype="int8")


def test_inference_reuses_the_ternary_weight_until_it_changes():
    """No-grad forwards use a cached q_w; the value equals the training path's, and a weight
    update (an optimiser step, a load) invalidates it."""
    torch.manual_seed(3)
    layer = BitLinear(16, 8, bias=True, act_norm=True)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        first = layer(x)
    assert torch.equal(first, layer(x).detach())  # grad path, no cache
    with torch.no_grad():
        layer.weight.mul_(-1.0)
        flipped = layer(x)
    assert torch.equal(flipped, layer(x).detach()) and not torch.equal(flipped, first)


def test_inference_below_full_strength_reuses_the_blended_weight_until_it_changes():
    """Mid warm-in (0 < lambda < 1), no-grad forwards cache the blended weight; the value equals
    the training path's, and a new strength or a weight update recomputes it."""
    torch.manual_seed(4)
    layer = BitLinear(16, 8, bias=True, act_norm=True)
    x = torch.randn(2, 3, 16)
    for strength in (0.3, 0.7, 0.3):
        layer.strength = strength
        with torch.no_grad():
            cached = layer(x)
            assert torch.equal(cached, layer(x))  # from the cache
        assert torch.equal(cached, layer(x).detach())  # grad path, no cache
    with torch.no_grad():
        layer.weight.mul_(-1.0)
        flipped = layer(x)
    assert torch.equal(flipped, layer(x).detach()) and not torch.equal(flipped, cached)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inference_after_a_fused_optimiser_step_sees_the_new_weight(strength):
    """torch's fused AdamW updates a weight without bumping its version counter, so a cache
    keyed on the version alone kept serving the weight from before training went on."""
    torch.manual_seed(5)
    layer = BitLinear(16, 8, bias=False, act_norm=False)
    layer.strength = strength
    opt = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        before = layer(x)  # fills the cache
    version = layer.weight._version
    layer(x).pow(2).sum().backward()
    opt.step()
    assert layer.weight._version == version  # the premise: no bump
    with torch.no_grad():
        after = layer(x)
    assert not torch.equal(after, before) and torch.equal(after, layer(x).detach())


def test_disk_sizes_tied_head_stored_once(tiny_llama, tiny_tokenizer, tmp_path):
    convert_to_bitnet(tiny_llama)
    sizes = disk_sizes(save_hf_bitnet(tiny_llama, tiny_tokenizer, tmp_path / "l"))
    assert sizes["head"] == 0 and sizes["embeddings"] == len(tiny_tokenizer) * 32 * 4


@pytest.mark.parametrize("act_norm", [True, "shared"])
def test_a_cognate_export_reloads_with_the_same_logits(act_norm, tmp_path, no_dynamo):
    """A Cognate model made ternary and exported: plain transformers' reload (its BitLinear holds
    packed uint8 weights) gives the in-memory model's logits. The memory once cast its reads to
    `out.weight.dtype`, uint8 after the reload: 4.95 apart on a real champion."""
    import agent_forge.models  # noqa: F401  (registers the Cognate classes)
    from agent_forge.cognate.config import CognateConfig
    from agent_forge.cognate.model import CognateForCausalLM
    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    config = CognateConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, memory_dim=8, memory_hidden_size=16, memory_chunk_size=4,
                           recursion_intermediate_size=64, recursion_after_layer=1, latent_steps=1,
                           max_recursion_steps=3, sliding_window=8, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    model = CognateForCausalLM(config).eval()
    convert_to_bitnet(model, act_norm=act_norm)
    out = save_hf_bitnet(model, tok, tmp_path / "cog")
    loaded = load_plain(out)
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = loaded(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max().item() < 1e-4
