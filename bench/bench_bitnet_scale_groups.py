"""BitNet weight scales per group: does a finer scale make the conversion less destructive?

The phase rounds each matrix to {-1, 0, +1} x one gamma (the paper's per-tensor scale, the
one transformers' BitNet format stores). A finer scale (one per output row, or per group of
g consecutive input weights of a row, as llama.cpp's TQ2_0 blocks of 256 could hold) keeps
rows and groups of small weights from rounding to zero. Measured here before building it:
every decoder linear of `--model` rounded to ternary at each granularity (absmean or mse
gammas, bitnet/quantize.py's rules applied per group), inputs rounded per token to int8 as
the phase's default does, no fine-tuning; then the distillation KL to the float model and
the next-token loss on held-out procedural traces (bench_bitnet_qat.held_out, so the figure
is that bench's "KL at start"). Prints a table, writes bench/results/bitnet_scale_groups.json.

    python bench/bench_bitnet_scale_groups.py --model default --groups 0,row,256,64 --scales absmean,mse
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from _common import save_result
from bench_bitnet_qat import held_out

from agent_forge.bitnet.quantize import EPS, MSE_ITERATIONS, act_int8
from agent_forge.models import load_model
from agent_forge.quietstar.bake_data import encode_records
from agent_forge.quietstar.pipeline import DataConfig

RESULTS = Path(__file__).parent / "results" / "bitnet_scale_groups.json"


def group_gammas(w: torch.Tensor, group: int, method: str) -> torch.Tensor:
    """gamma of every group (out, in // group) of `w` (out, in); group 0: one for the matrix.
    absmean: mean|w| of the group; mse: Lloyd's iterations from it (the best gamma for the
    codes is the mean |w| over the non-zero codes; the best codes for gamma are the rounded)."""
    a = w.detach().float().abs()
    a = a.reshape(1, -1) if group == 0 else a.reshape(w.shape[0], w.shape[1] // group, group)
    gamma = a.mean(-1, keepdim=True).clamp(min=EPS)
    if method == "mse":
        for _ in range(MSE_ITERATIONS):
            nonzero = a > 0.5 * gamma
            count = nonzero.sum(-1, keepdim=True)
            fitted = (a * nonzero).sum(-1, keepdim=True) / count.clamp(min=1)
            gamma = torch.where(count > 0, fitted, gamma).clamp(min=EPS)
    elif method != "absmean":
        raise ValueError(f"scale must be absmean or mse, not {method!r}")
    return gamma.squeeze(-1)


def ternary_by_group(w: torch.Tensor, group: int, method: str = "absmean") -> torch.Tensor:
    """w rounded to clamp(round(w / gamma), -1, 1) x gamma with a gamma per group (see group_gammas)."""
    gamma = group_gammas(w, group, method)
    full = gamma.reshape(()) if group == 0 else gamma.repeat_interleave(group, dim=1)
    return ((w.float() / full).round().clamp(-1, 1) * full).to(w.dtype)


def _round_input(module, args):
    q, scale = act_int8(args[0])
    return ((q / scale).to(args[0].dtype),)


def rounded_copy(model, group: str, method: str):
    """A copy of `model` whose decoder linears are ternary at `group` ("0": per matrix, "row",
    or a group width; a width that does not divide a matrix's inputs falls back to its rows)
    with per-token int8 inputs. Returns (model, share of zero weights)."""
    student = copy.deepcopy(model)
    zeros = total = 0
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight.data
            g = w.shape[1] if group == "row" or (int(group) and w.shape[1] % int(group)) else int(group)
            module.weight.data = ternary_by_group(w, g, method)
            zeros, total = zeros + int((module.weight == 0).sum()), total + w.numel()
            module.register_forward_pre_hook(_round_input)
    return student, zeros / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    from agent_forge.bitnet.qat import QATConfig
    from agent_forge.data.general import build_mixture

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="a Phase 3 model directory (or any causal LM)")
    p.add_argument("--groups", default="0,row,256,64", help="comma-separated: 0 (per matrix), row, or a width")
    p.add_argument("--scales", default="absmean,mse", help="comma-separated gamma rules: absmean, mse")
    p.add_argument("--held-out", type=int, default=48, help="procedural traces measured")
    args = p.parse_args(argv)
    teacher, tok = load_model(args.model)
    teacher.eval().requires_grad_(False)
    records, _ = build_mixture(DataConfig(n_records=args.held_out, seed=11))
    examples, _ = encode_records(records, tok, max_len=256)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = []
    for method in args.scales.split(","):
        for group in args.groups.split(","):
            t0 = time.time()
            student, sparsity = rounded_copy(teacher, group, method)
            figures = held_out(student, teacher, examples, pad, QATConfig())
            rows.append({"scale": method, "group": group, "sparsity": sparsity, **figures,
                         "seconds": time.time() - t0})
            print(f"{method:>8} {group:>6}: KL {figures['kd']:.3f}, LM {figures['lm']:.3f}, "
                  f"zero weights {100 * sparsity:.1f}%", flush=True)
    print(f"\n{'scale':>8} {'group':>6} {'KL to float':>12} {'LM':>8} {'zeros':>7}")
    for r in rows:
        print(f"{r['scale']:>8} {r['group']:>6} {r['kd']:>12.3f} {r['lm']:>8.3f} {100 * r['sparsity']:>6.1f}%")
    save_result({"model": args.model, "held_out": len(examples), "rows": rows, "threads": torch.get_num_threads()},
                RESULTS, Path(args.model).name)


if __name__ == "__main__":
    main()
