"""GPTQ's ternary rounding against the Optimal Brain Surgeon update written out with explicit
inverses, and against nearest rounding on the error it minimises."""

import pytest
import torch

from agent_forge.bitnet.bitlinear import BitLinear
from agent_forge.bitnet.convert import bitlinears, convert_to_bitnet, set_strength
from agent_forge.bitnet.gptq import collect_hessians, gptq_initialise, output_error, store_codes, ternary_gptq
from agent_forge.bitnet.quantize import absmean, ternary

from conftest import make_tiny_model


def _obs_reference(weight, hessian, gamma, damp):
    """Column by column: round column i, then spread its error over the columns not yet rounded
    by OBS, dW_F = -(w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_i,: with F = {i, ..., n-1}, the
    inverse taken afresh each time (slow and plain)."""
    h = hessian.double() + damp * torch.diag(hessian.double()).mean() * torch.eye(hessian.shape[0], dtype=torch.float64)
    w, n = weight.double().clone(), weight.shape[1]
    codes = torch.zeros_like(w)
    for i in range(n):
        inv = torch.linalg.inv(h[i:, i:])
        q = (w[:, i] / gamma).round().clamp(-1, 1)
        codes[:, i] = q
        w[:, i:] -= torch.outer((w[:, i] - q * gamma) / inv[0, 0], inv[0])
    return codes.to(torch.int8)


def _correlated_inputs(n_in, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.eye(n_in)
    return torch.randn(tokens, n_in, generator=g) @ mix


@pytest.mark.parametrize("block", [3, 128])
def test_blocked_gptq_equals_the_obs_reference(block):
    torch.manual_seed(0)
    w = torch.randn(12, 10)
    x = _correlated_inputs(10)
    h = x.t() @ x
    gamma = float(absmean(w))
    assert torch.equal(ternary_gptq(w, h, gamma, block=block, damp=0.01), _obs_reference(w, h, gamma, 0.01))


def test_gptq_lowers_the_layer_output_error_below_nearest_rounding():
    torch.manual_seed(1)
    w = torch.randn(32, 24) * 0.05
    x = _correlated_inputs(24, seed=1)
    h = x.t() @ x
    nearest, gamma = ternary(w)
    codes = ternary_gptq(w, h, gamma)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    direct = ((x @ (w - gamma * codes.float()).t()) ** 2).sum()
    assert output_error(w, codes, gamma, h) == pytest.approx(float(direct), rel=1e-3)
    assert output_error(w, codes, gamma, h) < 0.9 * output_error(w, nearest, gamma, h)


def test_inputs_never_seen_get_zero_weight_and_no_error_spread():
    torch.manual_seed(2)
    w = torch.randn(6, 5)
    x = _correlated_inputs(5)
    x[:, 2] = 0.0
    h = x.t() @ x
    codes = ternary_gptq(w, h, float(absmean(w)))
    assert (codes[:, 2] == 0).all()


@pytest.mark.parametrize("method", ["absmean", "mse"])
def test_stored_codes_come_back_through_the_layers_own_quantiser(method):
    layer = BitLinear(24, 16, bias=False, act_norm=False, scale_method=method)
    codes = torch.randint(-1, 2, (16, 24), dtype=torch.int8)
    with torch.no_grad():
        store_codes(layer, codes, 0.037)
    q, gamma = layer.ternary()
    assert torch.equal(q, codes) and float(gamma) == pytest.approx(0.037, rel=1e-6)


def test_hessians_are_the_inputs_after_the_layer_norm_on_real_tokens_only(tiny_tokenizer):
    model = make_tiny_model("llama", len(tiny_tokenizer))
    convert_to_bitnet(model)
    name, layer = bitlinears(model)[0]
    ids = torch.randint(0, 200, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    set_strength(model, 0.0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    set_strength(model, 1.0)
    h = collect_hessians(model, [{"input_ids": ids, "attention_mask": mask}])[name]
    x = layer.rms_norm(seen[0]) if layer.rms_norm is not None else seen[0]
    rows = x[mask.bool()]
    assert torch.allclose(h, rows.t() @ rows, rtol=1e-4, atol=1e-5)
    assert all(m.strength == 1.0 for _, m in bitlinears(model))


def test_gptq_initialise_lowers_every_layers_output_error_and_keeps_the_codes(tiny_tokenizer):
    """Each layer ends holding GPTQ's codes at its nearest-rounding gamma, and the summed output
    error on the calibration tokens is below nearest rounding's."""
    import copy
    model = make_tiny_model("llama", len(tiny_tokenizer), seed=3)
    convert_to_bitnet(model)
    ids = torch.randint(0, 200, (4, 16))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    expected = copy.deepcopy(model)
    hessians = collect_hessians(expected, batches)
    stats = gptq_initialise(model, batches)
    assert stats["layers"] == len(bitlinears(model)) and stats["output_error_gptq"] < stats["output_error_nearest"]
    for (name, before), (_, after) in zip(bitlinears(expected), bitlinears(model)):
        _, gamma = before.ternary()
        q, gamma_after = after.ternary()
        assert torch.equal(q, ternary_gptq(before.weight, hessians[name], gamma))
        assert float(gamma_after) == pytest.approx(float(gamma), rel=1e-5)
