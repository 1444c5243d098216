"""MuGrokfast vs AdamW for Step 1 on the same data, steps and batches.

Question: does Muon x Grokfast (+QK-clip) bake faster or better than AdamW?
Both arms start from the same model, see the same batches in the same order, and are
measured the same way: loss curve, held-out teacher-forced token accuracy, held-out task
accuracy with thinking on, seconds per step, peak resident memory.

    python bench/bench_optimizers.py                       # default model, 60 steps
    python bench/bench_optimizers.py --model tiny --steps 40   # a 2-layer model, seconds

Each arm runs in its own subprocess so peak memory is its own. Prints a table and writes
bench/results/optimizers.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run_arm(args) -> dict:
    """Train one arm and measure it (runs inside the child process)."""
    import torch

    from agent_forge.data.evalsets import load_eval_set
    from agent_forge.data.procedural import build_gym_records
    from agent_forge.evaluation.runner import evaluate
    from agent_forge.quietstar.bake import Baker, BakeConfig

    torch.manual_seed(0)
    model, tok = _model(args.model)
    fams = ("chain_sum", "basic_arithmetic", "simple_equations")
    records = build_gym_records(args.records, seed=5, families=fams)
    train, held = records[:-48], records[-48:]
    lr = args.lr_muon if args.optimizer == "mugrokfast" else args.lr_adamw
    cfg = BakeConfig(optimizer=args.optimizer, lr=lr, steps=args.steps, batch_size=args.batch_size,
                     save_every=0, warmup_steps=max(1, args.steps // 15), seed=0)
    out = Path(args.workdir) / args.optimizer
    baker = Baker(model, tok, cfg, out)
    t0 = time.time()
    result = baker.run(train, held)
    train_s = time.time() - t0
    items = load_eval_set("easy_arithmetic", limit=args.eval_items)
    acc = evaluate(baker.merged_model(), tok, items, thinking="on", max_new_tokens=96)
    losses = [h["loss"] for h in result.history if "loss" in h]
    return {"optimizer": args.optimizer, "lr": lr, "steps": result.steps_done,
            "sec_per_step": train_s / max(1, result.steps_done), "loss_curve": losses,
            "final_loss_avg10": sum(losses[-10:]) / len(losses[-10:]),
            "token_accuracy": result.metrics["token_accuracy"], "task_accuracy": acc.accuracy,
            "task_ci95": acc.ci95, "eval_n": acc.n,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _model(name: str):
    if name != "tiny":
        from agent_forge.models import load_model

        return load_model(name, device="cpu")
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    return make_tiny_model("llama", len(tok)).train(), tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny', or any --model spec")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--records", type=int, default=1500)
    p.add_argument("--eval-items", type=int, default=60)
    p.add_argument("--lr-adamw", type=float, default=2e-4)
    p.add_argument("--lr-muon", type=float, default=2e-4, help="AdamW-scale lr (match_rms_adamw)")
    p.add_argument("--workdir", default="/tmp/forge_bench_optim")
    p.add_argument("--optimizer", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.optimizer:
        print("RESULT " + json.dumps(run_arm(args)))
        return
    rows = [_child(args, name) for name in ("adamw", "mugrokfast")]
    _print_table(rows, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "optimizers.json").write_text(json.dumps({"args": vars(args), "arms": rows}, indent=2))


def _child(args, optimizer: str) -> dict:
    cmd = [sys.executable, __file__, "--optimizer", optimizer, *_forward(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{optimizer} arm failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def _forward(args) -> list[str]:
    keys = ("model", "steps", "batch_size", "records", "eval_items", "lr_adamw", "lr_muon", "workdir")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def _print_table(rows: list[dict], args) -> None:
    print(f"\nStep 1 optimizer comparison: model={args.model}, steps={args.steps}, batch={args.batch_size}")
    print(f"{'optimizer':<11} {'lr':>8} {'s/step':>7} {'loss@10':>8} {'loss end':>9} "
          f"{'tok acc':>8} {'task acc (95% CI)':>22} {'peak MB':>8}")
    for r in rows:
        c = r["loss_curve"]
        ci = f"[{100 * r['task_ci95'][0]:.0f}, {100 * r['task_ci95'][1]:.0f}]"
        print(f"{r['optimizer']:<11} {r['lr']:>8.1e} {r['sec_per_step']:>7.2f} {c[min(9, len(c) - 1)]:>8.3f} "
              f"{r['final_loss_avg10']:>9.3f} {100 * r['token_accuracy']:>7.1f}% "
              f"{100 * r['task_accuracy']:>8.1f}% {ci:>12} {r['peak_rss_mb']:>8.0f}")


if __name__ == "__main__":
    main()
