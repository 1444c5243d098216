"""Transfer: bake without one problem family, then ask that family (issue 19, item 7).

Builds `make demo`'s training data (the quick preset's data settings) with `--hold-out`
left out, runs Step 1 on it with the quick preset's settings, and asks the held-out
family's questions of the test split (`easy_arithmetic`, never trained on) of the baked
model with thinking on and of the input model answering directly, paired per question.
With `--reference DIR` (e.g. runs/demo/model, a model whose data had the family) it asks
that model the same questions, for scale. Prints a table; writes bench/results/transfer.json.

    python bench/bench_transfer.py --hold-out simple_equations --reference runs/demo/model
    # ~15 minutes on a 2-core CPU (Step 1 is most of it)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from _common import save_result

from agent_forge.data.evalsets import EASY_FAMILIES, load_eval_set
from agent_forge.data.general import build_mixture
from agent_forge.data.overlap import asked_by, eval_sets_for
from agent_forge.data.schema import write_records
from agent_forge.evaluation.runner import evaluate
from agent_forge.inference import GENERATION_BATCH
from agent_forge.models import load_model
from agent_forge.quietstar.pipeline import make_config
from agent_forge.quietstar.step1 import run_step1
from agent_forge.validation.generalisation import compare_on


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hold-out", default="simple_equations", choices=EASY_FAMILIES)
    p.add_argument("--out", default="runs/transfer")
    p.add_argument("--reference", default=None, help="a model dir trained with the family, asked the same items")
    p.add_argument("--steps", type=int, default=None, help="Step 1 steps (default: the quick preset's)")
    args = p.parse_args()
    cfg = make_config("quick")
    out, t0 = Path(args.out), time.time()
    data = dataclasses.replace(cfg.data, families=tuple(f for f in cfg.data.families if f != args.hold_out))
    records, n_general = build_mixture(data, exclude=asked_by(eval_sets_for(cfg.eval_dataset, cfg.val_dataset)),
                                       exclude_general=asked_by(tuple(cfg.general_sets)))
    assert not any(r.family == args.hold_out for r in records)
    write_records(out / "data" / "train.jsonl", records)
    bake = {**dataclasses.asdict(cfg.bake), **({"steps": args.steps} if args.steps else {})}
    step1 = run_step1(cfg.model, out / "data" / "train.jsonl", out / "step1", bake, eval_data=cfg.val_dataset)
    items = [it for it in load_eval_set(cfg.eval_dataset) if it.family == args.hold_out]
    model, tok = load_model(str(out / "step1" / "model"))
    base, base_tok = load_model(cfg.model)
    held = compare_on(items, model, tok, base, base_tok, max_new_tokens=cfg.max_new_tokens, batch_size=GENERATION_BATCH)
    rec = {"hold_out": args.hold_out, "families_trained": list(data.families), "records": len(records),
           "general_records": n_general, "step1_steps": bake["steps"], "eval_set": cfg.eval_dataset,
           "n": held["n"], "without_family": _row(held["accuracy_on"], held["ci95_on"]),
           "input_direct": held["input_accuracy"], "gain_over_input": held["gain"],
           "val_accuracy_other_families": step1.get("accuracy_thinking_on"), "seconds": round(time.time() - t0)}
    if args.reference:
        ref_model, ref_tok = load_model(args.reference)
        ref = evaluate(ref_model, ref_tok, items, thinking="on", max_new_tokens=cfg.max_new_tokens,
                       batch_size=GENERATION_BATCH, loglik=False, progress=False)
        rec["with_family"] = {**_row(ref.accuracy, ref.ci95), "model": args.reference}
    _print(rec)
    save_result(rec, Path(__file__).parent / "results" / "transfer.json", args.hold_out)


def _row(acc: float, ci) -> dict:
    return {"accuracy": acc, "ci95": list(ci)}


def _print(rec: dict) -> None:
    g = rec["gain_over_input"]
    print(f"\ntransfer to {rec['hold_out']} (n={rec['n']}, {rec['eval_set']}); "
          f"trained on {', '.join(rec['families_trained'])} + {rec['general_records']} general records")
    print(f"{'model':<44} {'accuracy':>9}  95% interval")
    rows = [("input model, direct answer", {"accuracy": rec["input_direct"], "ci95": None}),
            ("baked WITHOUT the family, thinking on", rec["without_family"])]
    if "with_family" in rec:
        rows.append(("baked WITH the family (reference), thinking on", rec["with_family"]))
    for name, r in rows:
        ci = f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]" if r["ci95"] else ""
        print(f"{name:<44} {100 * r['accuracy']:>8.1f}%  {ci}")
    lo, hi = g["ci95_points"]
    print(f"without family - input: {g['points']:+.1f} points [{lo:+.1f}, {hi:+.1f}], McNemar p={g['mcnemar_p']:.2g}")


if __name__ == "__main__":
    main()
