"""How much does batching (and stopping at the end of the answer line) save in evaluation?

On 32 easy held-out questions (`easy_arithmetic`), the same model answers them:

  one_at_a_time   batch size 1, stop at EOS or the answer line's newline
  batched         batch size 16, same stopping
  batched_no_stop batch size 16, stop only at EOS or max_new_tokens

and we report ms per example, new tokens generated and accuracy (which must not change
between one_at_a_time and batched: greedy decoding with left padding is the same answer).
Prints a table; writes bench/results/batched_generation.json.

    python bench/bench_batched_generation.py                      # the default model
    python bench/bench_batched_generation.py --n 16 --max-new-tokens 32   # a busy CPU
    python bench/bench_batched_generation.py --model runs/x/model --thoughts on --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from agent_forge.data.evalsets import load_eval_set
from agent_forge.evaluation.runner import score
from agent_forge.inference import generate_answers
from agent_forge.models import load_model

RESULTS = Path(__file__).parent / "results" / "batched_generation.json"
VARIANTS = {"one_at_a_time": (1, True), "batched": (16, True), "batched_no_stop": (16, False)}


def run_variant(model, tok, items, batch_size: int, stop: bool, thoughts: str, max_new: int) -> dict:
    t0 = time.perf_counter()
    gens = generate_answers(model, tok, [it.question for it in items], thinking=thoughts,
                            batch_size=batch_size, max_new_tokens=max_new, stop_at_newline=stop)
    wall = time.perf_counter() - t0
    correct = [score(it, g.answer_text if g.closed else None)[0] for it, g in zip(items, gens)]
    return {"batch_size": batch_size, "stop_at_newline": stop, "wall_s": round(wall, 2),
            "ms_per_example": round(1000 * wall / len(items), 1),
            "new_tokens": sum(g.n_new_tokens for g in gens), "accuracy": sum(correct) / len(items),
            "answers": [g.answer_text for g in gens]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--thoughts", default="auto", choices=["on", "off", "auto"])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    for name in ("batched", "batched_no_stop"):
        VARIANTS[name] = (args.batch_size, VARIANTS[name][1])
    model, tok = load_model(args.model, device=args.device)
    items = load_eval_set("easy_arithmetic", args.n)
    results = {}
    for name, (bs, stop) in VARIANTS.items():
        results[name] = run_variant(model, tok, items, bs, stop, args.thoughts, args.max_new_tokens)
        print(f"{name}: {results[name]['ms_per_example']} ms/example", flush=True)
    same = results["one_at_a_time"]["answers"] == results["batched"]["answers"]
    print(f"\n{'variant':<16} {'batch':>5} {'stop':>5} {'ms/ex':>8} {'tokens':>7} {'acc':>6}")
    for name, r in results.items():
        print(f"{name:<16} {r['batch_size']:>5} {str(r['stop_at_newline']):>5} "
              f"{r['ms_per_example']:>8} {r['new_tokens']:>7} {100 * r['accuracy']:>5.1f}%")
    speedup = results["one_at_a_time"]["ms_per_example"] / results["batched"]["ms_per_example"]
    print(f"batched speed-up x{speedup:.2f}; identical answers one-at-a-time vs batched: {same}")
    out = {"model": args.model, "n": len(items), "thoughts": args.thoughts,
           "max_new_tokens": args.max_new_tokens, "device": str(next(model.parameters()).device),
           "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "speedup_batched": round(speedup, 2), "identical_answers": same,
           "variants": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
