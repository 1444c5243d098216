"""bench/bench_bitnet_scale_groups.py: the grouped ternary rounding against the phase's own
quantiser (one group = the matrix) and against a plain loop over groups."""

import sys
from pathlib import Path

import pytest
import torch

from agent_forge.bitnet.quantize import mse_scale, ternary

from conftest import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_bitnet_scale_groups as bench  # noqa: E402


@pytest.mark.parametrize("method", ["absmean", "mse"])
def test_one_group_is_the_phase_quantiser(method):
    """Group 0 (the whole matrix) rounds exactly as quantize.ternary does (a matrix small
    enough that mse fits every weight, as the phase's does below its sample size)."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    q, gamma = ternary(w, method)
    torch.testing.assert_close(bench.ternary_by_group(w, 0, method), q.float() * gamma)


@pytest.mark.parametrize("method", ["absmean", "mse"])
def test_groups_match_a_loop_over_groups(method):
    """Each group of 16 input weights of each row is rounded with its own gamma: the result
    equals rounding every group alone by the per-matrix rule."""
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 64)
    got = bench.ternary_by_group(w, 16, method)
    want = torch.empty_like(w)
    for r in range(6):
        for g in range(4):
            part = w[r, 16 * g:16 * (g + 1)].reshape(1, -1)
            gamma = mse_scale(part) if method == "mse" else part.abs().mean()
            want[r, 16 * g:16 * (g + 1)] = (part / gamma).round().clamp(-1, 1) * gamma
    torch.testing.assert_close(got, want)


def test_finer_groups_round_with_less_error_under_mse():
    """mse picks the best gamma per group, so splitting a matrix into groups can only lower
    the squared rounding error (it can fit each group's gamma to that group)."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2)) * torch.rand(32, 1) * 4
    errors = [float((bench.ternary_by_group(w, g, "mse") - w).pow(2).sum()) for g in (0, 256, 64)]
    assert errors[0] > errors[1] > errors[2]


def test_rounded_copy_rounds_only_the_decoder_linears():
    """Every decoder linear holds at most three values per row (row groups) after the copy;
    the embedding and the original model are untouched; the sparsity counts zero weights."""
    model = make_tiny_model("llama", 64, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student, sparsity = bench.rounded_copy(model, "row", "absmean")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(student.get_input_embeddings().weight, model.get_input_embeddings().weight)
    zeros = total = 0
    for name, m in student.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            assert max(len(torch.unique(row)) for row in m.weight) <= 3
            zeros, total = zeros + int((m.weight == 0).sum()), total + m.weight.numel()
    assert sparsity == pytest.approx(zeros / total) and 0 < sparsity < 1
