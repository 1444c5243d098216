"""How often llama.cpp gives PyTorch's answer: the float baseline for BitNet's agreement target.

`forge bitnet` measures how often its ternary GGUF answers a test question as the PyTorch
ternary model does (target 90%). Two correct engines of the same weights still differ in
rounding (llama.cpp quantises activations per block of 32 or 256 values, our BitLinear per
token; F16 rounds weights and activations), and a greedy generation of 100+ tokens can turn
on one flipped token. This script measures that for the *input* model, whose weights both
engines hold exactly as in float: fp32 PyTorch against llama.cpp's F16 and Q8_0 GGUFs of it,
on the same test questions as the run, thinking on, greedy, the same budget, scored with the
phase's own answer_agreement. It prints those rows beside the run's ternary figure and
writes bench/results/gguf_agreement.json.

    python bench/bench_gguf_agreement.py --run runs/bitnet_hour
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import save_result

from agent_forge.bitnet.phase import REPORT_FILE, STATE_FILE, answer_agreement, thinking_mode
from agent_forge.data.evalsets import load_eval_set
from agent_forge.inference import GENERATION_BATCH, generate_answers
from agent_forge.llamacpp_engine import LlamaCppModel
from agent_forge.models import load_model

RESULTS = Path(__file__).parent / "results" / "gguf_agreement.json"
GGUFS = {"F16": "input-f16.gguf", "Q8_0": "input-q8_0.gguf"}


def answer_rows(items, gens) -> list[dict]:
    """Generations as the rows answer_agreement reads for 'our' model."""
    return [{"id": it.id, "on": g.answer_text, "closed_on": g.closed} for it, g in zip(items, gens, strict=True)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a `forge bitnet` output directory (llama.cpp was installed)")
    p.add_argument("--kinds", default="F16,Q8_0", help="comma-separated GGUFs of the input model to compare")
    args = p.parse_args(argv)
    run = Path(args.run)
    report, stages = json.loads((run / REPORT_FILE).read_text()), json.loads((run / STATE_FILE).read_text())["stages"]
    cfg = report["config"]
    items = load_eval_set(stages["validate_input"]["eval_dataset"], limit=cfg["eval_samples"])
    model, tok = load_model(cfg["model"])
    questions = [it.question for it in items]
    gen = dict(thinking=thinking_mode(tok), max_new_tokens=cfg["max_new_tokens"], progress=True)
    t0 = time.time()
    ours = answer_rows(items, generate_answers(model.eval(), tok, questions, batch_size=GENERATION_BATCH, **gen))
    rows = {"PyTorch fp32 (input model)": {"seconds": time.time() - t0}}
    for kind in args.kinds.split(","):
        t0 = time.time()
        gens = generate_answers(LlamaCppModel(run / "gguf" / GGUFS[kind]), tok, questions, batch_size=1, **gen)
        rows[f"llama.cpp {kind} (input model) vs PyTorch fp32"] = {
            **answer_agreement(items, ours, gens), "seconds": time.time() - t0}
    rows["llama.cpp TQ2_0 (ternary) vs PyTorch BitLinear (the run's agreement stage)"] = stages["agreement"]
    print(f"{'pair':<78} {'same answer':>12} {'95% CI':>16} {'n':>4}")
    for name, r in rows.items():
        if "agreement" in r:
            lo, hi = r["ci95"]
            print(f"{name:<78} {100 * r['agreement']:>11.1f}% {f'[{100 * lo:.1f}, {100 * hi:.1f}]':>16} {r['n']:>4}")
    rec = {"run": str(run), "model": cfg["model"], "eval_dataset": stages["validate_input"]["eval_dataset"],
           "n": len(items), "max_new_tokens": cfg["max_new_tokens"], "threads": torch.get_num_threads(), "rows": rows}
    save_result(rec, RESULTS, run.name)


if __name__ == "__main__":
    main()
