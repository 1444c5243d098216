"""Cognate: tokens per second and peak memory of the architecture against a plain
transformer of the same size, forward and training, with and without the neural memory and
the recursion.

Variants (each run in its own process, so its peak RSS is its own):
- `cognate`: the model as Phase 1 trains it;
- `no_memory`: every layer's Titans memory replaced by zeros (attention alone through the MAG
  gate), so its cost is gone;
- `no_recursion`: the TRM/ACT recursion replaced by the identity (one step, no ponder);
- `neither`: both removed;
- `transformer`: the same-size Llama the Cognate phase uses as its control
  (`cognate.controls.matched_transformer_config`: same width, depth, heads and vocabulary,
  an MLP wide enough to match Cognate's parameters outside the embeddings).

Shapes: `--shape quick` is the quick preset's model, `default` the ~25M design, `tiny` the
smoke preset's (seconds; what the tests run). The vocabulary is SmolLM2's 49152 unless
`--vocab` says otherwise. Random token ids: speed does not depend on what the text says.
Prints a table, writes bench/results/cognate.json.

    python bench/bench_cognate.py --shape quick --batch 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from _common import save_result, timed
from torch import nn

VARIANTS = ("cognate", "no_memory", "no_recursion", "neither", "transformer")
RESULTS = Path(__file__).resolve().parent / "results" / "cognate.json"


class NoMemory(nn.Module):
    """Stands in for a layer's NeuralMemory: reads nothing, keeps no state."""

    def forward(self, x, mask=None, state=None):
        return torch.zeros_like(x), state


class NoRecursion(nn.Module):
    """Stands in for TRMRecursion: the state passes through, one step, no ponder cost."""

    def forward(self, x):
        b, t = x.shape[:2]
        ones = torch.ones(b, t, device=x.device)
        return x, ones, torch.zeros(b, t, device=x.device), ones[..., None]


def shape_config(shape: str, vocab: int):
    """The CognateConfig of a Phase 1 preset's model shape (`default`: the config's own)."""
    from agent_forge.cognate.config import CognateConfig
    from agent_forge.cognate.phase import PRESETS

    fields = {} if shape == "default" else PRESETS["smoke" if shape == "tiny" else shape]["model"]
    return CognateConfig(**{**fields, "vocab_size": vocab})


def build(variant: str, config) -> nn.Module:
    """The variant's model, randomly initialised (seed 0)."""
    from agent_forge.cognate.controls import matched_transformer_config
    from agent_forge.cognate.model import CognateForCausalLM

    torch.manual_seed(0)
    if variant == "transformer":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(matched_transformer_config(config))
    model = CognateForCausalLM(config)
    if variant in ("no_memory", "neither"):
        for layer in model.model.layers:
            layer.memory = NoMemory()
    if variant in ("no_recursion", "neither"):
        model.model.recursion = NoRecursion()
    return model


def measure(variant: str, config, batch: int, seq_len: int, repeats: int) -> dict:
    """Forward (no grad) and training-step (forward, backward, AdamW) tokens/s; peak RSS."""
    model = build(variant, config)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    def train_step():
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    model.eval()
    fwd_s, _ = timed(forward, repeats)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_s, loss = timed(train_step, repeats)
    tokens = batch * seq_len
    return {"variant": variant, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "non_embedding_params_m": sum(p.numel() for n, p in model.named_parameters()
                                          if "embed_tokens" not in n) / 1e6,
            "forward_tokens_per_s": tokens / fwd_s, "train_tokens_per_s": tokens / train_s,
            "forward_s": fwd_s, "train_step_s": train_s, "loss": loss,
            "rss_after_build_mb": rss_built, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--shape", args.shape, "--vocab", str(args.vocab),
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["variant"] == "cognate")
    lines = [f"{'variant':<13} {'params M':>9} {'non-emb M':>9} {'fwd tok/s':>10} {'x cognate':>9} "
             f"{'train tok/s':>11} {'x cognate':>9} {'peak RSS MB':>11}"]
    for r in rows:
        fwd, train = r["forward_tokens_per_s"], r["train_tokens_per_s"]
        lines.append(f"{r['variant']:<13} {r['params_m']:>9.2f} {r['non_embedding_params_m']:>9.2f} "
                     f"{fwd:>10.0f} {fwd / base['forward_tokens_per_s']:>9.2f} "
                     f"{train:>11.0f} {train / base['train_tokens_per_s']:>9.2f} {r['peak_rss_mb']:>11.0f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="quick", choices=["tiny", "quick", "default"])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, shape_config(args.shape, args.vocab), args.batch, args.seq_len,
                                 args.repeats)))
        return
    if "cognate" not in args.variants:
        p.error("--variants must include cognate (the ratios are against it)")
    rows = [run_child(args, v) for v in args.variants]
    print(f"Cognate, shape {args.shape}, batch {args.batch} x {args.seq_len} tokens, {args.threads} threads, "
          f"best of {args.repeats} after a warm-up")
    print(table(rows))
    save_result({"shape": args.shape, "vocab": args.vocab, "batch": args.batch, "seq_len": args.seq_len,
                 "threads": args.threads, "repeats": args.repeats, "rows": rows},
                args.out, f"{args.shape}-b{args.batch}-t{args.seq_len}")


if __name__ == "__main__":
    main()
